"""The unlock task on a ``connection: local`` host: live holders are kept unless forced."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml
from e2e_helpers import run_fraisier


def _project(tmp_path: Path) -> Path:
    (tmp_path / "inventories").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "job.yaml").write_text(
        yaml.safe_dump({"steps": [{"name": "hi", "run": "true"}]})
    )
    inventory = {
        "hosts": {"h1": {"connection": "local"}},
        "fraises": {"job": {"recipe": "job", "deploy_to": str(tmp_path / "deploy")}},
    }
    (tmp_path / "inventories" / "unlock.yaml").write_text(yaml.safe_dump(inventory))
    return tmp_path


def _hold(root: Path, pid: int) -> Path:
    lock = root / "deploy" / ".fraisier" / "lock"
    lock.mkdir(parents=True)
    holder = {"run_id": "live-run", "user": "me", "controller": socket.gethostname(), "pid": pid}
    (lock / "holder.json").write_text(json.dumps(holder))
    return lock


def test_unlock_keeps_live_holder(tmp_path: Path) -> None:
    root = _project(tmp_path)
    lock = _hold(root, os.getpid())

    kept = run_fraisier(root, "unlock", "--env", "unlock", "--fraise", "job")
    forced = run_fraisier(root, "unlock", "--env", "unlock", "--fraise", "job", "--force")
    again = run_fraisier(root, "unlock", "--env", "unlock", "--fraise", "job")

    assert kept.returncode == 4, kept
    assert "still running on this controller" in kept.stdout
    assert forced.returncode == 0, forced
    assert "removed lock" in forced.stdout
    assert not lock.exists()
    assert again.returncode == 0, again
    assert "h1: no lock" in again.stdout


def test_unlock_removes_dead_holder(tmp_path: Path) -> None:
    root = _project(tmp_path)
    lock = _hold(root, 2**22 + 12345)

    result = run_fraisier(root, "unlock", "--env", "unlock", "--fraise", "job")

    assert result.returncode == 0, result
    assert "live-run" in result.stdout
    assert not lock.exists()

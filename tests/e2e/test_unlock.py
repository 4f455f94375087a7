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


def _release_project(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    (source / "app.txt").write_text("v1\n")
    (tmp_path / "inventories").mkdir()
    (tmp_path / "tasks").mkdir()
    recipe = {"steps": ["fetch", "switch"]}
    (tmp_path / "tasks" / "rel.yaml").write_text(yaml.safe_dump(recipe))
    inventory = {
        "hosts": {"a": {"connection": "local"}, "b": {"connection": "local"}},
        "fraises": {
            "rel": {
                "recipe": "rel",
                "deploy_to": str(tmp_path / "deploy" / "{{ host }}"),
                "source": {"path": str(source)},
            }
        },
    }
    (tmp_path / "inventories" / "rel.yaml").write_text(yaml.safe_dump(inventory))
    return tmp_path


def test_rollback_locks_every_host_first(tmp_path: Path) -> None:
    root = _release_project(tmp_path)
    for _ in range(2):
        assert run_fraisier(root, "deploy", "--env", "rel").returncode == 0
    current = {h: os.readlink(root / "deploy" / h / "current") for h in ("a", "b")}
    lock = root / "deploy" / "b" / ".fraisier" / "lock"
    lock.mkdir(parents=True)
    holder = {"run_id": "other", "user": "me", "controller": "elsewhere", "pid": 1}
    (lock / "holder.json").write_text(json.dumps(holder))

    blocked = run_fraisier(root, "rollback", "--env", "rel", "--json")

    assert blocked.returncode == 4, blocked
    hosts = {h["host"]: h["status"] for h in blocked.json()[0]["hosts"]}
    assert hosts == {"a": "skipped", "b": "failed"}
    for host in ("a", "b"):
        assert os.readlink(root / "deploy" / host / "current") == current[host]

    (lock / "holder.json").unlink()
    lock.rmdir()
    rolled = run_fraisier(root, "rollback", "--env", "rel", "--json")
    assert rolled.returncode == 0, rolled
    first = rolled.json()[0]["hosts"][0]["final_release"]
    again = run_fraisier(root, "rollback", "--env", "rel")
    # The release rolled back from is no default target any more.
    assert again.returncode == 2, again
    assert "no earlier good release" in again.output
    back = run_fraisier(root, "rollback", "--env", "rel", "--to", current["a"].rsplit("/", 1)[-1])
    assert back.returncode == 0, back
    assert first != current["a"].rsplit("/", 1)[-1]

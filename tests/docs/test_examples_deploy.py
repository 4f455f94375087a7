"""Every shipped inventory deploys, as written, to real SSH test hosts.

The inventories are those of the project (``inventories/``) and of each example project
(``examples/*/inventories/``). Each runs in a ``Sandbox``, which points its hosts at the test
hosts and changes nothing else, and must end with every host on the new release.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from docs_helpers import Sandbox, load_doc_yaml
from support import REPO_ROOT, SshHost


def _inventories() -> list[Path]:
    found = [
        *REPO_ROOT.glob("inventories/*.yaml"),
        *REPO_ROOT.glob("examples/*/inventories/*.yaml"),
    ]
    # A git source needs the service's own repository: test_example_jobs.py deploys the CI
    # example from a real local repository instead.
    return sorted(p for p in found if "git:" not in p.read_text(encoding="utf-8"))


INVENTORIES = _inventories()


def test_every_example_project_has_an_inventory() -> None:
    projects = [
        p
        for p in (REPO_ROOT / "examples").iterdir()
        if (p / "inventories").is_dir() or (p / "tasks").is_dir()
    ]
    without = [p.name for p in projects if not list((p / "inventories").glob("*.yaml"))]

    assert projects
    assert without == []


@pytest.mark.ssh
@pytest.mark.monitoring
@pytest.mark.parametrize(
    "inventory", INVENTORIES, ids=[str(p.relative_to(REPO_ROOT)) for p in INVENTORIES]
)
def test_inventory_deploys_as_written(inventory: Path, sandbox: Sandbox) -> None:
    project = inventory.parent.parent.relative_to(REPO_ROOT)
    env = inventory.stem

    result = sandbox.shell(f"fraisier deploy --env {env} --json", cwd=str(project))

    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    runs = json.loads(result.stdout)
    assert runs, result.stdout
    for run in runs:
        assert run["status"] == "success", run
        assert run["hosts"], run
        for host in run["hosts"]:
            assert host["status"] == "success", host
            assert host["final_release"] == run["release"], host

    bound = _bound_hosts(sandbox, project, env)
    for run in runs:
        for host in run["hosts"]:
            if host["host"] not in bound:
                continue  # a connection: local host, checked by tests/e2e/test_local.py
            root = Path(bound[host["host"]].deploy_root)
            links = [os.readlink(link).rstrip("/") for link in root.glob("*/current")]
            assert any(link.endswith("/" + run["release"]) for link in links), (
                f"{host['host']}: no current link under {root} points to {run['release']}: {links}"
            )


def _bound_hosts(sandbox: Sandbox, project: Path, env: str) -> dict[str, SshHost]:
    """Return the test host that the sandbox bound to each SSH host of the inventory."""
    path = sandbox.root / project / "inventories" / f"{env}.yaml"
    data = load_doc_yaml(path.read_text(encoding="utf-8"))
    bound: dict[str, SshHost] = {}
    for name, entry in data["hosts"].items():
        if (entry or {}).get("connection") == "local":
            continue
        matches = [
            h for h in sandbox.hosts if (h.address, h.port) == (entry["address"], entry["port"])
        ]
        assert matches, f"{name} in {path} is bound to no test host: {entry}"
        bound[name] = matches[0]
    return bound

"""The embedded default: ``inventories/local.yaml`` deploys the example service to this machine.

The test copies the repository's inventory, recipes and example into a temporary project and
runs the CLI there, with a free port in place of 8731 so a service of the checkout keeps running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e_helpers import CliResult, run_fraisier, wait_for_release
from support import REPO_ROOT, free_port


class LocalProject:
    """A copy of the repository's local environment in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(REPO_ROOT / "inventories", root / "inventories")
        shutil.copytree(REPO_ROOT / "tasks", root / "tasks")
        shutil.copytree(REPO_ROOT / "examples", root / "examples")
        self.port = free_port()
        inventory = root / "inventories" / "local.yaml"
        data = yaml.safe_load(inventory.read_text())
        assert data["fraises"]["hello"]["vars"]["port"] == 8731
        data["fraises"]["hello"]["vars"]["port"] = self.port
        inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        self.deploy_to = root / "var" / "deploy" / "hello"

    def fraisier(self, *args: str) -> CliResult:
        """Run a task of the local environment with the project as the working directory."""
        return run_fraisier(self.root, *args, "--env", "local", "--json")

    def current(self) -> str:
        """Return the release id that ``current`` links to."""
        return os.readlink(self.deploy_to / "current").rsplit("/", 1)[-1]

    def stop_service(self) -> None:
        """Send SIGTERM to the service whose pid is in ``shared/app.pid``, if it runs."""
        pid_file = self.deploy_to / "shared" / "app.pid"
        if not pid_file.is_file():
            return
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@pytest.fixture
def local_project(tmp_path: Path) -> Iterator[LocalProject]:
    """Return the temporary copy of the local environment; stop its service at teardown."""
    project = LocalProject(tmp_path)
    yield project
    project.stop_service()


def test_local_deploy_and_rollback(local_project: LocalProject) -> None:
    first = local_project.fraisier("deploy")

    assert first.returncode == 0, str(first)
    first_release = first.json()[0]["release"]
    assert first.json()[0]["hosts"][0]["host"] == "controller"
    assert local_project.current() == first_release
    assert (local_project.deploy_to / "releases" / first_release / "app.py").is_file()
    assert (local_project.root / "var" / "fraisier.db").is_file()
    assert wait_for_release("127.0.0.1", local_project.port, first_release) == first_release

    second = local_project.fraisier("deploy")

    assert second.returncode == 0, str(second)
    second_release = second.json()[0]["release"]
    assert second_release > first_release
    assert second.json()[0]["hosts"][0]["previous_release"] == first_release
    assert local_project.current() == second_release
    assert wait_for_release("127.0.0.1", local_project.port, second_release) == second_release

    back = local_project.fraisier("rollback")

    assert back.returncode == 0, str(back)
    assert back.json()[0]["hosts"][0]["final_release"] == first_release
    assert local_project.current() == first_release
    assert wait_for_release("127.0.0.1", local_project.port, first_release) == first_release

    listed = local_project.fraisier("releases")

    assert listed.returncode == 0, str(listed)
    row = listed.json()[0]
    assert row["current"] == first_release
    assert [r["id"] for r in row["releases"]] == [first_release, second_release]

"""Helpers of the end-to-end tests: the CLI runner and a test project on the ``ssh_hosts3`` hosts.

Every test drives ``python -m fraisier`` as a subprocess, so exit codes, stdout and stderr are
the ones an operator sees. The hosts are real sshd servers on 127.0.0.N, started by tests/support.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    REPO_ROOT,
    SshHost,
    bind_hosts_to_addresses,
    free_port,
    hello_fraise,
    http_request,
    write_inventory,
)

CLI_TIMEOUT = 120.0


@dataclasses.dataclass
class CliResult:
    """Exit code and output of one ``python -m fraisier`` process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Return stdout and stderr together, for checks on messages."""
        return self.stdout + "\n" + self.stderr

    def json(self) -> Any:
        """Parse stdout as JSON, failing with the whole output when it is not JSON."""
        try:
            return json.loads(self.stdout)
        except ValueError:
            pytest.fail(f"stdout of {self.args} is not JSON:\n{self}")

    def __str__(self) -> str:
        return (
            f"fraisier {' '.join(self.args)} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def cli_environment() -> dict[str, str]:
    """Return the environment of a CLI process: this checkout first on the path, no FRAISIER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    # The example service is on loopback, so requests to it must not go through a proxy.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(name, None)
    return env


def run_fraisier(
    cwd: Path, *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
) -> CliResult:
    """Run ``python -m fraisier ARGS`` in ``cwd`` and return its exit code and output.

    ``env`` adds or replaces environment variables of the process, such as ``HOME``.
    """
    completed = subprocess.run(
        [sys.executable, "-m", "fraisier", *args],
        cwd=cwd,
        env={**cli_environment(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(list(args), completed.returncode, completed.stdout, completed.stderr)


def fetch_release(address: str, port: int, timeout: float = 5.0) -> str | None:
    """Return the release id that the example service on ``address:port`` reports, or None."""
    try:
        status, body = http_request(f"http://{address}:{port}/", timeout=timeout)
    except OSError:
        return None
    if status != 200:
        return None
    return json.loads(body)["release"]


def wait_for_release(address: str, port: int, expected: str, timeout: float = 10.0) -> str | None:
    """Poll the example service until it reports ``expected`` and return the last release seen."""
    deadline = time.monotonic() + timeout
    seen = fetch_release(address, port)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = fetch_release(address, port)
    return seen


class TestProject:
    """A project directory whose ``inventories/test.yaml`` deploys ``hello`` to SSH hosts.

    Each host's service binds the host's own 127.0.0.N on one shared free port, so the tests
    reach every host's service separately. ``update()`` rewrites the inventory.
    """

    __test__ = False  # a helper class, not a pytest test class

    def __init__(self, root: Path, hosts: list[SshHost]) -> None:
        self.root = root
        self.hosts = hosts
        self.port = free_port(hosts[0].address)
        self.inventory = write_inventory(
            root,
            hosts,
            fraises={"hello": hello_fraise(10, 0.3, shared=["log"])},
            settings={"recipes_dir": str(REPO_ROOT / "tasks"), "connect_timeout": 5},
            vars={"port": self.port},
        )
        self.known_hosts = root / "known_hosts"
        bind_hosts_to_addresses(self.inventory, hosts)

    def data(self) -> dict[str, Any]:
        """Return a copy of the inventory as a dict."""
        return copy.deepcopy(yaml.safe_load(self.inventory.read_text()))

    def write(self, data: dict[str, Any]) -> None:
        """Replace the inventory with ``data``."""
        self.inventory.write_text(yaml.safe_dump(data, sort_keys=False))

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the inventory dict in place and write it back."""
        data = self.data()
        change(data)
        self.write(data)

    def source_copy(self, name: str, marker: str | None = None) -> Path:
        """Copy examples/hello to ``ROOT/NAME``, adding an empty file ``marker`` if given."""
        target = self.root / name
        target.mkdir()
        for entry in (REPO_ROOT / "examples" / "hello").iterdir():
            if entry.is_file():
                (target / entry.name).write_bytes(entry.read_bytes())
        if marker:
            (target / marker).write_text("")
        return target

    def use_source(self, directory: Path) -> None:
        """Point the ``hello`` fraise at another source directory."""

        def change(data: dict[str, Any]) -> None:
            data["fraises"]["hello"]["source"] = {"path": str(directory)}

        self.update(change)

    def fraisier(
        self, *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
    ) -> CliResult:
        """Run a task with ``--env test`` and ``--inventory`` set to this project's inventory."""
        return run_fraisier(
            self.root,
            *args,
            "--env",
            "test",
            "--inventory",
            str(self.inventory),
            timeout=timeout,
            env=env,
        )

    def deploy(self, *args: str, expect: int | None = 0) -> CliResult:
        """Run ``deploy --json`` and check its exit code, unless ``expect`` is None."""
        result = self.fraisier("deploy", "--json", "--log-format", "console", *args)
        if expect is not None:
            assert result.returncode == expect, str(result)
        return result

    def deployed_release(self, *args: str) -> str:
        """Deploy successfully and return the new release id."""
        runs = self.deploy(*args).json()
        assert len(runs) == 1, runs
        release = runs[0]["release"]
        assert release, runs
        return release

    def deploy_path(self, host: SshHost) -> Path:
        """Return the ``deploy_to`` of ``hello`` on ``host``, as seen from this machine."""
        return Path(host.deploy_root) / "hello"

    def releases_on(self, host: SshHost) -> list[str]:
        """Return the sorted release ids in ``releases/`` of ``host``."""
        releases = self.deploy_path(host) / "releases"
        return sorted(p.name for p in releases.iterdir()) if releases.is_dir() else []

    def state_of(self, host: SshHost, release: str) -> str:
        """Return the content of a release's ``.fraisier-state`` on ``host``."""
        path = self.deploy_path(host) / "releases" / release / ".fraisier-state"
        return path.read_text().strip()

    def current_on(self, host: SshHost) -> str | None:
        """Return the release id that ``current`` links to on ``host``, or None."""
        link = self.deploy_path(host) / "current"
        if not link.is_symlink():
            return None
        return os.readlink(link).rstrip("/").rsplit("/", 1)[-1]

"""A deploy lab for the fault tests on the three session SSH test hosts.

Each test builds an inventory for the ``hello`` example service with its own recipe and makes
one fault happen for real: a stopped, killed or frozen sshd, a failing command, a bad key or a
signal. It runs a deploy in the test process or in a subprocess. Then it checks each host's
``current`` link over SSH, the run record in the SQLite run database, the exit code, and that
no thread or SSH session outlives the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    REPO_ROOT,
    SshHost,
    bind_hosts_to_addresses,
    hello_fraise,
    testinfra_host_for,
    write_inventory,
)

from fraisier.app import run_task
from fraisier.db import open_store
from fraisier.db.base import RunDetail

FRAISE = "hello"
HELLO_SOURCE = REPO_ROOT / "examples" / "hello"

# Steps of tasks/api.yaml without the compileall build, which only costs time here.
STEPS_BEFORE_SWITCH: list[Any] = [{"builtin": "fetch"}, {"builtin": "link_shared"}]
STEPS_AFTER_SWITCH: list[Any] = [{"builtin": "restart"}]
STEPS_LAST: list[Any] = [{"builtin": "health_check"}, {"builtin": "cleanup"}]

# Seconds that threads of a finished run get to end before the test calls them leaked.
THREAD_SETTLE = 3.0


@dataclasses.dataclass
class Outcome:
    """Exit code, JSON summary, stderr and wall time of one deploy."""

    code: int
    summary: list[dict[str, Any]]
    stderr: str
    elapsed: float

    @property
    def run(self) -> dict[str, Any]:
        """The summary of the only fraise run."""
        assert len(self.summary) == 1, f"expected one fraise run in the summary: {self.summary}"
        return self.summary[0]

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    def host(self, name: str) -> dict[str, Any]:
        """Return the summary entry of host ``name``."""
        for entry in self.run["hosts"]:
            if entry["host"] == name:
                return entry
        raise AssertionError(f"host {name} is not in the summary: {self.run['hosts']}")


class Lab:
    """Inventory, recipe and deploy helpers bound to one test's hosts and tmp_path."""

    def __init__(
        self, hosts: list[SshHost], root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.hosts = hosts
        self.root = root
        self.capsys = capsys
        self.inventory_path = root / "inventories" / "test.yaml"
        self.database_url = f"sqlite:///{root / 'runs.db'}"

    # Inventory and recipes

    def write_recipe(
        self,
        before_switch: list[dict[str, Any]] | None = None,
        after_switch: list[dict[str, Any]] | None = None,
        name: str = "faulty",
    ) -> str:
        """Write ``tasks/NAME.yaml``: the api recipe with extra steps around ``switch``."""
        api = yaml.safe_load((REPO_ROOT / "tasks" / "api.yaml").read_text())
        recipe = {
            "description": "api recipe with fault steps",
            "vars": api["vars"],
            "restart": api["restart"],
            "steps": [
                *STEPS_BEFORE_SWITCH,
                *(before_switch or []),
                {"builtin": "switch"},
                *STEPS_AFTER_SWITCH,
                *(after_switch or []),
                *STEPS_LAST,
            ],
        }
        tasks = self.root / "tasks"
        tasks.mkdir(exist_ok=True)
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return name

    def source_with(self, marker: str) -> str:
        """Copy the hello example to a new folder with the file ``marker`` and return it."""
        target = self.root / f"hello-{marker.lower()}"
        shutil.copytree(HELLO_SOURCE, target)
        (target / marker).write_text("made by the fault tests\n")
        return str(target)

    def write_inventory(
        self,
        recipe: str = "faulty",
        source: str | None = None,
        settings: dict[str, Any] | None = None,
        fraise: dict[str, Any] | None = None,
        hosts: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write the inventory of the hello fraise on every host; return its path.

        ``fraise`` updates the fraise entry and ``hosts`` updates host entries by name.
        """
        if not (self.root / "tasks" / f"{recipe}.yaml").exists():
            self.write_recipe(name=recipe)
        overrides = {"recipe": recipe, "source": {"path": source or str(HELLO_SOURCE)}}
        entry = hello_fraise(20, 0.2, **{**overrides, **(fraise or {})})
        path = write_inventory(
            self.root,
            self.hosts,
            fraises={FRAISE: entry},
            settings={"connect_timeout": 5, **(settings or {})},
        )
        bind_hosts_to_addresses(path, self.hosts, hosts)
        return path

    # Running deploys

    def deploy(self, expect_sessions_closed: bool = True) -> Outcome:
        """Run ``deploy`` in this process and check that no thread or SSH session is left."""
        before = set(threading.enumerate())
        self.capsys.readouterr()
        started = time.monotonic()
        code = run_task("deploy", "test", inventory=str(self.inventory_path), output_json=True)
        elapsed = time.monotonic() - started
        stdout = self.capsys.readouterr().out
        self.assert_no_leaked_threads(before)
        if expect_sessions_closed:
            self.assert_no_sessions()
        return Outcome(code, parse_summary(stdout), "", elapsed)

    def deploy_ok(self) -> str:
        """Deploy the unchanged hello example and return the release id every host is on."""
        self.write_recipe(name="plain")
        self.write_inventory(recipe="plain")
        outcome = self.deploy()
        assert outcome.code == 0, f"the baseline deploy failed: {outcome.summary}"
        release = outcome.run["release"]
        for host in self.hosts:
            assert outcome.host(host.name)["final_release"] == release
        return str(release)

    def start_deploy(self, *extra: str) -> subprocess.Popen[str]:
        """Start ``python -m fraisier deploy --json`` in a subprocess and return it."""
        command = [
            sys.executable,
            "-m",
            "fraisier",
            "deploy",
            "--env",
            "test",
            "--inventory",
            str(self.inventory_path),
            "--json",
            "--log-format",
            "console",
            *extra,
        ]
        return subprocess.Popen(
            command,
            cwd=self.root,
            env=_clean_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def finish(process: subprocess.Popen[str], timeout: float = 60) -> Outcome:
        """Wait for a deploy subprocess and parse its JSON summary, if it printed one."""
        started = time.monotonic()
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"deploy did not exit within {timeout}s; stderr:\n{stderr[-3000:]}"
            ) from None
        summary = parse_summary(stdout)
        return Outcome(process.returncode, summary, stderr, time.monotonic() - started)

    # Checks

    def assert_no_leaked_threads(self, before: set[threading.Thread]) -> None:
        deadline = time.monotonic() + THREAD_SETTLE
        while True:
            leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
            if not leaked or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not leaked, f"threads left running after the deploy: {leaked}"

    def assert_no_sessions(self) -> None:
        # sshd ends a session process shortly after the client closes the connection.
        deadline = time.monotonic() + THREAD_SETTLE
        for host in self.hosts:
            while host.running and host.session_pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            if host.running:
                assert host.session_pids() == set(), f"SSH sessions left open on {host.name}"

    def current(self, host: SshHost) -> str | None:
        """Return the release id that ``current`` points to on ``host``, read over SSH."""
        if not host.running:
            host.start()
        remote = testinfra_host_for(host)
        try:
            link = remote.file(f"{host.deploy_root}/hello/current")
            if not link.exists:
                return None
            return Path(link.linked_to).name
        finally:
            remote.backend.__dict__.pop("client").close()

    def lock_exists(self, host: SshHost) -> bool:
        """Return whether the deploy lock directory is present on ``host``."""
        return Path(host.deploy_root, "hello", ".fraisier", "lock").exists()

    def release_state(self, host: SshHost, release: str) -> str:
        """Return the ``.fraisier-state`` of ``release`` on ``host``."""
        path = Path(host.deploy_root, "hello", "releases", release, ".fraisier-state")
        return path.read_text().strip()

    def show(self, run_id: str) -> dict[str, Any]:
        """Return the output of the ``show RUN_ID --json`` task, run in the lab's project."""
        result = subprocess.run(
            [sys.executable, "-m", "fraisier", "show", run_id, "--env", "test", "--json"],
            cwd=self.root,
            env=_clean_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"show {run_id} failed: {result.stderr[-2000:]}"
        return dict(json.loads(result.stdout))

    def run_detail(self, run_id: str) -> RunDetail:
        """Return the run, hosts and steps recorded for ``run_id`` in the run database."""
        store = open_store(self.database_url)
        try:
            detail = store.get_run(run_id)
        finally:
            store.close()
        assert detail is not None, f"run {run_id} is not in {self.database_url}"
        return detail


def _clean_environment() -> dict[str, str]:
    """Return this process's environment without the variables that choose another project."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("FRAISIER_PROJECT", None)
    environment.pop("FRAISIER_DATABASE_URL", None)
    return environment


def parse_summary(stdout: str) -> list[dict[str, Any]]:
    """Parse the JSON summary, skipping any log lines that a pytest live log sent to stdout."""
    lines = stdout.splitlines()
    if "[" not in lines:
        return []
    return json.loads("\n".join(lines[lines.index("[") :]))


def _command_line(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (FileNotFoundError, ProcessLookupError):
        return ""


def wait_for_process(host: SshHost, needle: str, timeout: float = 30.0) -> None:
    """Wait until a process of ``host``'s deploy user has ``needle`` in its command line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in _command_line(pid) for pid in host.user_pids()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no process with {needle!r} started on {host.name} within {timeout}s")


def send_signal(process: subprocess.Popen[str], number: int) -> None:
    """Send ``number`` to the deploy subprocess, as a terminal or a supervisor would."""
    process.send_signal(signal.Signals(number))

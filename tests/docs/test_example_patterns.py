"""The rolling, canary and health-rollback examples deploy to real test hosts as documented.

Each test deploys one project of ``examples/`` from inside its folder in a ``Sandbox``, with the
``fraisier`` console script, against the three sshd test hosts, and checks the outcome on the
hosts: the ``current`` link (through testinfra or the shared file system), the release states,
the release the example service answers with, the exit codes and the ``--json`` summaries.
Faults are real: a stopped sshd, a releases folder the deploy user cannot write, and a release
whose ``/health`` returns 500 because an ``UNHEALTHY`` file sits next to its ``app.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from docs_helpers import Sandbox
from support import SshHost, http_request

pytestmark = [pytest.mark.ssh, pytest.mark.monitoring, pytest.mark.timeout(300)]

HOSTS = ("web1", "web2", "web3")
PORT = 8731  # the port of the group "web" in every example inventory


# --- helpers ---------------------------------------------------------------------------------


def fraisier(sandbox: Sandbox, example: str, command: str) -> subprocess.CompletedProcess[str]:
    """Run ``fraisier COMMAND`` in ``examples/EXAMPLE`` of the sandbox; the exit is not checked."""
    return sandbox.shell(f"fraisier {command}", cwd=f"examples/{example}")


def run_json(result: subprocess.CompletedProcess[str]) -> Any:
    """Parse the ``--json`` output of a command, failing with its whole output otherwise."""
    try:
        return json.loads(result.stdout)
    except ValueError:
        pytest.fail(
            f"stdout is not JSON (exit {result.returncode}):\n{result.stdout}\n"
            f"{result.stderr[-4000:]}"
        )


def deploy(sandbox: Sandbox, example: str, expect_exit: int) -> dict[str, Any]:
    """Deploy the example with ``--json``, check the exit code and return the run summary."""
    result = fraisier(sandbox, example, "deploy --env prod --json")
    assert result.returncode == expect_exit, result.stdout + result.stderr[-4000:]
    [run] = run_json(result)
    assert run["exit_code"] == expect_exit
    return run


def hosts_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the host entries of a ``--json`` run summary by host name."""
    return {entry["host"]: entry for entry in run["hosts"]}


def host_for(sandbox: Sandbox, example: str, name: str) -> SshHost:
    """Return the test host that the sandbox bound to inventory host ``name`` of the example."""
    inventory = sandbox.root / "examples" / example / "inventories" / "prod.yaml"
    data = yaml.safe_load(inventory.read_text(encoding="utf-8"))
    host = sandbox.hosts[HOSTS.index(name)]
    assert data["hosts"][name]["address"] == host.address
    assert data["hosts"][name]["vars"]["deploy_root"] == host.deploy_root
    return host


def deploy_to(host: SshHost) -> Path:
    return Path(host.deploy_root) / "hello"


def current_release(testinfra_host: Any, host: SshHost) -> str:
    """Read the release that the ``current`` link points to, over SSH with testinfra."""
    link = testinfra_host(host).file(str(deploy_to(host) / "current"))
    assert link.is_symlink
    return Path(link.linked_to).name


def release_state(host: SshHost, release: str) -> str:
    """Read a release's ``.fraisier-state`` through the file system the test hosts share."""
    return (deploy_to(host) / "releases" / release / ".fraisier-state").read_text().strip()


def release_folders(host: SshHost) -> list[str]:
    return sorted(p.name for p in (deploy_to(host) / "releases").iterdir())


def served(host: SshHost) -> dict[str, Any]:
    """Return the JSON that the example service on ``host`` returns for ``/``."""
    status, body = http_request(f"http://{host.address}:{PORT}/")
    assert status == 200, body
    return json.loads(body)


def health_status(host: SshHost) -> int:
    status, _ = http_request(f"http://{host.address}:{PORT}/health")
    return status


def make_releases_read_only(host: SshHost) -> None:
    """Take the write permission off the host's releases folder, as a read-only disk would."""
    (deploy_to(host) / "releases").chmod(0o555)


def wait_for_switch(host: SshHost, old: str, process: subprocess.Popen[str]) -> None:
    """Wait until ``current`` on ``host`` leaves release ``old`` while ``process`` runs."""
    link = deploy_to(host) / "current"
    deadline = time.monotonic() + 60
    while Path(os.readlink(link)).name == old:
        assert process.poll() is None, f"the deploy ended before {host.name} switched"
        assert time.monotonic() < deadline, f"{host.name} did not switch within 60 s"
        time.sleep(0.01)


# --- rolling ---------------------------------------------------------------------------------


def test_rolling_host_stopped_mid_run(sandbox: Sandbox, testinfra_host: Any) -> None:
    web1, web2, web3 = (host_for(sandbox, "rolling", name) for name in HOSTS)
    first = deploy(sandbox, "rolling", 0)["release"]

    # web2's sshd stops while web1, the first batch, deploys: web2's batch then fails and the
    # run goes on with web3, because one failed host of three is within max_fail_percentage.
    process = subprocess.Popen(
        ["bash", "-c", "fraisier deploy --env prod --json"],
        cwd=sandbox.root / "examples" / "rolling",
        env=sandbox.environment(needs_venv=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_switch(web1, first, process)
        web2.stop()
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, stdout + stderr[-4000:]
    [run] = json.loads(stdout)
    second = run["release"]
    hosts = hosts_of(run)
    assert run["status"] == "failed"
    assert hosts["web1"]["status"] == "success"
    assert hosts["web1"]["final_release"] == second
    assert hosts["web2"]["status"] in ("failed", "unreachable")
    assert hosts["web2"]["final_release"] == first
    assert "web2" in hosts["web2"]["error"]
    assert hosts["web3"]["status"] == "success"
    assert hosts["web3"]["final_release"] == second
    assert current_release(testinfra_host, web1) == second
    assert current_release(testinfra_host, web3) == second
    assert served(web1)["release"] == second
    assert served(web3)["release"] == second
    # web2 cannot be reached, so its link is read through the shared file system.
    assert Path(os.readlink(deploy_to(web2) / "current")).name == first

    # After its sshd restarts, web2 still has the deploy lock of the run that lost it, so the
    # next deploy changes no host and exits 4 until the lock is removed.
    web2.start()
    assert current_release(testinfra_host, web2) == first
    blocked = deploy(sandbox, "rolling", 4)
    assert "stale deploy lock" in hosts_of(blocked)["web2"]["error"]
    assert {h["final_release"] for h in blocked["hosts"]} == {first, second}
    assert current_release(testinfra_host, web1) == second
    unlocked = fraisier(sandbox, "rolling", "unlock --env prod --fraise hello --host web2")
    assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr
    assert "web2: removed lock" in unlocked.stdout

    third = deploy(sandbox, "rolling", 0)
    assert third["status"] == "success"
    for host in (web1, web2, web3):
        assert current_release(testinfra_host, host) == third["release"]
        assert served(host)["release"] == third["release"]


def test_rolling_over_threshold_rolls_back(sandbox: Sandbox, testinfra_host: Any) -> None:
    web1, web2, web3 = (host_for(sandbox, "rolling", name) for name in HOSTS)
    first = deploy(sandbox, "rolling", 0)["release"]
    pid_before = served(web1)["pid"]
    make_releases_read_only(web2)
    make_releases_read_only(web3)

    run = deploy(sandbox, "rolling", 1)
    hosts = hosts_of(run)

    assert run["status"] == "rolled_back"
    assert hosts["web1"]["status"] == "rolled_back"
    assert hosts["web1"]["new_release"] == run["release"]
    assert hosts["web1"]["final_release"] == first
    for name in ("web2", "web3"):
        assert hosts[name]["status"] == "failed"
        assert hosts[name]["final_release"] == first
        assert "Permission denied" in hosts[name]["error"]
    for host in (web1, web2, web3):
        assert current_release(testinfra_host, host) == first
        assert served(host)["release"] == first
    # web1 switched, passed its health check, then went back and restarted on the old release.
    assert release_state(web1, run["release"]) == "failed"
    assert served(web1)["pid"] != pid_before
    assert release_folders(web2) == [first]
    history = run_json(fraisier(sandbox, "rolling", "history --env prod --json"))
    assert history[0]["run_id"] == run["run_id"]
    assert history[0]["rollback_reason"] == "run_failed"


def test_rolling_over_threshold_leave(sandbox: Sandbox, testinfra_host: Any) -> None:
    web1, web2, web3 = (host_for(sandbox, "rolling", name) for name in HOSTS)
    inventory = sandbox.root / "examples" / "rolling" / "inventories" / "prod.yaml"
    data = yaml.safe_load(inventory.read_text(encoding="utf-8"))
    data["settings"]["on_failure"] = "leave"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    first = deploy(sandbox, "rolling", 0)["release"]
    make_releases_read_only(web2)
    make_releases_read_only(web3)

    run = deploy(sandbox, "rolling", 1)
    hosts = hosts_of(run)

    assert run["status"] == "failed"
    assert hosts["web1"]["status"] == "success"
    assert hosts["web1"]["final_release"] == run["release"]
    assert current_release(testinfra_host, web1) == run["release"]
    assert served(web1)["release"] == run["release"]
    for name, host in (("web2", web2), ("web3", web3)):
        assert hosts[name]["final_release"] == first
        assert current_release(testinfra_host, host) == first
        assert served(host)["release"] == first


# --- canary ----------------------------------------------------------------------------------


def test_canary_stops_on_first_host(sandbox: Sandbox, testinfra_host: Any) -> None:
    web1, web2, web3 = (host_for(sandbox, "canary", name) for name in HOSTS)
    first = deploy(sandbox, "canary", 0)["release"]
    untouched_pids = {host.address: served(host)["pid"] for host in (web2, web3)}
    (sandbox.root / "examples" / "hello" / "UNHEALTHY").touch()

    run = deploy(sandbox, "canary", 1)
    hosts = hosts_of(run)

    assert run["status"] == "rolled_back"
    assert hosts["web1"]["status"] == "rolled_back"
    assert hosts["web1"]["final_release"] == first
    assert "health check failed on web1" in hosts["web1"]["error"]
    assert release_state(web1, run["release"]) == "failed"
    assert current_release(testinfra_host, web1) == first
    assert served(web1)["release"] == first
    assert health_status(web1) == 200
    for name, host in (("web2", web2), ("web3", web3)):
        assert hosts[name]["status"] == "skipped"
        assert hosts[name]["final_release"] == first
        assert hosts[name]["new_release"] is None
        # Nothing ran there: no new release folder, and the same service process serves.
        assert release_folders(host) == [first]
        assert current_release(testinfra_host, host) == first
        answer = served(host)
        assert answer["release"] == first
        assert answer["pid"] == untouched_pids[host.address]

    (sandbox.root / "examples" / "hello" / "UNHEALTHY").unlink()
    fixed = deploy(sandbox, "canary", 0)
    for host in (web1, web2, web3):
        assert current_release(testinfra_host, host) == fixed["release"]
        assert served(host)["release"] == fixed["release"]


# --- automatic rollback on a failed health check -------------------------------------------


def test_health_rollback_then_manual(sandbox: Sandbox, testinfra_host: Any) -> None:
    web = [host_for(sandbox, "health-rollback", name) for name in HOSTS]
    first = deploy(sandbox, "health-rollback", 0)["release"]
    second = deploy(sandbox, "health-rollback", 0)["release"]
    (sandbox.root / "examples" / "hello" / "UNHEALTHY").touch()

    bad = deploy(sandbox, "health-rollback", 1)

    assert bad["status"] == "rolled_back"
    for entry in bad["hosts"]:
        assert entry["status"] == "rolled_back"
        assert entry["previous_release"] == second
        assert entry["final_release"] == second
        assert "health check failed" in entry["error"]
    for host in web:
        assert release_state(host, bad["release"]) == "failed"
        assert current_release(testinfra_host, host) == second
        assert served(host)["release"] == second
        assert health_status(host) == 200
    history = run_json(fraisier(sandbox, "health-rollback", "history --env prod --json"))
    assert history[0]["run_id"] == bad["run_id"]
    assert history[0]["status"] == "rolled_back"
    assert history[0]["rollback_reason"] == "health_check"

    # A manual rollback goes to the newest good release before the current one.
    manual = fraisier(sandbox, "health-rollback", "rollback --env prod --json")
    assert manual.returncode == 0, manual.stdout + manual.stderr[-4000:]
    [back] = run_json(manual)
    assert back["status"] == "success"
    assert {entry["final_release"] for entry in back["hosts"]} == {first}
    for host in web:
        assert current_release(testinfra_host, host) == first
        assert served(host)["release"] == first
        assert release_state(host, second) == "rolled_back"

    # --to names a release. The failed one is rejected with exit 2, and no host changes.
    rejected = fraisier(sandbox, "health-rollback", f"rollback --env prod --to {bad['release']}")
    assert rejected.returncode == 2, rejected.stdout + rejected.stderr[-4000:]
    assert current_release(testinfra_host, web[0]) == first
    forward = fraisier(sandbox, "health-rollback", f"rollback --env prod --to {second} --json")
    assert forward.returncode == 0, forward.stdout + forward.stderr[-4000:]
    [again] = run_json(forward)
    assert {entry["final_release"] for entry in again["hosts"]} == {second}
    for host in web:
        assert current_release(testinfra_host, host) == second
        assert served(host)["release"] == second

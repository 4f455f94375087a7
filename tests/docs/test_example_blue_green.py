"""The blue-green example of docs/DEPLOYMENT_PATTERNS.md deploys, fails over and rolls back.

``examples/blue-green`` deploys the example service to two test hosts, each with two slots
(blue and green) behind a router on the public port. These tests read each slot and the router
over HTTP, and the slot state files on the hosts with testinfra.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from docs_helpers import Sandbox
from support import SshHost, http_request

EXAMPLE = "examples/blue-green"
# The failed deploy exits with DEPLOY_FAILED (docs/exit-codes.md).
DEPLOY_FAILED = 1

pytestmark = [pytest.mark.ssh, pytest.mark.monitoring, pytest.mark.timeout(300)]


def fraisier(sandbox: Sandbox, arguments: str, expect: int = 0) -> dict[str, Any]:
    """Run ``fraisier ARGUMENTS --json`` in the example and return the run's JSON record."""
    result = sandbox.shell(f"fraisier {arguments} --json", cwd=EXAMPLE)
    assert result.returncode == expect, result.stderr[-4000:]
    runs = json.loads(result.stdout)
    assert len(runs) == 1, runs
    return runs[0]


def ports(sandbox: Sandbox) -> dict[str, int]:
    """Return the router's and the slots' ports from the example's inventory."""
    inventory = yaml.safe_load((sandbox.root / EXAMPLE / "inventories/prod.yaml").read_text())
    web = inventory["groups"]["web"]["vars"]
    return {"router": web["port"], "blue": web["blue_port"], "green": web["green_port"]}


def serving(host: SshHost, port: int) -> dict[str, Any]:
    """Send GET / to the service at ``port`` of ``host`` and return its JSON body."""
    status, body = http_request(f"http://{host.address}:{port}/", timeout=2)
    assert status == 200, body
    return json.loads(body)


def shared_file(testinfra_host: Callable[[SshHost], Any], host: SshHost, name: str) -> str:
    """Return the content of ``shared/NAME`` of the example on ``host``, read over SSH."""
    path = f"{host.deploy_root}/hello/shared/{name}"
    return testinfra_host(host).file(path).content_string.strip()


class RouterPoller(threading.Thread):
    """Sends GET / to a host's router in a loop and records the release or error it returns.

    Each record also has the release that the host's ``current`` link named just before the
    request. The test hosts share this machine's file system, so the link is read directly.
    """

    def __init__(self, host: SshHost, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{host.address}:{port}/"
        self.current_link = Path(host.deploy_root) / "hello" / "current"
        self.records: list[tuple[float, str, str]] = []  # (time, current link, release)
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            current = os.path.basename(os.readlink(self.current_link))
            try:
                status, body = http_request(self.url, timeout=2)
            except OSError as exc:
                self.failures.append(f"{self.url}: {exc}")
            else:
                if status == 200:
                    release = json.loads(body)["release"]
                    self.records.append((time.monotonic(), current, release))
                else:
                    self.failures.append(f"{self.url}: HTTP {status}: {body[:200]!r}")
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def releases_served(self) -> list[str]:
        """Return the releases the router returned, in order, with repeats merged."""
        served: list[str] = []
        for _, _, release in self.records:
            if not served or served[-1] != release:
                served.append(release)
        return served


def deploy_twice(sandbox: Sandbox) -> tuple[str, str]:
    first = fraisier(sandbox, "deploy --env prod")["release"]
    second = fraisier(sandbox, "deploy --env prod")["release"]
    return first, second


def test_two_deploys_fill_both_slots(
    sandbox: Sandbox, testinfra_host: Callable[[SshHost], Any]
) -> None:
    port = ports(sandbox)
    hosts = sandbox.hosts[:2]

    first = fraisier(sandbox, "deploy --env prod")["release"]
    routers = {h.address: shared_file(testinfra_host, h, "router.pid") for h in hosts}
    second = fraisier(sandbox, "deploy --env prod")["release"]

    assert first != second
    for host in hosts:
        assert serving(host, port["router"])["release"] == second
        assert serving(host, port["green"])["release"] == second
        assert serving(host, port["blue"])["release"] == first
        assert shared_file(testinfra_host, host, "live") == str(port["green"])
        # The router kept running across the second deploy.
        assert shared_file(testinfra_host, host, "router.pid") == routers[host.address]
        assert testinfra_host(host).file(f"/proc/{routers[host.address]}").exists
        current = testinfra_host(host).file(f"{host.deploy_root}/hello/current")
        assert current.linked_to == f"{host.deploy_root}/hello/releases/{second}"


def test_router_answers_during_deploy(sandbox: Sandbox) -> None:
    port = ports(sandbox)
    first = fraisier(sandbox, "deploy --env prod")["release"]
    pollers = [RouterPoller(host, port["router"]) for host in sandbox.hosts[:2]]
    for poller in pollers:
        poller.start()

    try:
        second = fraisier(sandbox, "deploy --env prod")["release"]
        time.sleep(0.2)
    finally:
        for poller in pollers:
            poller.stop()

    for poller in pollers:
        assert poller.failures == []
        assert len(poller.records) > 20
        assert poller.releases_served() == [first, second]


def test_failed_health_check_switches_back(
    sandbox: Sandbox, testinfra_host: Callable[[SshHost], Any]
) -> None:
    port = ports(sandbox)
    hosts = sandbox.hosts[:2]
    _, good = deploy_twice(sandbox)
    live_pids = {h.address: serving(h, port["router"])["pid"] for h in hosts}
    # The next release fails its health check once it gets traffic through the router.
    (sandbox.root / "examples/hello/UNHEALTHY").write_text("")
    pollers = [RouterPoller(host, port["router"]) for host in hosts]
    for poller in pollers:
        poller.start()

    try:
        run = fraisier(sandbox, "deploy --env prod", expect=DEPLOY_FAILED)
    finally:
        for poller in pollers:
            poller.stop()

    bad = run["release"]
    assert run["status"] == "rolled_back"
    assert [h["final_release"] for h in run["hosts"]] == [good, good]
    for host, poller in zip(hosts, pollers, strict=True):
        answer = serving(host, port["router"])
        assert answer["release"] == good
        # The slot that ran the good release was never restarted.
        assert answer["pid"] == live_pids[host.address]
        assert shared_file(testinfra_host, host, "live") == str(port["green"])
        # The failed release stays in the idle slot, off the router.
        assert serving(host, port["blue"])["release"] == bad
        assert poller.failures == []
        assert poller.releases_served()[0] == good
        assert poller.releases_served()[-1] == good


def test_rollback_switches_back_instantly(
    sandbox: Sandbox, testinfra_host: Callable[[SshHost], Any]
) -> None:
    port = ports(sandbox)
    hosts = sandbox.hosts[:2]
    first, second = deploy_twice(sandbox)
    blue_pids = {h.address: serving(h, port["blue"])["pid"] for h in hosts}
    pollers = [RouterPoller(host, port["router"]) for host in hosts]
    for poller in pollers:
        poller.start()

    try:
        run = fraisier(sandbox, "rollback --env prod")
        time.sleep(0.2)
    finally:
        for poller in pollers:
            poller.stop()

    assert [h["final_release"] for h in run["hosts"]] == [first, first]
    for host, poller in zip(hosts, pollers, strict=True):
        answer = serving(host, port["router"])
        assert answer["release"] == first
        assert answer["pid"] == blue_pids[host.address]
        assert shared_file(testinfra_host, host, "live") == str(port["blue"])
        assert poller.failures == []
        assert poller.releases_served() == [second, first]
        # From the first request sent after "current" named the old release to the first
        # response from that release: the time "restart" needs to move the router.
        switched = next(t for t, current, _ in poller.records if current == first)
        served = next(t for t, _, release in poller.records if release == first)
        assert served - switched < 1.0, f"the router needed {served - switched:.3f} s"


def test_deploy_after_reboot_restarts_router(
    sandbox: Sandbox, testinfra_host: Callable[[SshHost], Any]
) -> None:
    port = ports(sandbox)
    hosts = sandbox.hosts[:2]
    deploy_twice(sandbox)
    # A reboot: every process of the deploy user ends, the files in shared/ stay.
    for host in hosts:
        host.kill_sessions()
        with pytest.raises(OSError):
            http_request(f"http://{host.address}:{port['router']}/", timeout=2)

    third = fraisier(sandbox, "deploy --env prod")["release"]

    for host in hosts:
        assert serving(host, port["router"])["release"] == third
        assert serving(host, port["blue"])["release"] == third
        assert shared_file(testinfra_host, host, "live") == str(port["blue"])


def test_rollback_to_stopped_slot_fails_loudly(sandbox: Sandbox) -> None:
    import signal

    port = ports(sandbox)
    host = sandbox.hosts[0]
    _first, second = deploy_twice(sandbox)
    blue_pid = serving(host, port["blue"])["pid"]
    # The idle slot, which still runs the first release, stops responding.
    os.kill(blue_pid, signal.SIGSTOP)
    try:
        run = fraisier(sandbox, "rollback --env prod", expect=3)
        answer = serving(host, port["router"])
    finally:
        os.kill(blue_pid, signal.SIGCONT)

    entry = {h["host"]: h for h in run["hosts"]}["web1"]
    assert entry["status"] == "failed"
    assert "does not answer" in entry["error"]
    # Traffic stayed on the slot that responds.
    assert answer["release"] == second

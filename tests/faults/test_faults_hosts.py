"""Host faults: sshd stopped, killed or frozen, a refused key and a changed host key."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from faultlab import Lab, wait_for_process

from fraisier.errors import ExitCode


def test_unreachable_host_stops_run_unchanged(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe()
    lab.write_inventory()
    h3.stop()

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "failed"
    assert outcome.host(h3.name)["status"] == "unreachable"
    assert "refused; is sshd running" in outcome.host(h3.name)["error"]
    # Every host is connected to before any changes, so with max_fail_percentage 0 an
    # unreachable host stops the run while the others are still on their release.
    for host in (h1, h2):
        assert outcome.host(host.name)["status"] == "skipped"
        assert outcome.host(host.name)["final_release"] == release_a
    # The run never reached h3, so the summary has no release for it.
    assert outcome.host(h3.name)["final_release"] is None
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "failed"
    assert detail.run.exit_code == ExitCode.DEPLOY_FAILED
    statuses = {h.host: h.status for h in detail.hosts}
    assert statuses == {h1.name: "skipped", h2.name: "skipped", h3.name: "unreachable"}


def test_unreachable_host_within_threshold(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe()
    lab.write_inventory(settings={"max_fail_percentage": 50})
    h3.stop()

    outcome = lab.deploy()

    release_b = outcome.run["release"]
    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "failed"
    assert lab.current(h1) == release_b
    assert lab.current(h2) == release_b
    assert lab.current(h3) == release_a
    assert outcome.host(h3.name)["status"] == "unreachable"
    assert lab.run_detail(outcome.run_id).run.status == "failed"


def test_sshd_killed_before_switch(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h3 = lab.hosts[2]
    lab.write_recipe(before_switch=[{"name": "settle", "run": "sleep 2", "cwd": "deploy_to"}])
    lab.write_inventory()

    def kill_during_sleep() -> None:
        wait_for_process(h3, "sleep 2")
        h3.kill()

    killer = threading.Thread(target=kill_during_sleep)
    killer.start()
    outcome = lab.deploy()
    killer.join()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "rolled_back"
    assert outcome.host(h3.name)["status"] == "failed"
    assert outcome.host(h3.name)["final_release"] == release_a
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    steps = {(s.host, s.name): s for s in detail.steps}
    assert steps[(h3.name, "settle")].status == "failed"
    settle = steps[(h3.name, "settle")]
    assert settle.error_code in ("channel_closed", "connection_lost"), settle
    assert detail.run.status == "rolled_back"


def test_sshd_killed_after_switch(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe(after_switch=[{"name": "settle", "run": "sleep 2", "cwd": "deploy_to"}])
    lab.write_inventory()

    def kill_during_sleep() -> None:
        wait_for_process(h3, "sleep 2")
        h3.kill()

    killer = threading.Thread(target=kill_during_sleep)
    killer.start()
    outcome = lab.deploy()
    killer.join()

    release_b = outcome.run["release"]
    # h3 was switched, then lost: its rollback cannot run, so the operator must act.
    assert outcome.code == ExitCode.ROLLBACK_FAILED
    assert outcome.run["status"] == "failed"
    assert outcome.host(h3.name)["status"] == "failed"
    assert "rollback" in outcome.host(h3.name)["error"]
    assert lab.current(h3) == release_b
    for host in (h1, h2):
        assert outcome.host(host.name)["status"] == "rolled_back"
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.exit_code == ExitCode.ROLLBACK_FAILED
    assert {h.host: h.error_code for h in detail.hosts}[h3.name] == "rollback_failed"


def test_frozen_session_times_out(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h3 = lab.hosts[2]
    lab.write_recipe(
        before_switch=[{"name": "settle", "run": "sleep 1", "timeout": 3, "cwd": "deploy_to"}]
    )
    lab.write_inventory()

    def freeze_during_sleep() -> None:
        wait_for_process(h3, "sleep 1")
        h3.freeze()

    freezer = threading.Thread(target=freeze_during_sleep)
    freezer.start()
    outcome = lab.deploy(expect_sessions_closed=False)
    freezer.join()

    # The step times out after 3 s and the kill channel after 5 s. The transport then drops
    # the frozen connection, so marking the release failed and releasing the lock reconnect.
    assert outcome.elapsed < 25, f"the deploy took {outcome.elapsed:.1f}s"
    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.host(h3.name)["status"] == "failed"
    error = outcome.host(h3.name)["error"]
    assert "timed out after 3s" in error
    assert "killing it failed" in error
    assert not lab.lock_exists(h3)
    assert lab.release_state(h3, outcome.run["release"]) == "failed"
    h3.thaw()
    lab.assert_no_sessions()
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    steps = {(s.host, s.name): s for s in detail.steps}
    assert steps[(h3.name, "settle")].status == "timeout"
    assert detail.run.status == "rolled_back"


def test_wrong_identity_file_rejected(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h3 = lab.hosts[0], lab.hosts[2]
    lab.write_recipe()
    lab.write_inventory(hosts={h3.name: {"identity_file": h1.identity_file}})

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.host(h3.name)["status"] == "failed"
    assert "authentication" in outcome.host(h3.name)["error"]
    assert f"user '{h3.user}' on {h3.address}:{h3.port}" in outcome.host(h3.name)["error"]
    assert f"offering {h1.identity_file}" in outcome.host(h3.name)["error"]
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert {h.host: h.error_code for h in detail.hosts}[h3.name] == "authentication_failed"
    h3_steps = [s.name for s in detail.steps if s.host == h3.name]
    assert h3_steps == ["connect"]


def test_changed_host_key_rejected(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe()
    inventory = lab.write_inventory()
    wrong = Path(h3.wrong_known_hosts()).read_text()
    known_hosts = Path(lab.root / "known_hosts")
    known_hosts.write_text(f"{h1.known_hosts_line}\n{h2.known_hosts_line}\n{wrong}")
    assert inventory.exists()

    started = time.monotonic()
    outcome = lab.deploy()

    assert time.monotonic() - started < 30
    assert outcome.code == ExitCode.DEPLOY_FAILED
    error = outcome.host(h3.name)["error"]
    assert "changed" in error
    assert "expected ssh-ed25519 SHA256:" in error
    assert "received ssh-ed25519 SHA256:" in error
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert {h.host: h.error_code for h in detail.hosts}[h3.name] == "host_key_changed"
    assert [s.name for s in detail.steps if s.host == h3.name] == ["connect"]


def test_restart_fails_after_rollback_switch(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1 = lab.hosts[0]
    # The old release no longer starts on h1, so the restart that follows the rollback's
    # switch fails there, while "current" already points back at release A.
    broken = Path(h1.deploy_root) / "hello" / "releases" / release_a / "app.py"
    broken.write_text('raise SystemExit("cannot start")\n')
    lab.write_recipe(name="plain")
    lab.write_inventory(recipe="plain", source=lab.source_with("UNHEALTHY"))

    outcome = lab.deploy()

    assert outcome.code == ExitCode.ROLLBACK_FAILED
    assert outcome.host(h1.name)["status"] == "failed"
    assert "rollback" in outcome.host(h1.name)["error"]
    assert lab.current(h1) == release_a
    assert outcome.host(h1.name)["final_release"] == release_a
    detail = lab.run_detail(outcome.run_id)
    assert {h.host: h.final_release for h in detail.hosts}[h1.name] == release_a

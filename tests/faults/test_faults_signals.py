"""SIGINT and SIGTERM sent to a deploy subprocess while a step runs on the hosts."""

from __future__ import annotations

import signal
import time

from faultlab import Lab, send_signal, wait_for_process

from fraisier.errors import ExitCode

SETTLE = {"name": "settle", "run": "sleep 3", "cwd": "deploy_to"}


def test_sigint_rolls_back_and_exits_130(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe(after_switch=[SETTLE])
    lab.write_inventory(settings={"serial": 1})

    process = lab.start_deploy()
    # h1's batch ends before h2 starts, so h2 running its sleep means h1 is switched.
    wait_for_process(h2, "sleep 3")
    signalled = time.monotonic()
    send_signal(process, signal.SIGINT)
    outcome = lab.finish(process)

    assert outcome.code == ExitCode.INTERRUPTED_SIGINT, outcome.stderr[-3000:]
    assert "SIGINT received" in outcome.stderr
    # The running sleep ends on its own (3 s at most), then two hosts roll back.
    assert time.monotonic() - signalled < 20
    assert outcome.run["status"] == "interrupted"
    assert outcome.host(h1.name)["status"] == "rolled_back"
    assert outcome.host(h2.name)["status"] == "rolled_back"
    assert outcome.host(h3.name)["status"] == "skipped"
    lab.assert_no_sessions()
    for host in lab.hosts:
        assert lab.current(host) == release_a
        assert not lab.lock_exists(host)
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "interrupted"
    assert detail.run.exit_code == ExitCode.INTERRUPTED_SIGINT
    assert detail.run.rollback_reason == "interrupted"
    show_output = lab.show(outcome.run_id)
    assert show_output["run"]["status"] == "interrupted"
    assert show_output["run"]["exit_code"] == ExitCode.INTERRUPTED_SIGINT
    assert {h["host"]: h["final_release"] for h in show_output["hosts"]}[h1.name] == release_a
    settle = {s.host: s for s in detail.steps if s.name == "settle"}
    # The step that was running when SIGINT arrived finished instead of being killed.
    assert settle[h2.name].status == "success"
    assert h3.name not in settle


def test_sigterm_rolls_back_and_exits_143(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(after_switch=[SETTLE])
    lab.write_inventory()

    process = lab.start_deploy()
    for host in lab.hosts:
        wait_for_process(host, "sleep 3")
    send_signal(process, signal.SIGTERM)
    outcome = lab.finish(process)

    assert outcome.code == ExitCode.INTERRUPTED_SIGTERM, outcome.stderr[-3000:]
    assert "SIGTERM received" in outcome.stderr
    assert outcome.run["status"] == "interrupted"
    for host in lab.hosts:
        assert outcome.host(host.name)["status"] == "rolled_back"
        assert outcome.host(host.name)["final_release"] == release_a
        assert lab.current(host) == release_a
        assert not lab.lock_exists(host)
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "interrupted"
    assert detail.run.exit_code == ExitCode.INTERRUPTED_SIGTERM


def test_second_sigint_exits_at_once(lab: Lab) -> None:
    lab.deploy_ok()
    lab.write_recipe(after_switch=[{"name": "settle", "run": "sleep 8", "cwd": "deploy_to"}])
    lab.write_inventory()

    process = lab.start_deploy()
    for host in lab.hosts:
        wait_for_process(host, "sleep 8")
    send_signal(process, signal.SIGINT)
    time.sleep(0.3)
    signalled = time.monotonic()
    send_signal(process, signal.SIGINT)
    outcome = lab.finish(process, timeout=10)

    assert outcome.code == ExitCode.INTERRUPTED_SIGINT
    assert time.monotonic() - signalled < 3, "the second SIGINT did not exit at once"
    assert "second interrupt" in outcome.stderr
    for host in lab.hosts:
        assert f"{host.name}: switched to" in outcome.stderr
    assert "fraisier unlock" in outcome.stderr
    # No summary: the process exited without cleanup and printed the host states instead.
    assert outcome.summary == []


def test_sigint_ends_retry_wait(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(
        before_switch=[
            {
                "name": "flaky",
                "run": "echo flaky-marker; exit 1",
                "retries": 3,
                "retry_delay": 30,
            }
        ]
    )
    lab.write_inventory()

    process = lab.start_deploy()
    # Wait until every host logged its first failed attempt; each then waits 30 s.
    assert process.stderr is not None
    waiting = 0
    while waiting < len(lab.hosts):
        line = process.stderr.readline()
        assert line, "the deploy ended before every host started its retry wait"
        waiting += "retrying in" in line
    signalled = time.monotonic()
    send_signal(process, signal.SIGINT)
    outcome = lab.finish(process)

    assert outcome.code == ExitCode.INTERRUPTED_SIGINT, outcome.stderr[-3000:]
    assert time.monotonic() - signalled < 10, "SIGINT did not end the retry wait"
    assert outcome.run["status"] == "interrupted"
    for host in lab.hosts:
        assert outcome.host(host.name)["status"] == "failed"
        assert lab.current(host) == release_a
        assert not lab.lock_exists(host)
    detail = lab.run_detail(outcome.run_id)
    flaky = {s.host: s for s in detail.steps if s.name == "flaky"}
    assert set(flaky) == {h.name for h in lab.hosts}
    for step in flaky.values():
        assert step.attempts == 1
        assert step.status == "failed"

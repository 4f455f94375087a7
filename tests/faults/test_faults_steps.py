"""Step faults: a failing command, retries, health checks and output that is not UTF-8."""

from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

from faultlab import Lab

from fraisier.errors import ExitCode


def test_failing_command_reports_exit_and_stderr(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(
        before_switch=[
            {"name": "migrate", "run": "echo starting; echo 'table users is locked' >&2; exit 3"}
        ]
    )
    lab.write_inventory()

    outcome = lab.deploy()

    release_b = outcome.run["release"]
    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "failed"
    for host in lab.hosts:
        entry = outcome.host(host.name)
        assert entry["status"] == "failed"
        assert entry["final_release"] == release_a
        assert "'migrate' exited 3" in entry["error"]
        assert "table users is locked" in entry["error"]
        assert lab.current(host) == release_a
        assert lab.release_state(host, release_b) == "failed"
        assert not lab.lock_exists(host)
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "failed"
    assert detail.run.error_code == "command_failed"
    migrate = [s for s in detail.steps if s.name == "migrate"]
    assert len(migrate) == 3
    for step in migrate:
        assert step.status == "failed"
        assert step.exit_status == 3
        assert "table users is locked" in step.stderr_tail
        assert "starting" in step.stdout_tail
    assert not [s for s in detail.steps if s.name == "switch"]


def test_step_retries_until_success(lab: Lab) -> None:
    prefix = f"/tmp/fraisier-fault-counter-{uuid.uuid4().hex}"
    counter = f"{prefix}-{{{{ host | raw }}}}"
    lab.write_recipe(
        before_switch=[
            {
                "name": "flaky",
                "run": (
                    f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); "
                    f'echo "$n" > {counter}; echo "attempt $n" >&2; [ "$n" -ge 3 ]'
                ),
                "retries": 2,
                "retry_delay": 0.1,
            }
        ]
    )
    lab.write_inventory()

    try:
        outcome = lab.deploy()
    finally:
        for path in glob.glob(f"{prefix}-*"):
            os.remove(path)

    release = outcome.run["release"]
    assert outcome.code == ExitCode.SUCCESS, outcome.summary
    for host in lab.hosts:
        assert lab.current(host) == release
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "success"
    flaky = {s.host: s for s in detail.steps if s.name == "flaky"}
    assert set(flaky) == {h.name for h in lab.hosts}
    for step in flaky.values():
        assert step.status == "success"
        assert step.attempts == 3


def test_step_retries_exhausted(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(
        before_switch=[{"name": "flaky", "run": "exit 7", "retries": 1, "retry_delay": 0.1}]
    )
    lab.write_inventory()

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    for step in (s for s in detail.steps if s.name == "flaky"):
        assert step.status == "failed"
        assert step.attempts == 2
        assert step.exit_status == 7


def test_health_check_passes_on_retry(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_inventory(source=lab.source_with("UNHEALTHY_ONCE"))

    outcome = lab.deploy()

    release_b = outcome.run["release"]
    assert outcome.code == ExitCode.SUCCESS, outcome.summary
    assert release_b != release_a
    for host in lab.hosts:
        assert outcome.host(host.name)["final_release"] == release_b
        assert lab.current(host) == release_b
        assert lab.release_state(host, release_b) == "healthy"
        # The service deletes UNHEALTHY_ONCE when it returns 500 to the first check.
        release_dir = Path(host.deploy_root, "hello", "releases", release_b)
        assert not (release_dir / "UNHEALTHY_ONCE").exists()
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "success"
    checks = [s for s in detail.steps if s.name == "health_check"]
    assert len(checks) == 3
    for step in checks:
        assert step.status == "success"
        # The service was still starting or returned 500 once, so every host needed a retry.
        assert step.attempts >= 2


def test_health_check_failure_rolls_back(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_inventory(
        source=lab.source_with("UNHEALTHY"),
        fraise={
            "health_check": {
                "url": "http://{{ bind }}:{{ port }}/health",
                "retries": 3,
                "delay": 0.2,
                "timeout": 2,
            }
        },
    )

    outcome = lab.deploy()

    release_b = outcome.run["release"]
    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "rolled_back"
    for host in lab.hosts:
        entry = outcome.host(host.name)
        assert entry["status"] == "rolled_back"
        assert entry["final_release"] == release_a
        assert "health check failed" in entry["error"]
        assert lab.current(host) == release_a
        assert lab.release_state(host, release_b) == "failed"
        assert not lab.lock_exists(host)
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "rolled_back"
    assert detail.run.rollback_reason == "health_check"
    assert detail.run.error_code == "health_check_failed"
    checks = [s for s in detail.steps if s.name == "health_check"]
    assert [s.attempts for s in checks] == [4, 4, 4]
    rollbacks = [s for s in detail.steps if s.name == "rollback"]
    assert [s.status for s in rollbacks] == ["success"] * 3


def test_invalid_utf8_output(lab: Lab) -> None:
    lab.write_recipe(
        before_switch=[
            {"name": "binary", "run": r"printf 'ok\377\376\n'; printf 'warn\377\n' >&2; true"}
        ]
    )
    lab.write_inventory()

    outcome = lab.deploy()

    release = outcome.run["release"]
    assert outcome.code == ExitCode.SUCCESS, outcome.summary
    for host in lab.hosts:
        assert lab.current(host) == release
    detail = lab.run_detail(outcome.run_id)
    steps = [s for s in detail.steps if s.name == "binary"]
    assert len(steps) == 3
    for step in steps:
        assert step.status == "success"
        assert step.stdout_tail == "ok\ufffd\ufffd\n"
        assert step.stderr_tail == "warn\ufffd\n"


def test_invalid_utf8_in_failure(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(before_switch=[{"name": "binary", "run": r"printf 'bad\377\376' >&2; exit 2"}])
    lab.write_inventory()

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    for host in lab.hosts:
        assert "bad\ufffd\ufffd" in outcome.host(host.name)["error"]
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "failed"


def _marker_steps(fail_on: str) -> list[dict[str, object]]:
    """Steps before the switch: one that writes a marker and can undo it, then one that fails."""
    return [
        {
            "name": "mark",
            "run": "echo migrated > ../../shared-marker",
            "rollback": "rm ../../shared-marker",
        },
        {"name": "breaks", "run": fail_on},
    ]


def test_failure_before_switch_undoes_steps(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    lab.write_recipe(before_switch=_marker_steps("exit 7"))
    lab.write_inventory()

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    for host in lab.hosts:
        assert lab.current(host) == release_a
        assert not (Path(host.deploy_root) / "hello" / "shared-marker").exists(), host.name
    detail = lab.run_detail(outcome.run_id)
    undo = [s for s in detail.steps if s.name == "undo"]
    assert len(undo) == len(lab.hosts)
    assert all(s.status == "success" for s in undo), undo


def test_failed_undo_before_switch_exits_3(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    steps = _marker_steps("exit 7")
    steps[0]["rollback"] = "echo cannot undo >&2; exit 5"
    lab.write_recipe(before_switch=steps)
    lab.write_inventory()

    outcome = lab.deploy()

    assert outcome.code == ExitCode.ROLLBACK_FAILED
    host = lab.hosts[0]
    assert lab.current(host) == release_a
    assert outcome.host(host.name)["status"] == "failed"
    assert "undoing the completed steps" in outcome.host(host.name)["error"]
    assert (Path(host.deploy_root) / "hello" / "shared-marker").exists()

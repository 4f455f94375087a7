"""A fixed run history for the store tests, and the aggregates it must give."""

from __future__ import annotations

import datetime as dt

from fraisier.records import AuditEvent, HostRecord, RunRecord, StepRecord

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def at(seconds: float) -> dt.datetime:
    """Return T0 plus ``seconds``."""
    return T0 + dt.timedelta(seconds=seconds)


def _steps(run_id: str, host: str, start: float, health: float, ok: bool) -> list[StepRecord]:
    names = ["fetch", "build", "switch", "health_check"]
    steps = []
    clock = start
    for position, name in enumerate(names, start=1):
        duration = health if name == "health_check" else 1.0
        failed = name == "health_check" and not ok
        steps.append(
            StepRecord(
                run_id=run_id,
                host=host,
                position=position,
                name=name,
                status="failed" if failed else "success",
                started_at=at(clock),
                ended_at=at(clock + duration),
                attempts=3 if failed else 1,
                exit_status=1 if failed else 0,
                stdout_tail=f"{name} on {host}\n",
                stderr_tail="curl: (7) Failed to connect\n" if failed else "",
                error_code="health_check_failed" if failed else None,
            )
        )
        clock += duration
    return steps


def build_history() -> tuple[list[RunRecord], list[HostRecord], list[StepRecord], list[AuditEvent]]:
    """Return the runs, hosts, steps and events of the fixed history."""
    runs = [
        RunRecord("run-1", "prod", "api", "deploy", at(0), "success", "rel-1", "main", "a1b2c3",
                  "alice", "laptop-1", None, at(60), 0, config_digest="d1"),
        RunRecord("run-2", "prod", "api", "deploy", at(100), "rolled_back", "rel-2", "main",
                  "d4e5f6", "bob", "ci-runner", "https://ci.example/job/7", at(190), 1,
                  "health_check_failed", "health check of web1 failed", "health_check",
                  "d2", "pushgateway returned 400"),
        RunRecord("run-3", "prod", "api", "deploy", at(200), "failed", None, "v9", None, "carol",
                  "laptop-2", None, at(203), 2, "configuration_error", "missing key 'hosts'"),
        RunRecord("run-4", "prod", "api", "rollback", at(300), "success", "rel-1", None, None,
                  "alice", "laptop-1", None, at(320), 0),
        RunRecord("run-5", "prod", "api", "deploy", at(400), "running", "rel-3", "main",
                  "0f0f0f", "dave", "cron-1"),
        RunRecord("run-6", "staging", "etl", "deploy", at(50), "success", "rel-9", "main",
                  "999999", "erin", "ci-runner", None, at(80), 0),
    ]  # fmt: skip
    hosts = [
        HostRecord("run-1", "web1", "success", None, "rel-1", "rel-1", at(0), at(30)),
        HostRecord("run-1", "web2", "success", None, "rel-1", "rel-1", at(0), at(31)),
        HostRecord("run-2", "web1", "rolled_back", "rel-1", "rel-2", "rel-1", at(100), at(190),
                   "health_check_failed", "health check failed after 3 attempts"),
        HostRecord("run-2", "web2", "rolled_back", "rel-1", "rel-2", "rel-1", at(100), at(180)),
        HostRecord("run-4", "web1", "success", "rel-1", "rel-1", "rel-1", at(300), at(310)),
        HostRecord("run-5", "web1", "running", "rel-1", "rel-3", None, at(400)),
        HostRecord("run-6", "etl1", "success", None, "rel-9", "rel-9", at(50), at(80)),
    ]  # fmt: skip
    steps = (
        _steps("run-1", "web1", 0, 1.5, ok=True)
        + _steps("run-1", "web2", 0.5, 2.5, ok=True)
        + _steps("run-2", "web1", 100, 4.0, ok=False)
        + _steps("run-6", "etl1", 50, 0.5, ok=True)
    )
    events = [
        AuditEvent("run-1", "run_started", at(0), "prod", "api", None, {"ref": "main"}),
        AuditEvent("run-1", "switched", at(20), "prod", "api", "web1",
                   {"from": None, "to": "rel-1"}),
        AuditEvent("run-2", "rolled_back", at(185), "prod", "api", "web1",
                   {"from": "rel-2", "to": "rel-1", "reason": "health_check"}),
    ]  # fmt: skip
    return runs, hosts, steps, events


def write_history(store: object) -> None:
    """Save the fixed history through the store's save methods."""
    runs, hosts, steps, events = build_history()
    for run in runs:
        store.save_run(run)
    for host in hosts:
        store.save_host(host)
    for step in steps:
        store.save_step(step)
    for event in events:
        store.save_event(event)


# The aggregates of prod/api in the fixed history.
EXPECTED_RUNS_BY_STATUS = {"success": 1, "rolled_back": 1, "failed": 1, "running": 1}
# run-2 counts through its host error only; run-3 has no host error and counts by itself.
EXPECTED_ERRORS_BY_CODE = {"health_check_failed": 1, "configuration_error": 1}
EXPECTED_ROLLBACKS_BY_REASON = {"health_check": 1, "manual": 1}
EXPECTED_LAST_SUCCESS_AT = at(60)
EXPECTED_RUN_DURATIONS = [60.0, 90.0, 3.0]
EXPECTED_HEALTH_CHECK_DURATIONS = [1.5, 2.5, 4.0]

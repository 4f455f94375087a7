"""Run store reads and writes on real SQLite, PostgreSQL and MariaDB databases."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from history_data import (
    EXPECTED_ERRORS_BY_CODE,
    EXPECTED_HEALTH_CHECK_DURATIONS,
    EXPECTED_LAST_SUCCESS_AT,
    EXPECTED_ROLLBACKS_BY_REASON,
    EXPECTED_RUN_DURATIONS,
    EXPECTED_RUNS_BY_STATUS,
    UTC,
    at,
    build_history,
    write_history,
)

from fraisier.db.base import RunStats
from fraisier.records import AuditEvent, HostRecord, RunRecord, StepRecord

pytestmark = pytest.mark.database

HOSTILE_STRINGS = [
    'it\'s "quoted" `back` \\slash\\',
    "'; DROP TABLE runs; --",
    "%s %(name)s %% ? ?? :name $1",
    "emoji 🍓🚀👩‍💻 and CJK 部署失败 デプロイ 배포",
    "right-to-left שלום مرحبا",
    "line1\nline2\r\nline3\ttab \x1b[31mred\x1b[0m",
    "x" * 4096,
    "e" * 100_000,
    "🍓" * 30_000,
    "",
]


def test_records_round_trip(store):
    runs, hosts, steps, events = build_history()
    write_history(store)

    detail = store.get_run("run-2")

    assert detail is not None
    assert detail.run == runs[1]
    assert detail.hosts == [h for h in hosts if h.run_id == "run-2"]
    assert detail.steps == [s for s in steps if s.run_id == "run-2"]
    assert detail.events == [e for e in events if e.run_id == "run-2"]


def test_missing_run_is_none(store):
    assert store.get_run("no-such-run") is None


def test_timestamps_return_as_utc(store):
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    local_start = dt.datetime(2024, 3, 10, 17, 30, 0, 654321, tzinfo=india)
    store.save_run(RunRecord("tz", "prod", "api", "deploy", local_start))

    started = store.get_run("tz").run.started_at

    assert started == local_start
    assert started.utcoffset() == dt.timedelta(0)
    assert started.hour == 12
    assert started.microsecond == 654321


def test_saves_are_idempotent(store):
    run = RunRecord("run-x", "prod", "api", "deploy", at(0))
    host = HostRecord("run-x", "web1", "running", started_at=at(1))
    step = StepRecord("run-x", "web1", 1, "fetch", "success", at(1), at(2))
    event = AuditEvent("run-x", "run_started", at(0), "prod", "api", None, {"n": 1})
    for _ in range(3):
        store.save_run(run)
        store.save_host(host)
        store.save_step(step)
        store.save_event(event)

    store.save_run(dataclasses.replace(run, status="success", ended_at=at(9), exit_code=0))
    store.save_host(dataclasses.replace(host, status="success", final_release="rel-1"))
    store.save_step(dataclasses.replace(step, attempts=2))
    detail = store.get_run("run-x")

    assert len(store.list_runs()) == 1
    assert detail.run.status == "success"
    assert detail.run.ended_at == at(9)
    assert [h.status for h in detail.hosts] == ["success"]
    assert detail.hosts[0].final_release == "rel-1"
    assert [s.attempts for s in detail.steps] == [2]
    assert len(detail.events) == 1


@pytest.mark.parametrize("text", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_hostile_strings_round_trip(store, text):
    run = RunRecord(
        "hostile",
        "prod",
        "api",
        "deploy",
        at(0),
        error_message=text,
        git_ref=text[:200],
        push_error=text,
    )
    step = StepRecord(
        "hostile", "web1", 1, "build", "failed", at(0), at(1), stdout_tail=text, stderr_tail=text
    )
    event = AuditEvent("hostile", "config_changed", at(0), detail={"changed": {text[:50]: text}})
    store.save_run(run)
    store.save_step(step)
    store.save_event(event)

    detail = store.get_run("hostile")

    assert detail.run.error_message == text
    assert detail.run.git_ref == text[:200]
    assert detail.run.push_error == text
    assert detail.steps[0].stdout_tail == text
    assert detail.steps[0].stderr_tail == text
    assert detail.events[0].detail == {"changed": {text[:50]: text}}


def test_nul_becomes_replacement_character(store):
    store.save_run(RunRecord("nul", "prod", "api", "deploy", at(0), error_message="a\x00b"))

    assert store.get_run("nul").run.error_message == "a\ufffdb"


def test_list_runs_newest_first_with_filters(store):
    write_history(store)

    assert [r.run_id for r in store.list_runs()] == [
        "run-5",
        "run-4",
        "run-3",
        "run-2",
        "run-6",
        "run-1",
    ]
    assert [r.run_id for r in store.list_runs("prod", limit=2)] == ["run-5", "run-4"]
    assert [r.run_id for r in store.list_runs("staging", "etl")] == ["run-6"]
    assert store.list_runs("prod", "etl") == []


def test_run_stats_of_history(store):
    write_history(store)

    stats = store.run_stats("prod", "api")

    assert stats.runs_by_status == EXPECTED_RUNS_BY_STATUS
    assert stats.errors_by_code == EXPECTED_ERRORS_BY_CODE
    assert stats.rollbacks_by_reason == EXPECTED_ROLLBACKS_BY_REASON
    assert stats.last_success_at == EXPECTED_LAST_SUCCESS_AT
    assert stats.last_success_at.tzinfo is not None
    assert stats.last_run is not None
    assert stats.last_run.run_id == "run-5"
    assert stats.run_durations == pytest.approx(EXPECTED_RUN_DURATIONS)
    assert stats.health_check_durations == pytest.approx(EXPECTED_HEALTH_CHECK_DURATIONS)
    assert stats.active_runs == 1


def test_run_stats_of_unknown_pair(store):
    write_history(store)

    assert store.run_stats("prod", "nothing") == RunStats()


def test_list_pairs(store):
    write_history(store)

    assert store.list_pairs() == [("prod", "api"), ("staging", "etl")]


def test_host_releases_from_newest_records(store):
    write_history(store)

    releases = store.host_releases("prod")

    # run-5 is still running on web1 without a final release, so web1 runs its previous
    # release rel-1. The newest run on web2 is run-2, which rolled back to rel-1.
    assert [(r.fraise, r.host, r.release, r.run_id) for r in releases] == [
        ("api", "web1", "rel-1", "run-5"),
        ("api", "web2", "rel-1", "run-2"),
    ]
    assert store.host_releases("nowhere") == []


def test_mark_abandoned_spares_current_run(store):
    write_history(store)
    store.save_run(RunRecord("run-7", "prod", "api", "deploy", at(500)))

    abandoned = store.mark_abandoned("prod", "api", exclude_run_id="run-7")

    assert abandoned == ["run-5"]
    assert store.get_run("run-5").run.status == "abandoned"
    assert store.get_run("run-5").run.ended_at is not None
    assert store.get_run("run-7").run.status == "running"
    assert store.mark_abandoned("prod", "api", exclude_run_id="run-7") == []


def test_same_history_on_all_databases(databases, all_dialects):
    results = {}
    for dialect in all_dialects:
        store = databases.store(dialect)
        write_history(store)
        results[dialect] = {
            "runs": store.list_runs(limit=100),
            "details": [store.get_run(f"run-{n}") for n in range(1, 7)],
            "stats": store.run_stats("prod", "api"),
            "pairs": store.list_pairs(),
            "releases": store.host_releases("prod"),
        }

    assert results["postgresql"] == results["sqlite"]
    assert results["mysql"] == results["sqlite"]
    runs, _, _, _ = build_history()
    assert sorted(results["sqlite"]["runs"], key=lambda r: r.run_id) == runs
    assert all(r.started_at.tzinfo == UTC for r in results["mysql"]["runs"])

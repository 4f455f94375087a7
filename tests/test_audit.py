"""Tests for fraisier.audit: events in the log and in a real SQLite run store, config diffs."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraisier import logging as flog
from fraisier.audit import (
    MAX_CONFIG_CHANGES,
    Auditor,
    config_diff,
    config_digest,
    config_snapshot,
)
from fraisier.db import open_store
from fraisier.db.base import RunStore
from fraisier.records import AuditEvent, LockHolder, RunRecord
from fraisier.redact import MASK, default_redactor, register_secret

PLANTED_SECRET = "planted-Audit-6620"
STARTED = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    run_store = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    run_store.ensure_schema()
    yield run_store
    run_store.close()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)
    yield stream
    flog.reset_logging()


@pytest.fixture
def planted_secret() -> Iterator[str]:
    register_secret(PLANTED_SECRET)
    yield PLANTED_SECRET
    default_redactor.clear()


def make_run(**changes: object) -> RunRecord:
    fields: dict[str, object] = {
        "run_id": "r-100",
        "environment": "prod",
        "fraise": "api",
        "task": "deploy",
        "started_at": STARTED,
        "release_id": "20260301-120000",
        "git_ref": "main",
        "started_by": "alice",
        "controller": "ctl1",
    }
    fields.update(changes)
    return RunRecord(**fields)  # type: ignore[arg-type]


def audit_lines(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == "audit"]


# Events ------------------------------------------------------------------------------------


def test_run_events_saved_and_logged(store: RunStore, log_stream: io.StringIO) -> None:
    run = make_run()
    store.save_run(run)
    auditor = Auditor(store)

    auditor.run_started(run)
    auditor.switched("r-100", "web1", "20260201-090000", "20260301-120000")
    auditor.rolled_back("r-100", "web2", "20260301-120000", "20260201-090000", "health check")
    run.status = "rolled_back"
    run.ended_at = STARTED + dt.timedelta(seconds=42.5)
    run.exit_code = 1
    auditor.run_ended(run)

    detail = store.get_run("r-100")
    assert detail is not None
    kinds = [event.kind for event in detail.events]
    assert sorted(kinds) == ["rolled_back", "run_ended", "run_started", "switched"]
    switched = next(e for e in detail.events if e.kind == "switched")
    assert switched.host == "web1"
    assert switched.environment == "prod"
    assert switched.fraise == "api"
    assert switched.detail == {"from_release": "20260201-090000", "to_release": "20260301-120000"}
    ended = next(e for e in detail.events if e.kind == "run_ended")
    assert ended.detail["status"] == "rolled_back"
    assert ended.detail["duration"] == 42.5

    lines = audit_lines(log_stream)
    assert [line["audit_kind"] for line in lines] == [
        "run_started",
        "switched",
        "rolled_back",
        "run_ended",
    ]
    assert all(line["level"] == "INFO" for line in lines)
    assert lines[0]["message"] == "audit: run r-100 started: deploy prod/api by alice"
    assert lines[0]["audit_detail"]["started_by"] == "alice"
    assert lines[1]["host"] == "web1"
    assert lines[1]["run_id"] == "r-100"
    assert lines[2]["audit_detail"]["reason"] == "health check"
    assert lines[2]["message"].endswith("to 20260201-090000: health check")


def test_lock_events(store: RunStore, log_stream: io.StringIO) -> None:
    store.save_run(make_run())
    auditor = Auditor(store)
    holder = LockHolder(run_id="r-100", user="alice", controller="ctl1", since=STARTED, pid=4242)

    auditor.lock_taken("r-100", "prod/api", holder)
    auditor.lock_released("r-100", "prod/api")

    events = store.get_run("r-100").events  # type: ignore[union-attr]
    lock_event = next(e for e in events if e.kind == "lock_taken")
    assert lock_event.detail["scope"] == "prod/api"
    assert lock_event.detail["holder"]["pid"] == 4242
    assert lock_event.detail["holder"]["since"] == STARTED.isoformat()
    assert [line["message"] for line in audit_lines(log_stream)] == [
        "audit: lock prod/api taken",
        "audit: lock prod/api released",
    ]


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError, match="'deleted'"):
        Auditor(None).record("deleted", "r-1", "x")


def test_without_recorder_returns_event(log_stream: io.StringIO) -> None:
    event = Auditor(None).switched("r-2", "web1", None, "rel-2")
    assert isinstance(event, AuditEvent)
    assert event.kind == "switched"
    assert event.at.tzinfo is not None
    assert audit_lines(log_stream)[0]["message"] == "audit: switched web1 from no release to rel-2"


class BrokenRecorder:
    def save_event(self, event: AuditEvent) -> None:
        raise OSError("database is locked")


def test_recorder_failure_logged(log_stream: io.StringIO) -> None:
    auditor = Auditor(BrokenRecorder())

    auditor.lock_released("r-3", "prod/api")

    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    error = lines[-1]
    assert error["level"] == "ERROR"
    assert "lock_released of run r-3 failed" in error["message"]
    assert "database is locked" in error["message"]
    assert auditor.failed_saves == 1


def test_recorder_failure_strict_raises() -> None:
    with pytest.raises(OSError, match="database is locked"):
        Auditor(BrokenRecorder(), strict=True).lock_released("r-3", "prod/api")


def test_secrets_absent_from_audit(
    store: RunStore, log_stream: io.StringIO, planted_secret: str
) -> None:
    run = make_run(
        git_ref="https://deploy:git-Pass-3321@git.example.test/o/r.git",
        error_message=f"psql failed: PGPASSWORD=pg-Pass-1188 and {planted_secret}",
    )
    store.save_run(run)
    auditor = Auditor(store)

    auditor.run_started(run)
    auditor.rolled_back("r-100", "web1", "a", "b", f"token {planted_secret} rejected")
    auditor.run_ended(run)
    auditor.config_changed(
        "r-100",
        "prod",
        "api",
        {"db": {"url": "postgresql://u:old-Pass-7001@h/db"}},
        {"db": {"url": "postgresql://u:new-Pass-7002@h/db", "password": "raw-Pass-7003"}},
    )

    stored = json.dumps(
        [e.detail for e in store.get_run("r-100").events],  # type: ignore[union-attr]
        default=str,
    )
    logged = log_stream.getvalue()
    for leak in (planted_secret, "git-Pass-3321", "pg-Pass-1188", "old-Pass-7001", "raw-Pass-7003"):
        assert leak not in stored, f"{leak!r} stored"
        assert leak not in logged, f"{leak!r} logged"
    assert "new-Pass-7002" not in stored
    assert "new-Pass-7002" not in logged
    assert "token *** rejected" in stored


# Configuration snapshots and diffs ---------------------------------------------------------


def test_snapshot_redacted_and_json_safe(planted_secret: str) -> None:
    inventory = {
        "hosts": ("web1", "web2"),
        "vars": {"db_password": "hunter22", "banner": f"key {planted_secret}"},
        "path": Path("/srv/app"),
    }
    snapshot = config_snapshot(inventory, {"steps": [{"name": "build"}]})
    assert snapshot == {
        "inventory": {
            "hosts": ["web1", "web2"],
            "vars": {"db_password": MASK, "banner": "key ***"},
            "path": "/srv/app",
        },
        "recipe": {"steps": [{"name": "build"}]},
    }


def test_digest_canonical() -> None:
    first = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    second = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert config_digest(first) == config_digest(second)
    assert len(config_digest(first)) == 64
    assert config_digest(first) != config_digest({"b": 2, "a": {"y": [1, 2], "x": "é"}})


DIFF_CASES = [
    ({}, {}, []),
    ({"a": 1}, {"a": 1}, []),
    ({"a": 1}, {"a": 2}, [{"path": "a", "op": "changed", "old": 1, "new": 2}]),
    ({}, {"a": {"b": 1}}, [{"path": "a.b", "op": "added", "new": 1}]),
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, [{"path": "a.c", "op": "removed", "old": 2}]),
    (
        {"hosts": ["web1"]},
        {"hosts": ["web1", "web2"]},
        [{"path": "hosts", "op": "changed", "old": ["web1"], "new": ["web1", "web2"]}],
    ),
    (
        {"a": {}},
        {"a": {"b": 1}},
        [{"path": "a", "op": "removed", "old": {}}, {"path": "a.b", "op": "added", "new": 1}],
    ),
    (
        {"a": {"b": 1}},
        {"a": 5},
        [{"path": "a", "op": "added", "new": 5}, {"path": "a.b", "op": "removed", "old": 1}],
    ),
    ({"a": None}, {"a": 0}, [{"path": "a", "op": "changed", "old": None, "new": 0}]),
]


@pytest.mark.parametrize(("previous", "current", "expected"), DIFF_CASES)
def test_config_diff_cases(previous: dict, current: dict, expected: list) -> None:
    assert config_diff(previous, current) == expected


def test_config_changed_records_diff(store: RunStore, log_stream: io.StringIO) -> None:
    store.save_run(make_run())
    previous = config_snapshot(
        {"fraises": {"api": {"port": 8000, "hosts": ["web1"]}}, "vars": {"db_password": "old-pw"}},
        {"steps": [{"name": "build"}]},
    )
    current = config_snapshot(
        {"fraises": {"api": {"port": 8080, "hosts": ["web1"], "user": "app"}}, "vars": {}},
        {"steps": [{"name": "build"}]},
    )

    event = Auditor(store).config_changed("r-100", "prod", "api", previous, current)

    assert event is not None
    assert event.detail["changes"] == [
        {"path": "inventory.fraises.api.port", "op": "changed", "old": 8000, "new": 8080},
        {"path": "inventory.fraises.api.user", "op": "added", "new": "app"},
        {"path": "inventory.vars", "op": "added", "new": {}},
        {"path": "inventory.vars.db_password", "op": "removed", "old": MASK},
    ]
    assert event.detail["digest"] == config_digest(current)
    assert event.detail["previous_digest"] == config_digest(previous)
    assert event.detail["change_count"] == 4
    assert event.detail["truncated"] is False
    stored = next(e for e in store.get_run("r-100").events if e.kind == "config_changed")  # type: ignore[union-attr]
    assert stored.detail == event.detail
    line = audit_lines(log_stream)[0]
    assert line["message"].startswith("audit: configuration of prod/api changed: inventory.")
    assert line["environment"] == "prod"


def test_config_unchanged_records_nothing(log_stream: io.StringIO) -> None:
    snapshot = config_snapshot({"a": 1}, {})
    assert Auditor(None).config_changed("r-4", "prod", "api", snapshot, dict(snapshot)) is None
    assert audit_lines(log_stream) == []


def test_config_first_snapshot_all_added() -> None:
    event = Auditor(None).config_changed("r-5", "prod", "api", None, {"a": {"b": 1}, "c": 2})
    assert event is not None
    assert event.detail["previous_digest"] is None
    assert event.detail["changes"] == [
        {"path": "a.b", "op": "added", "new": 1},
        {"path": "c", "op": "added", "new": 2},
    ]


def test_config_changes_truncated() -> None:
    current = {f"key{number:04d}": number for number in range(MAX_CONFIG_CHANGES + 20)}
    event = Auditor(None).config_changed("r-6", "prod", "api", {}, current)
    assert event is not None
    assert event.detail["change_count"] == MAX_CONFIG_CHANGES + 20
    assert event.detail["truncated"] is True
    assert len(event.detail["changes"]) == MAX_CONFIG_CHANGES


def test_secret_only_change_invisible() -> None:
    """Document the limit: masked values compare equal, so a new password is no change."""
    previous = config_snapshot({"password": "old-secret"}, {})
    current = config_snapshot({"password": "new-secret"}, {})
    assert Auditor(None).config_changed("r-7", "prod", "api", previous, current) is None


def test_custom_logger_receives_events(caplog: pytest.LogCaptureFixture) -> None:
    custom = logging.getLogger("fraisier.audit.custom")
    custom.addHandler(caplog.handler)
    custom.propagate = False
    try:
        with caplog.at_level(logging.INFO, logger="fraisier.audit.custom"):
            Auditor(None, logger=custom).lock_taken("r-8", "prod/api", "alice@ctl1")
    finally:
        custom.removeHandler(caplog.handler)
        custom.propagate = True

    (record,) = caplog.records
    assert record.audit_kind == "lock_taken"
    assert record.audit_detail == {"scope": "prod/api", "holder": "alice@ctl1"}


def test_generic_record_remembers_run() -> None:
    auditor = Auditor(None)
    auditor.record("run_started", "r-9", "run started", environment="staging", fraise="etl")

    switched = auditor.switched("r-9", "web1", None, "rel-9")
    ended = auditor.record("run_ended", "r-9", "run ended")
    after_end = auditor.lock_released("r-9", "staging/etl")

    assert switched.environment == "staging"
    assert switched.fraise == "etl"
    assert ended.environment == "staging"
    assert after_end.environment is None

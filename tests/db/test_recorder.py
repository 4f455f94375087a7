"""The Recorder and its journal against an unreachable database and real live ones."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
from history_data import at, build_history, write_history
from support import free_port

from fraisier.db import database_identity, open_store
from fraisier.db.journal import Journal, encode_record
from fraisier.db.recorder import Recorder
from fraisier.errors import DatabaseError, SchemaVersionError
from fraisier.records import AuditEvent, HostRecord, RunRecord
from fraisier.redact import register_secret

pytestmark = pytest.mark.database


def _down_url() -> str:
    """Return a PostgreSQL URL on a loopback port that nothing listens on."""
    return f"postgresql://fraisier:Down-Pass-321@127.0.0.1:{free_port()}/nothing"


def _record_count() -> int:
    runs, hosts, steps, events = build_history()
    return len(runs) + len(hosts) + len(steps) + len(events)


def _snapshot(store) -> dict:
    return {
        "runs": store.list_runs(limit=100),
        "details": [store.get_run(f"run-{n}") for n in range(1, 7)],
        "stats": store.run_stats("prod", "api"),
    }


def test_down_database_journals_then_replays(databases, dialect, tmp_path, caplog):
    journal_path = tmp_path / "var" / "journal.jsonl"
    down_url = _down_url()
    recorder = Recorder(
        lambda: open_store(down_url), journal_path, database=database_identity(down_url)
    )

    with caplog.at_level(logging.WARNING, logger="fraisier.db.recorder"):
        write_history(recorder)

    assert recorder.pending() == _record_count()
    label = journal_path.with_name(journal_path.name + ".database").read_text().strip()
    assert label == database_identity(down_url)
    assert "Down-Pass-321" not in label
    warnings = [r for r in caplog.records if r.name == "fraisier.db.recorder"]
    assert len(warnings) == 1
    assert str(journal_path) in warnings[0].getMessage()
    assert "Down-Pass-321" not in journal_path.read_text()
    assert "Down-Pass-321" not in caplog.text

    live_url = databases.url(dialect)
    live = Recorder(lambda: open_store(live_url), journal_path)
    assert live.replay() == _record_count()
    assert live.pending() == 0
    live.close()

    replayed = open_store(live_url)
    direct = databases.store(dialect)
    write_history(direct)
    assert _snapshot(replayed) == _snapshot(direct)
    replayed.close()


def test_replaying_twice_adds_nothing(databases, dialect, tmp_path):
    journal_path = tmp_path / "journal.jsonl"
    write_history(Recorder(lambda: open_store(_down_url()), journal_path))
    copy = tmp_path / "journal.copy"
    shutil.copy(journal_path, copy)
    url = databases.url(dialect)
    recorder = Recorder(lambda: open_store(url), journal_path)

    first = recorder.replay()
    shutil.copy(copy, journal_path)
    second = recorder.replay()
    store = open_store(url)

    assert first == second == _record_count()
    assert len(store.list_runs(limit=100)) == 6
    assert len(store.get_run("run-1").events) == 2
    assert len(store.get_run("run-1").steps) == 8
    store.close()
    recorder.close()


def test_replay_strict_raises_when_down(tmp_path):
    journal_path = tmp_path / "journal.jsonl"
    recorder = Recorder(lambda: open_store(_down_url()), journal_path)
    recorder.save_run(RunRecord("run-1", "prod", "api", "deploy", at(0)))

    assert recorder.replay() == 0
    with pytest.raises(DatabaseError) as caught:
        recorder.replay(strict=True)
    assert caught.value.recoverable is True
    assert recorder.pending() == 1


def test_records_are_redacted(databases, dialect, tmp_path):
    register_secret("tok-Very-Secret-42")
    url = databases.url(dialect)
    recorder = Recorder(lambda: open_store(url), tmp_path / "journal.jsonl")
    message = "git clone https://deploy:tok-Very-Secret-42@git.example/app failed"

    recorder.save_run(RunRecord("run-s", "prod", "api", "deploy", at(0), error_message=message))
    recorder.save_event(
        AuditEvent("run-s", "config_changed", at(1), detail={"db_password": "hunter22x"})
    )
    detail = open_store(url).get_run("run-s")

    assert "tok-Very-Secret-42" not in detail.run.error_message
    assert "deploy:***@git.example" in detail.run.error_message
    assert "hunter22x" not in str(detail.events[0].detail)
    recorder.close()


def test_journaled_records_are_redacted(tmp_path):
    register_secret("tok-Journal-Secret-7")
    journal_path = tmp_path / "journal.jsonl"
    recorder = Recorder(lambda: open_store(_down_url()), journal_path)

    recorder.save_host(HostRecord("run-j", "web1", "failed", error_message="tok-Journal-Secret-7"))

    assert recorder.pending() == 1
    assert "tok-Journal-Secret-7" not in journal_path.read_text()


def test_later_records_wait_behind_journal(running_postgres, tmp_path):
    from test_reconnect import _new_postgres_database

    url = _new_postgres_database(running_postgres)
    recorder = Recorder(lambda: open_store(url), tmp_path / "journal.jsonl", retry_interval=3600)
    run = RunRecord("run-o", "prod", "api", "deploy", at(0))
    recorder.save_run(run)
    running_postgres.stop()
    try:
        recorder.save_host(HostRecord("run-o", "web1", "running"))
    finally:
        running_postgres.start()

    recorder.save_host(HostRecord("run-o", "web1", "success", final_release="rel-1"))
    recorder.save_run(dataclasses.replace(run, status="success", ended_at=at(9)))
    store = open_store(url)
    before = store.get_run("run-o")
    replayed = recorder.replay()
    after = store.get_run("run-o")

    assert recorder.pending() == 0
    assert replayed == 3
    assert before.run.status == "running"
    assert before.hosts == []
    assert after.run.status == "success"
    assert [(h.status, h.final_release) for h in after.hosts] == [("success", "rel-1")]
    store.close()
    recorder.close()


def test_save_drains_journal_after_interval(running_postgres, tmp_path):
    from test_reconnect import _new_postgres_database

    url = _new_postgres_database(running_postgres)
    recorder = Recorder(lambda: open_store(url), tmp_path / "journal.jsonl", retry_interval=0)
    recorder.save_run(RunRecord("run-i", "prod", "api", "deploy", at(0)))
    running_postgres.stop()
    try:
        recorder.save_host(HostRecord("run-i", "web1", "running"))
        assert recorder.pending() == 1
    finally:
        running_postgres.start()

    recorder.save_host(HostRecord("run-i", "web2", "running"))

    assert recorder.pending() == 0
    assert [h.host for h in open_store(url).get_run("run-i").hosts] == ["web1", "web2"]
    recorder.close()


def test_malformed_journal_lines_are_set_aside(databases, dialect, tmp_path):
    journal_path = tmp_path / "journal.jsonl"
    good = [
        encode_record(RunRecord("run-m", "prod", "api", "deploy", at(0))),
        encode_record(HostRecord("run-m", "web1", "success")),
    ]
    journal_path.write_text(good[0] + "\n{not json\n" + good[1] + '\n{"kind": "run", "rec')
    url = databases.url(dialect)
    recorder = Recorder(lambda: open_store(url), journal_path)

    assert recorder.replay() == 2

    assert recorder.pending() == 0
    rejected = Journal(journal_path).rejected_path.read_text()
    assert "{not json" in rejected
    assert '{"kind": "run", "rec' in rejected
    assert [h.host for h in open_store(url).get_run("run-m").hosts] == ["web1"]
    recorder.close()


def test_old_schema_stops_replay_not_saves(databases, dialect, tmp_path):
    store = databases.store(dialect, migrate=False)
    store.migrate(target=1)
    recorder = Recorder(lambda: store, tmp_path / "journal.jsonl")

    recorder.save_run(RunRecord("run-v", "prod", "api", "deploy", at(0)))

    assert recorder.pending() == 1
    with pytest.raises(SchemaVersionError, match=r"inv db\.migrate"):
        recorder.replay()


def test_empty_database_is_migrated_on_first_use(databases, dialect, tmp_path):
    url = databases.url(dialect)
    recorder = Recorder(lambda: open_store(url), tmp_path / "journal.jsonl")

    recorder.save_run(RunRecord("run-f", "prod", "api", "deploy", at(0)))

    store = open_store(url)
    assert recorder.pending() == 0
    assert store.get_run("run-f") is not None
    store.check_schema()
    store.close()
    recorder.close()

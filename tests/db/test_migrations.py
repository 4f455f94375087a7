"""Schema migrations and version checks on real SQLite, PostgreSQL and MariaDB databases."""

from __future__ import annotations

import threading

import pytest
from history_data import at, write_history

from fraisier.db.migrations import latest_version, load_migrations, split_statements
from fraisier.errors import SchemaVersionError
from fraisier.records import RunRecord

pytestmark = pytest.mark.database


def _insert_v1_run(store, run_id: str) -> None:
    """Insert a run with the version 1 columns only, as an old Fraisier wrote it."""
    sql = (
        "INSERT INTO runs (run_id, environment, fraise, task, status, started_at, error_message) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    params = (run_id, "prod", "api", "deploy", "success", store._to_db_time(at(0)), "old 🍓")
    store._execute(lambda cur: store._run(cur, sql, params), write=True, what="test insert")


def _indexes(store) -> set[str]:
    queries = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'",
        "postgresql": "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()",
        "mysql": "SELECT DISTINCT index_name FROM information_schema.statistics "
        "WHERE table_schema = DATABASE()",
    }
    rows = store._execute(
        lambda cur: store._run(cur, queries[store.dialect]).fetchall(), write=False, what="test"
    )
    return {row[0] for row in rows}


def test_every_dialect_has_every_version():
    versions = {
        d: [m.version for m in load_migrations(d)] for d in ("sqlite", "postgresql", "mysql")
    }

    assert latest_version() >= 2
    assert set(map(tuple, versions.values())) == {tuple(range(1, latest_version() + 1))}


def test_split_statements_drops_comments():
    text = "-- a comment; with a semicolon\nCREATE TABLE a (x INT);\n\nCREATE INDEX i\n ON a (x);\n"

    assert split_statements(text) == ("CREATE TABLE a (x INT)", "CREATE INDEX i\n ON a (x)")


def test_migrate_empty_database(databases, dialect):
    store = databases.store(dialect, migrate=False)

    assert store.schema_version() == 0
    assert store.migrate() == list(range(1, latest_version() + 1))
    assert store.schema_version() == latest_version()
    store.check_schema()
    assert store.migrate() == []


@pytest.mark.parametrize("start", range(1, latest_version()))
def test_migrate_from_earlier_version(databases, dialect, start):
    store = databases.store(dialect, migrate=False)
    assert store.migrate(target=start) == list(range(1, start + 1))
    _insert_v1_run(store, "old-run")

    applied = store.migrate()

    assert applied == list(range(start + 1, latest_version() + 1))
    old = store.get_run("old-run").run
    assert old.error_message == "old 🍓"
    assert old.started_at == at(0)
    assert old.config_digest is None
    assert old.push_error is None
    assert {"runs_pair_started", "run_steps_name_started"} <= _indexes(store)
    write_history(store)
    assert len(store.list_runs(limit=100)) == 7


def test_older_schema_asks_for_migrate(databases, dialect):
    store = databases.store(dialect, migrate=False)
    store.migrate(target=1)

    with pytest.raises(SchemaVersionError) as caught:
        store.check_schema()

    assert "run `inv db.migrate`" in str(caught.value)
    assert "schema version 1" in str(caught.value)
    assert caught.value.recoverable is False


def test_empty_schema_asks_for_migrate(databases, dialect):
    store = databases.store(dialect, migrate=False)

    with pytest.raises(SchemaVersionError, match=r"run `inv db\.migrate`"):
        store.check_schema()


def test_newer_schema_is_refused(store):
    newer = latest_version() + 1
    store._execute(
        lambda cur: store._run(
            cur,
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
            (newer, store._to_db_time(at(0))),
        ),
        write=True,
        what="test insert",
    )

    with pytest.raises(SchemaVersionError, match="upgrade Fraisier") as caught:
        store.check_schema()
    assert f"schema version {newer}" in str(caught.value)
    with pytest.raises(SchemaVersionError, match="upgrade Fraisier"):
        store.migrate()
    with pytest.raises(SchemaVersionError, match="upgrade Fraisier"):
        store.ensure_schema()


def test_ensure_schema_migrates_only_empty(databases, dialect):
    empty = databases.store(dialect, migrate=False)
    old = databases.store(dialect, migrate=False)
    old.migrate(target=1)

    assert empty.ensure_schema() == list(range(1, latest_version() + 1))
    assert empty.ensure_schema() == []
    with pytest.raises(SchemaVersionError, match=r"inv db\.migrate"):
        old.ensure_schema()
    assert old.schema_version() == 1


def test_concurrent_migrations_apply_once(databases, dialect):
    url = databases.url(dialect)
    from fraisier.db import open_store

    stores = [open_store(url) for _ in range(3)]
    databases.stores.extend(stores)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def migrate(store) -> None:
        try:
            results.append(store.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert sorted(v for applied in results for v in applied) == list(range(1, latest_version() + 1))
    assert stores[0].schema_version() == latest_version()
    stores[0].save_run(RunRecord("after", "prod", "api", "deploy", at(0)))
    assert stores[1].get_run("after") is not None

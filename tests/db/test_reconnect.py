"""Reconnection after a server restart, on private PostgreSQL and MariaDB servers."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time

import psycopg2
import pymysql
import pytest
from history_data import at

from fraisier.db import open_store
from fraisier.db.postgres import PostgresRunStore
from fraisier.db.url import parse_database_url
from fraisier.errors import DatabaseError
from fraisier.records import HostRecord, RunRecord, StepRecord

pytestmark = pytest.mark.database


def _new_postgres_database(server) -> str:
    name = f"fraisier_{secrets.token_hex(4)}"
    conn = psycopg2.connect(
        host="127.0.0.1", port=server.port, user=server.user, password=server.password,
        dbname="postgres", connect_timeout=5,
    )  # fmt: skip
    conn.autocommit = True
    with contextlib.closing(conn):
        conn.cursor().execute(f"CREATE DATABASE {name}")
    return server.url().rsplit("/", 1)[0] + f"/{name}"


def _new_mariadb_database(server) -> str:
    name = f"fraisier_{secrets.token_hex(4)}"
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="root", connect_timeout=5)
    with contextlib.closing(conn):
        conn.cursor().execute(f"CREATE DATABASE {name}")
    return server.url().rsplit("/", 1)[0] + f"/{name}"


def _write_across_restart(url: str, server, caplog) -> None:
    store = open_store(url)
    store.migrate()
    store.save_run(RunRecord("run-r", "prod", "api", "deploy", at(0)))

    server.restart()
    with caplog.at_level(logging.WARNING, logger="fraisier.db"):
        store.save_host(HostRecord("run-r", "web1", "success", final_release="rel-1"))
        store.save_step(StepRecord("run-r", "web1", 1, "fetch", "success", at(0), at(1)))
    server.restart()
    store.save_run(RunRecord("run-r", "prod", "api", "deploy", at(0), "success", ended_at=at(5)))

    detail = store.get_run("run-r")
    store.close()
    assert detail.run.status == "success"
    assert [h.final_release for h in detail.hosts] == ["rel-1"]
    assert [s.name for s in detail.steps] == ["fetch"]
    assert any("reconnecting" in r.getMessage() for r in caplog.records)


def test_postgres_restart_between_writes(running_postgres, caplog):
    _write_across_restart(_new_postgres_database(running_postgres), running_postgres, caplog)


def test_mariadb_restart_between_writes(running_mariadb, caplog):
    _write_across_restart(_new_mariadb_database(running_mariadb), running_mariadb, caplog)


def test_write_waits_for_server_start(running_postgres):
    url = _new_postgres_database(running_postgres)
    store = PostgresRunStore(parse_database_url(url), attempts=8, retry_delays=(0.5,))
    store.migrate()
    store.save_run(RunRecord("run-w", "prod", "api", "deploy", at(0)))
    running_postgres.stop()
    starter = threading.Timer(1.5, running_postgres.start)
    starter.start()

    started = time.monotonic()
    store.save_host(HostRecord("run-w", "web1", "success"))
    elapsed = time.monotonic() - started
    starter.join()

    assert elapsed >= 1.0
    assert [h.host for h in store.get_run("run-w").hosts] == ["web1"]
    store.close()


def test_server_down_raises_recoverable(running_postgres):
    url = _new_postgres_database(running_postgres)
    store = open_store(url)
    store.migrate()
    running_postgres.stop()
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseError) as caught:
            store.save_run(RunRecord("run-d", "prod", "api", "deploy", at(0)))
        elapsed = time.monotonic() - started
    finally:
        running_postgres.start()

    error = caught.value
    assert error.recoverable is True
    assert error.code == "database_unavailable"
    assert "after 4 attempt(s)" in str(error)
    assert running_postgres.password not in str(error)
    assert running_postgres.password not in error.to_json()
    assert "postgres:***@" in str(error)
    assert elapsed < 10
    store.save_run(RunRecord("run-d", "prod", "api", "deploy", at(0)))
    assert store.get_run("run-d") is not None
    store.close()


def test_password_from_environment(running_postgres, monkeypatch):
    url = _new_postgres_database(running_postgres).replace(f":{running_postgres.password}@", "@")
    monkeypatch.setenv("FRAISIER_DATABASE_PASSWORD", running_postgres.password)

    store = open_store(url)

    assert store.migrate() != []
    assert running_postgres.password not in repr(store)
    store.close()


def test_password_from_file(running_postgres, tmp_path, monkeypatch):
    monkeypatch.delenv("FRAISIER_DATABASE_PASSWORD", raising=False)
    secret_file = tmp_path / "db-password"
    secret_file.write_text(running_postgres.password + "\n")
    url = _new_postgres_database(running_postgres).replace(f":{running_postgres.password}@", "@")

    store = open_store(f"{url}?password_file={secret_file}")

    assert store.schema_version() == 0
    store.close()


def test_wrong_password_is_not_recoverable(running_postgres):
    url = running_postgres.url(password="Wrong-Pass-987")
    store = open_store(url)

    started = time.monotonic()
    with pytest.raises(DatabaseError) as caught:
        store.schema_version()

    assert caught.value.recoverable is False
    assert "Wrong-Pass-987" not in str(caught.value)
    assert "password authentication failed" in str(caught.value)
    assert time.monotonic() - started < 5

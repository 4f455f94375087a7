"""Fixtures of the run store tests: a fresh database per test on SQLite, PostgreSQL and MariaDB.

PostgreSQL and MariaDB tests create ``fraisier_test_<random>`` on the shared servers and drop
it afterwards, so that parallel runs do not collide. A server that is down fails the test.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pymysql
import pytest
from db_servers import PrivateMariaDB, PrivatePostgres

from fraisier.db import open_store
from fraisier.db.sqlstore import SQLRunStore

DIALECTS = ("sqlite", "postgresql", "mysql")
REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_HOLDER_SCRIPT = Path(__file__).with_name("lock_holder.py")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _admin_postgres(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    return conn


def _admin_mysql(url: str) -> pymysql.connections.Connection:
    parts = urlsplit(url)
    return pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        connect_timeout=5,
        autocommit=True,
    )


class DatabaseFactory:
    """Creates empty databases of each dialect and drops them at teardown."""

    def __init__(self, tmp_path: Path, server_url: Callable[[str], str]) -> None:
        self.tmp_path = tmp_path
        self.server_url = server_url
        self.created: list[tuple[str, str, str]] = []
        self.stores: list[SQLRunStore] = []

    def url(self, dialect: str) -> str:
        """Create an empty database and return its URL."""
        name = f"fraisier_test_{secrets.token_hex(6)}"
        if dialect == "sqlite":
            return f"sqlite:///{self.tmp_path / (name + '.db')}"
        server = self.server_url(dialect)
        if dialect == "postgresql":
            with contextlib.closing(_admin_postgres(server)) as conn:
                conn.cursor().execute(f"CREATE DATABASE {name}")
        else:
            with contextlib.closing(_admin_mysql(server)) as conn:
                conn.cursor().execute(
                    f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
        self.created.append((dialect, server, name))
        return _with_database(server, name)

    def store(self, dialect: str, migrate: bool = True) -> SQLRunStore:
        """Open a store on a new database, migrated to the latest version if ``migrate``."""
        store = open_store(self.url(dialect))
        assert isinstance(store, SQLRunStore)
        self.stores.append(store)
        if migrate:
            store.migrate()
        return store

    def drop_all(self) -> None:
        """Close the stores and drop every database created."""
        for store in self.stores:
            store.close()
        for dialect, server, name in self.created:
            if dialect == "postgresql":
                with contextlib.closing(_admin_postgres(server)) as conn:
                    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                with contextlib.closing(_admin_mysql(server)) as conn:
                    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    """Parametrize a test over SQLite, PostgreSQL and MySQL."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_url")
    elif request.param == "mysql":
        request.getfixturevalue("mysql_url")
    return request.param


@pytest.fixture
def databases(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DatabaseFactory]:
    """Provide a DatabaseFactory; the shared server fixtures fail the test when one is down."""

    def server_url(dialect: str) -> str:
        return request.getfixturevalue("postgres_url" if dialect == "postgresql" else "mysql_url")

    factory = DatabaseFactory(tmp_path, server_url)
    yield factory
    factory.drop_all()


@pytest.fixture
def all_dialects(postgres_url: str, mysql_url: str) -> tuple[str, ...]:
    """Require all three databases and return their dialect names."""
    return DIALECTS


@pytest.fixture
def url(databases: DatabaseFactory, dialect: str) -> str:
    """Return the URL of an empty database of the test's dialect."""
    return databases.url(dialect)


@pytest.fixture
def store(databases: DatabaseFactory, dialect: str) -> SQLRunStore:
    """Return a migrated store on an empty database of the test's dialect."""
    return databases.store(dialect)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """Start a private PostgreSQL that tests may stop and restart."""
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """Start a private MariaDB that tests may stop and restart."""
    server = PrivateMariaDB()
    server.start()
    yield server
    server.close()


@pytest.fixture
def running_postgres(private_postgres: PrivatePostgres) -> PrivatePostgres:
    """Return the private PostgreSQL, started again if an earlier test left it stopped."""
    try:
        private_postgres.start()
    except RuntimeError as exc:
        # pg_ctl start fails when the server is already running, which is fine here.
        if "already running" not in str(exc) and "another server" not in str(exc):
            raise
    return private_postgres


@pytest.fixture
def running_mariadb(private_mariadb: PrivateMariaDB) -> PrivateMariaDB:
    """Return the private MariaDB, started again if an earlier test left it stopped."""
    if private_mariadb.process is None:
        private_mariadb.start()
    return private_mariadb


class LockHolderProcess:
    """A child process that takes a deploy lock through tests/db/lock_holder.py."""

    def __init__(self, url: str, run_id: str, hold: float, wait: float = 0.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, str(LOCK_HOLDER_SCRIPT), url, "prod", "api", run_id, str(hold),
             str(wait)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )  # fmt: skip

    def read_line(self) -> str:
        """Return the next line the child prints, failing if it exits first."""
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.wait(timeout=10)
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"lock holder exited {self.process.returncode}: {stderr}")
        return line.strip()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for the child and return its exit status, stdout and stderr."""
        stdout, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stdout, stderr


@pytest.fixture
def lock_holder() -> Iterator[Callable[..., LockHolderProcess]]:
    """Provide ``lock_holder(url, run_id, hold, wait)`` that starts a locking child process."""
    started: list[LockHolderProcess] = []

    def start(url: str, run_id: str, hold: float, wait: float = 0.0) -> LockHolderProcess:
        holder = LockHolderProcess(url, run_id, hold, wait)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        if holder.process.poll() is None:
            holder.process.kill()
        holder.process.communicate(timeout=10)

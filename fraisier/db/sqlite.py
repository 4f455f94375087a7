"""The SQLite run store: one file in WAL mode, and deploy locks as flock'ed files beside it."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from fraisier.db.sqlstore import UTC, LockSession, SQLRunStore, lock_digest
from fraisier.db.url import DatabaseURL
from fraisier.errors import DatabaseError

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class SQLiteRunStore(SQLRunStore):
    """A run store in one SQLite file, shared by the threads of a process through one connection.

    Several processes may use the same file: WAL mode lets readers run beside one writer, and
    ``busy_timeout`` makes a writer wait up to ``connect_timeout`` seconds for another.
    """

    dialect = "sqlite"
    placeholder = "?"

    def __init__(self, url: DatabaseURL, **kwargs: Any) -> None:
        if url.path is None:
            raise ValueError("a SQLite URL needs a file path")
        super().__init__(url, **kwargs)
        self.path = url.path.expanduser().absolute()
        self.lock_dir = self.path.with_name(self.path.name + ".locks")

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the directory {self.path.parent} of the SQLite run database: "
                f"{exc.strerror}; check the path and its permissions"
            ) from None
        conn = sqlite3.connect(
            self.path,
            timeout=self.url.connect_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.url.connect_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode, NORMAL loses no committed record when the process crashes; only a
            # power loss may drop the last commits. FULL would fsync on every record written.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _is_transient(self, exc: BaseException) -> bool:
        message = str(exc).lower()
        return isinstance(exc, sqlite3.OperationalError) and (
            "locked" in message or "busy" in message
        )

    def _begin(self, cursor: Any, write: bool) -> None:
        # IMMEDIATE takes the write lock at BEGIN, so a write transaction cannot get
        # SQLITE_BUSY later when it upgrades a read lock. busy_timeout makes BEGIN wait.
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _to_db_time(self, value: dt.datetime) -> str:
        return value.astimezone(UTC).strftime(_TIME_FORMAT)

    def _from_db_time(self, value: Any) -> dt.datetime:
        return dt.datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)

    def _table_exists_sql(self) -> str:
        return "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    def lock_path(self, environment: str, fraise: str) -> Path:
        """Return the lock file of a deploy lock, readable by name and unique by hash."""
        readable = _UNSAFE_FILE_CHARS.sub("_", f"{environment}.{fraise}")[:80]
        digest = lock_digest(environment, fraise).hex()[:16]
        return self.lock_dir / f"{readable}.{digest}.lock"

    def _open_lock_session(self, environment: str, fraise: str) -> LockSession:
        path = self.lock_path(environment, fraise)
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatabaseError(
                f"cannot open the deploy lock file {path}: {exc.strerror}; check that the "
                f"directory {self.lock_dir} is writable"
            ) from None
        return LockSession(handle=fd, key=path)

    def _try_lock(self, session: LockSession) -> bool:
        # flock locks belong to the open file description, so two sessions in one process
        # exclude each other too, and the kernel releases the lock when the holder dies.
        try:
            fcntl.flock(session.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        session.held = True
        return True

    def _release_lock(self, session: LockSession) -> None:
        try:
            if session.held:
                fcntl.flock(session.handle, fcntl.LOCK_UN)
        finally:
            session.held = False
            os.close(session.handle)

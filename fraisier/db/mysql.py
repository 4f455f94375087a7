"""The MySQL and MariaDB run store (PyMySQL, utf8mb4), with deploy locks from GET_LOCK."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pymysql

from fraisier.command import command_name
from fraisier.db.sqlstore import UTC, LockSession, SQLRunStore, describe_error, lock_digest, log
from fraisier.errors import DatabaseError

# Server and client error codes that a reconnect or retry may fix. They are 1040 too many
# connections, 1053 server shutdown, 1205 lock wait timeout, 1213 deadlock, 1927 connection
# killed (MariaDB), 2003 cannot connect, 2006 server gone away, 2013 and 2055 lost connection,
# and 4031 disconnected by the server (MySQL 8).
_TRANSIENT_CODES = frozenset({1040, 1053, 1205, 1213, 1927, 2003, 2006, 2013, 2055, 4031})
# 1050 table exists, 1060 duplicate column, 1061 duplicate key name: left by a migration whose
# earlier try committed some of its DDL statements.
_MIGRATION_REPEAT_CODES = frozenset({1050, 1060, 1061})
_MIGRATION_LOCK_WAIT_SECONDS = 60
# Strict mode makes an over-long value an error instead of silently truncating it.
_SESSION_SETUP = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'"
)


def _error_code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class MySQLRunStore(SQLRunStore):
    """A run store in a MySQL or MariaDB database; each deploy lock holds its own connection."""

    dialect = "mysql"

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (pymysql.err.MySQLError,)

    def _connect(self, *, autocommit: bool = False) -> Any:
        return pymysql.connect(
            host=self.url.host,
            port=self.url.port,
            user=self.url.user or "",
            password=self.url.password or "",
            database=self.url.database,
            charset="utf8mb4",
            connect_timeout=self.url.connect_timeout,
            read_timeout=60,
            write_timeout=60,
            autocommit=autocommit,
            init_command=_SESSION_SETUP,
        )

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, pymysql.err.InterfaceError):
            return True
        return isinstance(exc, pymysql.err.OperationalError) and _error_code(exc) in (
            _TRANSIENT_CODES
        )

    def _upsert_sql(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        updates = ", ".join(f"{c} = VALUES({c})" for c in columns if c not in keys)
        return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {updates}"

    def _insert_ignore_sql(self, table: str, columns: Sequence[str], key: str) -> str:
        # INSERT IGNORE would also hide data errors; this form only skips the duplicate key.
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        return (
            f"INSERT INTO {table} ({names}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {key} = {key}"
        )

    def _to_db_time(self, value: dt.datetime) -> dt.datetime:
        return value.astimezone(UTC).replace(tzinfo=None)

    def _from_db_time(self, value: Any) -> dt.datetime:
        return value.replace(tzinfo=UTC)

    def _table_exists_sql(self) -> str:
        return (
            "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE() "
            "AND table_name = ?"
        )

    def _lock_migrations(self, cursor: Any) -> None:
        name = self._lock_name("migrations")
        got = self._run(
            cursor, "SELECT GET_LOCK(?, ?)", (name, _MIGRATION_LOCK_WAIT_SECONDS)
        ).fetchone()[0]
        if got != 1:
            raise DatabaseError(
                f"another controller has been migrating the run database {self.url} for over "
                f"{_MIGRATION_LOCK_WAIT_SECONDS} s; retry "
                f"`{command_name()} db.migrate` once it ends"
            )
        # InnoDB may have fixed this transaction's read snapshot before the lock was granted,
        # so the transaction ends here and the version read below sees the winner's commit.
        cursor.connection.commit()

    def _unlock_migrations(self, cursor: Any) -> None:
        try:
            # Commit before the lock goes, so that the next holder reads this version row.
            # MySQL commits DDL statements on its own, so only that row can be pending here.
            cursor.connection.commit()
            self._run(cursor, "SELECT RELEASE_LOCK(?)", (self._lock_name("migrations"),))
        except pymysql.err.MySQLError as exc:
            log.debug("releasing the migration lock on %s failed: %s", self.url, exc)

    def _ignorable_migration_error(self, exc: BaseException) -> bool:
        return _error_code(exc) in _MIGRATION_REPEAT_CODES

    def _lock_name(self, *parts: str) -> str:
        # GET_LOCK names are server-wide and at most 64 characters, so the database name is
        # part of the hash and the name is "fraisier:" plus 40 hex digits.
        return "fraisier:" + lock_digest(self.url.database or "", *parts).hex()[:40]

    def _open_lock_session(self, environment: str, fraise: str) -> LockSession:
        # NOTE: if this connection drops while the deploy runs (server restart), the server
        # releases the lock and another controller may take it; nothing re-checks it.
        try:
            conn = self._connect(autocommit=True)
        except pymysql.err.MySQLError as exc:
            raise self._lock_failure(exc, "connecting for the deploy lock") from exc
        return LockSession(handle=conn, key=self._lock_name(environment, fraise))

    def _try_lock(self, session: LockSession) -> bool:
        try:
            with session.handle.cursor() as cursor:
                cursor.execute("SELECT GET_LOCK(%s, 0)", (session.key,))
                session.held = cursor.fetchone()[0] == 1
        except pymysql.err.MySQLError as exc:
            raise self._lock_failure(exc, "taking the deploy lock") from exc
        return session.held

    def _release_lock(self, session: LockSession) -> None:
        try:
            if session.held:
                with session.handle.cursor() as cursor:
                    cursor.execute("SELECT RELEASE_LOCK(%s)", (session.key,))
        except pymysql.err.MySQLError as exc:
            log.warning(
                "releasing a deploy lock on %s failed (%s); the server releases it when the "
                "session closes",
                self.url,
                describe_error(exc),
            )
        finally:
            session.held = False
            try:
                session.handle.close()
            except pymysql.err.MySQLError as exc:
                log.debug("closing the lock session on %s failed: %s", self.url, exc)

    def _lock_failure(self, exc: BaseException, what: str) -> DatabaseError:
        return DatabaseError(
            f"{what} on the run database {self.url} failed: {describe_error(exc)}; check that "
            "the server is running and reachable",
            code="database_unavailable",
            recoverable=self._is_transient(exc),
        )

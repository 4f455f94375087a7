"""The PostgreSQL run store (psycopg2), with deploy locks as session advisory locks."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import psycopg2

from fraisier.db.sqlstore import UTC, LockSession, SQLRunStore, describe_error, lock_digest, log
from fraisier.errors import DatabaseError

# Connection failures that reconnecting cannot fix.
_PERMANENT_MESSAGES = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
)
# Any 64-bit key works for pg_advisory_lock; this one keys the migration runner.
_MIGRATION_LOCK_KEY = int.from_bytes(lock_digest("migrations")[:8], "big", signed=True)


class PostgresRunStore(SQLRunStore):
    """A run store in a PostgreSQL database; each deploy lock holds its own connection."""

    dialect = "postgresql"

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg2.Error,)

    def _connect(self, *, autocommit: bool = False) -> Any:
        conn = psycopg2.connect(
            host=self.url.host,
            port=self.url.port,
            user=self.url.user,
            password=self.url.password,
            dbname=self.url.database,
            connect_timeout=max(1, math.ceil(self.url.connect_timeout)),
            application_name="fraisier",
            **self.url.options,
        )
        conn.autocommit = autocommit
        return conn

    def _is_transient(self, exc: BaseException) -> bool:
        if not isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            return False
        message = str(exc).lower()
        return not any(text in message for text in _PERMANENT_MESSAGES)

    def _to_db_time(self, value: dt.datetime) -> dt.datetime:
        return value.astimezone(UTC)

    def _from_db_time(self, value: Any) -> dt.datetime:
        return value.astimezone(UTC)

    def _table_exists_sql(self) -> str:
        return (
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
            "AND tablename = ?"
        )

    def _lock_migrations(self, cursor: Any) -> None:
        self._run(cursor, "SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))

    def lock_key(self, environment: str, fraise: str) -> int:
        """Return the signed 64-bit advisory lock key of a deploy lock.

        PostgreSQL scopes advisory locks to the current database, so the database name is
        not part of the key.
        """
        return int.from_bytes(lock_digest(environment, fraise)[:8], "big", signed=True)

    def _open_lock_session(self, environment: str, fraise: str) -> LockSession:
        # NOTE: if this connection drops while the deploy runs (server restart), the server
        # releases the lock and another controller may take it; nothing re-checks it.
        try:
            conn = self._connect(autocommit=True)
        except psycopg2.Error as exc:
            raise self._lock_failure(exc, "connecting for the deploy lock") from exc
        return LockSession(handle=conn, key=self.lock_key(environment, fraise))

    def _try_lock(self, session: LockSession) -> bool:
        try:
            with session.handle.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", (session.key,))
                session.held = bool(cursor.fetchone()[0])
        except psycopg2.Error as exc:
            raise self._lock_failure(exc, "taking the deploy lock") from exc
        return session.held

    def _release_lock(self, session: LockSession) -> None:
        # Closing the session releases its advisory locks as well; the explicit unlock only
        # makes the release independent of when the server notices the closed socket.
        try:
            if session.held:
                with session.handle.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (session.key,))
        except psycopg2.Error as exc:
            self._log_release_failure(exc)
        finally:
            session.held = False
            session.handle.close()

    def _lock_failure(self, exc: BaseException, what: str) -> DatabaseError:
        return DatabaseError(
            f"{what} on the run database {self.url} failed: {describe_error(exc)}; check that "
            "the server is running and reachable",
            code="database_unavailable",
            recoverable=self._is_transient(exc),
        )

    def _log_release_failure(self, exc: BaseException) -> None:
        log.warning(
            "releasing a deploy lock on %s failed (%s); the server releases it when the "
            "session closes",
            self.url,
            describe_error(exc),
        )

"""The SQL run store that the SQLite, PostgreSQL and MySQL drivers share.

Each driver supplies the connection, the error classification, the upsert syntax, the
timestamp conversion and the deploy lock primitive. This module contains the queries, the retry
loop and the migration runner. SQL is written with ``?`` placeholders and converted to the
driver's style.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from fraisier.command import command_name
from fraisier.db.base import HostRelease, RunDetail, RunStats, RunStore
from fraisier.db.migrations import Migration, latest_version, load_migrations
from fraisier.db.url import DatabaseURL
from fraisier.errors import DatabaseError, LockHeldError, SchemaVersionError
from fraisier.records import AuditEvent, HostRecord, LockHolder, RunRecord, StepRecord
from fraisier.redact import redact

log = logging.getLogger("fraisier.db")

T = TypeVar("T")
UTC = dt.timezone.utc

RUN_COLUMNS = tuple(f.name for f in dataclasses.fields(RunRecord))
HOST_COLUMNS = tuple(f.name for f in dataclasses.fields(HostRecord))
STEP_COLUMNS = tuple(f.name for f in dataclasses.fields(StepRecord))
EVENT_COLUMNS = ("event_key", "run_id", "kind", "at", "environment", "fraise", "host", "detail")
LOCK_COLUMNS = ("environment", "fraise", "run_id", "user_name", "controller", "pid", "since")
TIME_COLUMNS = frozenset({"started_at", "ended_at", "at", "since", "applied_at"})

DEFAULT_ATTEMPTS = 4
RETRY_DELAYS = (0.2, 0.5, 1.0)
LOCK_POLL_SECONDS = 0.25
HOLDER_ROW_WAIT = 2.0
STATS_LIMIT = 10000


def clean_text(value: str) -> str:
    """Make a string storable in all three databases.

    PostgreSQL rejects NUL characters, so NUL becomes U+FFFD everywhere. Lone surrogates, which
    no UTF-8 database accepts, become ``?``. Every other character is stored unchanged.
    """
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def describe_error(exc: BaseException) -> str:
    """Format a driver exception on one line, with secrets masked."""
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def event_key(event: AuditEvent) -> str:
    """Compute the idempotency key of an audit event from all of its fields."""
    payload = [
        event.run_id,
        event.kind,
        event.at.astimezone(UTC).isoformat() if event.at.tzinfo else event.at.isoformat(),
        event.environment,
        event.fraise,
        event.host,
        event.detail,
    ]
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def lock_digest(*parts: str) -> bytes:
    """Hash the parts of a deploy lock name into a stable 32-byte digest."""
    return hashlib.sha256("\x00".join(("fraisier-deploy", *parts)).encode("utf-8")).digest()


@dataclasses.dataclass
class LockSession:
    """The connection or file that holds one deploy lock, and the lock's name or key."""

    handle: Any
    key: Any
    held: bool = False


class SQLRunStore(RunStore):
    """A run store over one DB-API connection guarded by a lock, with reconnect and retry."""

    dialect: ClassVar[str]
    placeholder: ClassVar[str] = "%s"

    def __init__(
        self,
        url: DatabaseURL,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.url = url
        self._attempts = attempts
        self._retry_delays = tuple(retry_delays) or (0.0,)
        self._conn: Any = None
        self._mutex = threading.RLock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted()!r})"

    # Driver hooks.

    @property
    @abc.abstractmethod
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """Return the base exception classes of the DB-API driver."""

    @abc.abstractmethod
    def _connect(self) -> Any:
        """Open a new DB-API connection for queries, not in autocommit mode."""

    @abc.abstractmethod
    def _is_transient(self, exc: BaseException) -> bool:
        """Tell whether a driver error may pass after reconnecting (lost server, deadlock)."""

    @abc.abstractmethod
    def _to_db_time(self, value: dt.datetime) -> Any:
        """Convert an aware datetime to the value stored in a timestamp column."""

    @abc.abstractmethod
    def _from_db_time(self, value: Any) -> dt.datetime:
        """Convert a stored timestamp to an aware UTC datetime."""

    @abc.abstractmethod
    def _table_exists_sql(self) -> str:
        """Return a query with one placeholder that yields a row when the table exists."""

    @abc.abstractmethod
    def _open_lock_session(self, environment: str, fraise: str) -> LockSession:
        """Open the dedicated connection or file that holds one deploy lock."""

    @abc.abstractmethod
    def _try_lock(self, session: LockSession) -> bool:
        """Try once to take the deploy lock without waiting, and set ``session.held``."""

    @abc.abstractmethod
    def _release_lock(self, session: LockSession) -> None:
        """Release the deploy lock if ``session.held``, then close the session."""

    def _begin(self, cursor: Any, write: bool) -> None:
        """Start a transaction. DB-API drivers start one implicitly, so only SQLite overrides this."""

    def _lock_migrations(self, cursor: Any) -> None:
        """Serialize concurrent migrations for the rest of the transaction."""

    def _unlock_migrations(self, cursor: Any) -> None:
        """Release what ``_lock_migrations`` took, when the transaction does not."""

    def _ignorable_migration_error(self, exc: BaseException) -> bool:
        """Tell whether a migration statement failed only because an earlier try applied it."""
        return False

    def _upsert_sql(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
        return (
            f"INSERT INTO {table} ({names}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
        )

    def _insert_ignore_sql(self, table: str, columns: Sequence[str], key: str) -> str:
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ({key}) DO NOTHING"

    # Connection handling.

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except Exception as exc:  # the connection is broken already, so closing is best effort
            log.debug("closing a broken connection to %s failed: %s", self.url, exc)

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor.execute(self._sql(sql), tuple(params))
        return cursor

    def _execute(self, work: Callable[[Any], T], *, write: bool, what: str) -> T:
        """Run ``work(cursor)`` in one transaction, reconnecting and retrying transient errors."""
        with self._mutex:
            if self._closed:
                raise DatabaseError(f"the run store for {self.url} is closed; open a new one")
            attempt = 0
            while True:
                attempt += 1
                try:
                    return self._attempt(work, write)
                except self.driver_errors as exc:
                    transient = self._is_transient(exc)
                    if transient:
                        self._drop_connection()
                    if not transient or attempt >= self._attempts:
                        raise self._failure(exc, what, attempt, transient) from exc
                    delay = self._retry_delays[min(attempt, len(self._retry_delays)) - 1]
                    log.warning(
                        "%s on the run database %s failed (%s); reconnecting in %.1f s, "
                        "attempt %d of %d",
                        what,
                        self.url,
                        describe_error(exc),
                        delay,
                        attempt + 1,
                        self._attempts,
                    )
                    time.sleep(delay)

    def _attempt(self, work: Callable[[Any], T], write: bool) -> T:
        conn = self._connection()
        cursor = conn.cursor()
        try:
            self._begin(cursor, write)
            result = work(cursor)
            conn.commit()
            return result
        except BaseException:
            try:
                conn.rollback()
            except Exception as exc:  # the original error matters more than a failed rollback
                log.debug("rollback on %s failed: %s", self.url, exc)
            raise
        finally:
            try:
                cursor.close()
            except Exception as exc:  # a cursor of a dead connection may refuse to close
                log.debug("closing a cursor on %s failed: %s", self.url, exc)

    def _failure(
        self, exc: BaseException, what: str, attempt: int, transient: bool
    ) -> DatabaseError:
        if transient:
            return DatabaseError(
                f"{what} on the run database {self.url} failed after {attempt} attempt(s): "
                f"{describe_error(exc)}; check that the server is running and reachable",
                code="database_unavailable",
                recoverable=True,
            )
        return DatabaseError(
            f"{what} on the run database {self.url} failed: {describe_error(exc)}; check the "
            f"URL, the credentials and the schema version (`{command_name()} db.migrate`)",
            recoverable=False,
        )

    def close(self) -> None:
        """Close the query connection. The store cannot be used afterwards."""
        with self._mutex:
            self._closed = True
            self._drop_connection()

    # Value conversion.

    def _param(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        if column in TIME_COLUMNS:
            if value.tzinfo is None:
                # Naive datetimes are taken as UTC, the zone that records.utc_now() uses.
                value = value.replace(tzinfo=UTC)
            return self._to_db_time(value)
        if isinstance(value, str):
            return clean_text(value)
        return value

    def _params(self, record: Any, columns: Sequence[str]) -> list[Any]:
        return [self._param(c, getattr(record, c)) for c in columns]

    def _value(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        if column in TIME_COLUMNS:
            return self._from_db_time(value)
        if column == "output_truncated":
            return bool(value)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8")
        return value

    def _record(self, cls: type[T], columns: Sequence[str], row: Sequence[Any]) -> T:
        return cls(**{c: self._value(c, v) for c, v in zip(columns, row, strict=True)})

    # Schema.

    def _read_version(self, cursor: Any) -> int:
        if self._run(cursor, self._table_exists_sql(), ("schema_version",)).fetchone() is None:
            return 0
        row = self._run(cursor, "SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def schema_version(self) -> int:
        """Return the schema version of the database, 0 when it has no schema table."""
        return self._execute(self._read_version, write=False, what="reading the schema version")

    def check_schema(self) -> None:
        """Raise SchemaVersionError unless the schema version equals the code's."""
        current = self.schema_version()
        latest = latest_version()
        if current < latest:
            raise SchemaVersionError(
                f"the run database {self.url} has schema version {current}, older than "
                f"version {latest} that this Fraisier needs; run `{command_name()} db.migrate`",
                context={"current": current, "expected": latest},
            )
        if current > latest:
            raise self._newer_schema_error(current, latest)

    def _newer_schema_error(self, current: int, latest: int) -> SchemaVersionError:
        return SchemaVersionError(
            f"the run database {self.url} has schema version {current}, newer than version "
            f"{latest} that this Fraisier knows; upgrade Fraisier on this controller",
            context={"current": current, "expected": latest},
        )

    def migrate(self, target: int | None = None) -> list[int]:
        """Apply pending migrations up to ``target`` (default: the latest), one transaction each.

        Returns the versions applied. Raises SchemaVersionError when the database is newer
        than the code. PostgreSQL and SQLite roll a failed migration back; MySQL commits each
        DDL statement, and a rerun skips the statements that the failed try applied.
        """
        migrations = load_migrations(self.dialect)
        latest = len(migrations)
        goal = latest if target is None else target
        if not 0 <= goal <= latest:
            raise ValueError(f"migration target {goal} is outside 0..{latest}")
        applied: list[int] = []
        for migration in migrations[:goal]:
            done = self._execute(
                lambda cursor, m=migration: self._apply(cursor, m, latest),
                write=True,
                what=f"migration to schema version {migration.version}",
            )
            if done:
                applied.append(migration.version)
                log.info(
                    "applied schema migration %d (%s) to %s",
                    migration.version,
                    migration.name,
                    self.url,
                )
        return applied

    def _apply(self, cursor: Any, migration: Migration, latest: int) -> bool:
        self._lock_migrations(cursor)
        try:
            current = self._read_version(cursor)
            if current > latest:
                raise self._newer_schema_error(current, latest)
            if current >= migration.version:
                return False
            for statement in migration.statements:
                try:
                    self._run(cursor, statement)
                except self.driver_errors as exc:
                    if not self._ignorable_migration_error(exc):
                        raise
                    log.info(
                        "skipped a statement of migration %d that an earlier try applied: %s",
                        migration.version,
                        describe_error(exc),
                    )
            self._run(
                cursor,
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (migration.version, self._to_db_time(dt.datetime.now(UTC))),
            )
            return True
        finally:
            self._unlock_migrations(cursor)

    # Writes.

    def save_run(self, run: RunRecord) -> None:
        """Insert or update a run by run id."""
        sql = self._upsert_sql("runs", RUN_COLUMNS, ("run_id",))
        params = self._params(run, RUN_COLUMNS)
        self._execute(lambda cur: self._run(cur, sql, params), write=True, what="saving a run")

    def save_host(self, host: HostRecord) -> None:
        """Insert or update a host result by (run id, host)."""
        sql = self._upsert_sql("run_hosts", HOST_COLUMNS, ("run_id", "host"))
        params = self._params(host, HOST_COLUMNS)
        self._execute(lambda cur: self._run(cur, sql, params), write=True, what="saving a host")

    def save_step(self, step: StepRecord) -> None:
        """Insert or update a step result by (run id, host, position)."""
        sql = self._upsert_sql("run_steps", STEP_COLUMNS, ("run_id", "host", "position"))
        params = self._params(step, STEP_COLUMNS)
        self._execute(lambda cur: self._run(cur, sql, params), write=True, what="saving a step")

    def save_event(self, event: AuditEvent) -> None:
        """Insert an audit event. Saving the same event twice stores it once."""
        detail = json.dumps(event.detail, ensure_ascii=False, sort_keys=True, default=str)
        values = {
            "event_key": event_key(event),
            "run_id": event.run_id,
            "kind": event.kind,
            "at": event.at,
            "environment": event.environment,
            "fraise": event.fraise,
            "host": event.host,
            "detail": detail,
        }
        sql = self._insert_ignore_sql("audit_events", EVENT_COLUMNS, "event_key")
        params = [self._param(c, values[c]) for c in EVENT_COLUMNS]
        self._execute(lambda cur: self._run(cur, sql, params), write=True, what="saving an event")

    def mark_abandoned(self, environment: str, fraise: str, exclude_run_id: str) -> list[str]:
        """Set runs of the pair still "running", except ``exclude_run_id``, to "abandoned"."""
        now = self._to_db_time(dt.datetime.now(UTC))
        where = "environment = ? AND fraise = ? AND status = 'running' AND run_id <> ?"
        key = (environment, fraise, exclude_run_id)

        def work(cursor: Any) -> list[str]:
            rows = self._run(cursor, f"SELECT run_id FROM runs WHERE {where}", key).fetchall()
            self._run(
                cursor,
                "UPDATE runs SET status = 'abandoned', ended_at = COALESCE(ended_at, ?) "
                f"WHERE {where}",
                (now, *key),
            )
            return sorted(row[0] for row in rows)

        abandoned = self._execute(work, write=True, what="marking abandoned runs")
        if abandoned:
            log.warning(
                "marked %d run(s) of %s/%s as abandoned: %s",
                len(abandoned),
                environment,
                fraise,
                ", ".join(abandoned),
            )
        return abandoned

    # Reads.

    def list_runs(
        self, environment: str | None = None, fraise: str | None = None, limit: int = 20
    ) -> list[RunRecord]:
        """Return runs, newest first, optionally of one environment and fraise."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        conditions, params = [], []
        if environment is not None:
            conditions.append("environment = ?")
            params.append(environment)
        if fraise is not None:
            conditions.append("fraise = ?")
            params.append(fraise)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs {where} "
            "ORDER BY started_at DESC, run_id DESC LIMIT ?"
        )

        def work(cursor: Any) -> list[RunRecord]:
            rows = self._run(cursor, sql, (*params, int(limit))).fetchall()
            return [self._record(RunRecord, RUN_COLUMNS, row) for row in rows]

        return self._execute(work, write=False, what="listing runs")

    def get_run(self, run_id: str) -> RunDetail | None:
        """Return one run with its hosts, steps and events, or None."""

        def work(cursor: Any) -> RunDetail | None:
            row = self._run(
                cursor, f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            hosts = self._run(
                cursor,
                f"SELECT {', '.join(HOST_COLUMNS)} FROM run_hosts WHERE run_id = ? ORDER BY host",
                (run_id,),
            ).fetchall()
            steps = self._run(
                cursor,
                f"SELECT {', '.join(STEP_COLUMNS)} FROM run_steps WHERE run_id = ? "
                "ORDER BY host, position",
                (run_id,),
            ).fetchall()
            events = self._run(
                cursor,
                "SELECT run_id, kind, at, environment, fraise, host, detail FROM audit_events "
                "WHERE run_id = ? ORDER BY at, id",
                (run_id,),
            ).fetchall()
            return RunDetail(
                run=self._record(RunRecord, RUN_COLUMNS, row),
                hosts=[self._record(HostRecord, HOST_COLUMNS, h) for h in hosts],
                steps=[self._record(StepRecord, STEP_COLUMNS, s) for s in steps],
                events=[self._event(e) for e in events],
            )

        return self._execute(work, write=False, what="reading a run")

    def _event(self, row: Sequence[Any]) -> AuditEvent:
        run_id, kind, at, environment, fraise, host, detail = row
        return AuditEvent(
            run_id=run_id,
            kind=kind,
            at=self._from_db_time(at),
            environment=environment,
            fraise=fraise,
            host=host,
            detail=json.loads(self._value("detail", detail)),
        )

    def list_pairs(self) -> list[tuple[str, str]]:
        """Return every (environment, fraise) pair that has a run, sorted."""
        sql = "SELECT DISTINCT environment, fraise FROM runs ORDER BY environment, fraise"
        rows = self._execute(
            lambda cur: self._run(cur, sql).fetchall(), write=False, what="listing pairs"
        )
        return [(row[0], row[1]) for row in rows]

    def host_releases(self, environment: str) -> list[HostRelease]:
        """Return the newest known release per fraise and host of an environment."""
        sql = (
            "SELECT fraise, host, final_release, new_release, previous_release, status, run_id, "
            "at FROM (SELECT r.fraise, h.host, h.final_release, h.new_release, "
            "h.previous_release, h.status, h.run_id, COALESCE(h.ended_at, r.started_at) AS at, "
            "ROW_NUMBER() OVER (PARTITION BY r.fraise, h.host "
            "ORDER BY r.started_at DESC, r.run_id DESC) AS newest "
            "FROM run_hosts h JOIN runs r ON r.run_id = h.run_id "
            "WHERE r.environment = ? AND COALESCE(h.final_release, h.new_release, "
            "h.previous_release) IS NOT NULL) ranked WHERE newest = 1 ORDER BY fraise, host"
        )
        rows = self._execute(
            lambda cur: self._run(cur, sql, (environment,)).fetchall(),
            write=False,
            what="reading host releases",
        )
        releases = []
        for fraise, host, final, new, previous, status, run_id, at in rows:
            # final_release is the release left on the host. A writer that did not set it has
            # new_release (on success) or previous_release (on failure before the switch).
            release = final or (new if status == "success" else previous) or new
            releases.append(
                HostRelease(
                    environment=environment,
                    fraise=fraise,
                    host=host,
                    release=release,
                    status=status,
                    run_id=run_id,
                    at=self._value("at", at),
                )
            )
        return releases

    def run_stats(self, environment: str, fraise: str) -> RunStats:
        """Compute the run aggregates of one environment and fraise in one transaction."""
        pair = "r.environment = ? AND r.fraise = ?"
        key = (environment, fraise)

        def counts(cursor: Any, sql: str) -> dict[str, int]:
            return {row[0]: int(row[1]) for row in self._run(cursor, sql, key).fetchall()}

        def durations(cursor: Any, sql: str) -> list[float]:
            rows = self._run(cursor, sql, (*key, STATS_LIMIT)).fetchall()
            values = [
                (self._from_db_time(end) - self._from_db_time(start)).total_seconds()
                for start, end in rows
            ]
            values.reverse()
            return values

        def work(cursor: Any) -> RunStats:
            stats = RunStats()
            stats.runs_by_status = counts(
                cursor,
                f"SELECT r.status, COUNT(*) FROM runs r WHERE {pair} AND r.task = 'deploy' "
                "GROUP BY r.status",
            )

            host_errors = counts(
                cursor,
                "SELECT h.error_code, COUNT(*) FROM run_hosts h JOIN runs r "
                f"ON r.run_id = h.run_id WHERE {pair} AND h.error_code IS NOT NULL "
                "GROUP BY h.error_code",
            )
            run_errors = counts(
                cursor,
                f"SELECT r.error_code, COUNT(*) FROM runs r WHERE {pair} "
                "AND r.error_code IS NOT NULL AND NOT EXISTS (SELECT 1 FROM run_hosts h "
                "WHERE h.run_id = r.run_id AND h.error_code IS NOT NULL) GROUP BY r.error_code",
            )
            stats.errors_by_code = _merge_counts(host_errors, run_errors)

            reasons = counts(
                cursor,
                f"SELECT r.rollback_reason, COUNT(*) FROM runs r WHERE {pair} "
                "AND r.rollback_reason IS NOT NULL GROUP BY r.rollback_reason",
            )
            manual = counts(
                cursor,
                f"SELECT 'manual', COUNT(*) FROM runs r WHERE {pair} AND r.task = 'rollback' "
                "AND r.rollback_reason IS NULL",
            )
            stats.rollbacks_by_reason = _merge_counts(reasons, manual)

            row = self._run(
                cursor,
                f"SELECT MAX(r.ended_at) FROM runs r WHERE {pair} AND r.task = 'deploy' "
                "AND r.status = 'success'",
                key,
            ).fetchone()
            stats.last_success_at = self._value("ended_at", row[0] if row else None)

            row = self._run(
                cursor,
                f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)} FROM runs r WHERE {pair} "
                "ORDER BY r.started_at DESC, r.run_id DESC LIMIT 1",
                key,
            ).fetchone()
            stats.last_run = self._record(RunRecord, RUN_COLUMNS, row) if row else None

            stats.run_durations = durations(
                cursor,
                f"SELECT r.started_at, r.ended_at FROM runs r WHERE {pair} "
                "AND r.task = 'deploy' AND r.ended_at IS NOT NULL "
                "ORDER BY r.started_at DESC LIMIT ?",
            )

            stats.health_check_durations = durations(
                cursor,
                "SELECT s.started_at, s.ended_at FROM run_steps s JOIN runs r "
                f"ON r.run_id = s.run_id WHERE {pair} AND s.name = 'health_check' "
                "ORDER BY s.started_at DESC LIMIT ?",
            )

            row = self._run(
                cursor,
                f"SELECT COUNT(*) FROM runs r WHERE {pair} AND r.status = 'running'",
                key,
            ).fetchone()
            stats.active_runs = int(row[0]) if row else 0

            return stats

        return self._execute(work, write=False, what="computing run statistics")

    # Deploy lock.

    @contextmanager
    def lock(
        self, environment: str, fraise: str, holder: LockHolder, wait_seconds: float = 0
    ) -> Iterator[None]:
        """Hold the cross-controller deploy lock of (environment, fraise) for the block.

        Polls every 0.25 s until ``wait_seconds`` have passed, then raises LockHeldError naming
        the holder from the ``deploy_locks`` row. The holder row is written once the lock is
        taken and deleted on release; a row left by a dead holder is overwritten.
        """
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must be 0 or more, got {wait_seconds}")
        session = self._open_lock_session(environment, fraise)
        try:
            deadline = time.monotonic() + wait_seconds
            while not self._try_lock(session):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._lock_held_error(environment, fraise, wait_seconds)
                time.sleep(min(LOCK_POLL_SECONDS, remaining))
        except BaseException:
            self._release_lock(session)
            raise
        try:
            self._write_holder(environment, fraise, holder)
            log.info("took the deploy lock of %s/%s for run %s", environment, fraise, holder.run_id)
            yield
        finally:
            self._clear_holder(environment, fraise, holder.run_id)
            self._release_lock(session)
            log.info(
                "released the deploy lock of %s/%s for run %s", environment, fraise, holder.run_id
            )

    def _write_holder(self, environment: str, fraise: str, holder: LockHolder) -> None:
        values = {
            "environment": environment,
            "fraise": fraise,
            "run_id": holder.run_id,
            "user_name": holder.user,
            "controller": holder.controller,
            "pid": holder.pid,
            "since": holder.since,
        }
        sql = self._upsert_sql("deploy_locks", LOCK_COLUMNS, ("environment", "fraise"))
        params = [self._param(c, values[c]) for c in LOCK_COLUMNS]
        self._execute(
            lambda cur: self._run(cur, sql, params), write=True, what="recording the lock holder"
        )

    def _clear_holder(self, environment: str, fraise: str, run_id: str) -> None:
        sql = "DELETE FROM deploy_locks WHERE environment = ? AND fraise = ? AND run_id = ?"
        try:
            self._execute(
                lambda cur: self._run(cur, sql, (environment, fraise, run_id)),
                write=True,
                what="deleting the lock holder",
            )
        except DatabaseError as exc:
            # A stale row is harmless: the next holder overwrites it.
            log.warning(
                "could not delete the lock holder row of %s/%s: %s", environment, fraise, exc
            )

    def read_holder(self, environment: str, fraise: str) -> LockHolder | None:
        """Return the holder row of a deploy lock, which may be stale, or None."""
        sql = (
            "SELECT run_id, user_name, controller, since, pid FROM deploy_locks "
            "WHERE environment = ? AND fraise = ?"
        )
        row = self._execute(
            lambda cur: self._run(cur, sql, (environment, fraise)).fetchone(),
            write=False,
            what="reading the lock holder",
        )
        if row is None:
            return None
        run_id, user, controller, since, pid = row
        return LockHolder(run_id, user, controller, self._from_db_time(since), pid)

    def _lock_held_error(self, environment: str, fraise: str, waited: float) -> LockHeldError:
        holder = None
        # The holder writes its row just after taking the lock, so the loser of a close race
        # may read before the row exists. It reads again for up to HOLDER_ROW_WAIT seconds.
        deadline = time.monotonic() + HOLDER_ROW_WAIT
        while holder is None:
            try:
                holder = self.read_holder(environment, fraise)
            except DatabaseError as exc:
                log.warning("could not read the lock holder of %s/%s: %s", environment, fraise, exc)
                break
            if holder is None and time.monotonic() >= deadline:
                break
            if holder is None:
                time.sleep(0.1)
        after = f" after waiting {waited:g} s" if waited else ""
        if holder is None:
            who = "another controller that has not recorded itself yet"
            holder_dict: dict[str, Any] = {}
        else:
            pid = f", pid {holder.pid}" if holder.pid is not None else ""
            who = holder.describe() + pid
            holder_dict = {
                "run_id": holder.run_id,
                "user": holder.user,
                "controller": holder.controller,
                "pid": holder.pid,
                "since": holder.since.isoformat(),
            }
        return LockHeldError(
            f"the deploy lock of {environment}/{fraise} is held by {who}{after}; wait for "
            "that run to end, or wait for it with --wait-lock SECONDS",
            holder=holder_dict,
            context={"environment": environment, "fraise": fraise},
        )


def _merge_counts(*parts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            if value:
                merged[key] = merged.get(key, 0) + value
    return merged

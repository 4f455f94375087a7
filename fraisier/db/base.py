"""The abstract run store that the SQLite, PostgreSQL and MySQL drivers implement."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from fraisier.records import AuditEvent, HostRecord, LockHolder, RunRecord, StepRecord


@dataclasses.dataclass
class RunDetail:
    run: RunRecord
    hosts: list[HostRecord]
    steps: list[StepRecord]
    events: list[AuditEvent]


@dataclasses.dataclass
class RunStats:
    """Aggregates of the run history of one environment and fraise, read by the metrics code."""

    # Deploy runs (task "deploy") by status.
    runs_by_status: dict[str, int] = dataclasses.field(default_factory=dict)
    # Host records with an error code, plus runs with an error code and no host error.
    errors_by_code: dict[str, int] = dataclasses.field(default_factory=dict)
    # Runs with a rollback reason, plus rollback-task runs without one counted as "manual".
    rollbacks_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    # End time of the newest successful deploy run.
    last_success_at: dt.datetime | None = None
    # Newest run of any task.
    last_run: RunRecord | None = None
    # Seconds of the newest 10000 ended deploy runs, oldest first.
    run_durations: list[float] = dataclasses.field(default_factory=list)
    # Seconds of the newest 10000 steps named "health_check", oldest first.
    health_check_durations: list[float] = dataclasses.field(default_factory=list)
    # Runs of any task with status "running".
    active_runs: int = 0


@dataclasses.dataclass
class HostRelease:
    """The newest known release of one fraise on one host, from its newest host record."""

    environment: str
    fraise: str
    host: str
    release: str | None
    status: str
    run_id: str
    at: dt.datetime | None


class RunStore(abc.ABC):
    """A database that records runs, hosts, steps and audit events, and holds deploy locks.

    Writes are idempotent by run id (and host, and step position), so a write that is retried
    after a lost connection, or replayed from the journal, never duplicates a row.
    Every method raises ``fraisier.errors.DatabaseError`` (recoverable when the failure is
    transient) and never includes credentials in its message.
    """

    @abc.abstractmethod
    def migrate(self) -> list[int]:
        """Apply pending migrations and return the versions applied."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """Return the schema version of the database, 0 when empty."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise SchemaVersionError when the schema is older or newer than the code."""

    @abc.abstractmethod
    def save_run(self, run: RunRecord) -> None:
        """Insert or update a run by run id."""

    @abc.abstractmethod
    def save_host(self, host: HostRecord) -> None:
        """Insert or update a host result by (run id, host)."""

    @abc.abstractmethod
    def save_step(self, step: StepRecord) -> None:
        """Insert or update a step result by (run id, host, position)."""

    @abc.abstractmethod
    def save_event(self, event: AuditEvent) -> None:
        """Insert an audit event."""

    @abc.abstractmethod
    def list_runs(
        self, environment: str | None = None, fraise: str | None = None, limit: int = 20
    ) -> list[RunRecord]:
        """Return runs, newest first."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunDetail | None:
        """Return one run with its hosts, steps and events, or None."""

    @abc.abstractmethod
    @contextmanager
    def lock(
        self, environment: str, fraise: str, holder: LockHolder, wait_seconds: float = 0
    ) -> Iterator[None]:
        """Hold the cross-controller deploy lock of (environment, fraise) for the block.

        Raises LockHeldError naming the holder when another session holds it after
        ``wait_seconds``. The database releases the lock when the holding session dies.
        """

    @abc.abstractmethod
    def run_stats(self, environment: str, fraise: str) -> RunStats:
        """Compute the run aggregates of one environment and fraise."""

    @abc.abstractmethod
    def list_pairs(self) -> list[tuple[str, str]]:
        """Return every (environment, fraise) pair that has a run, sorted."""

    @abc.abstractmethod
    def mark_abandoned(self, environment: str, fraise: str, exclude_run_id: str) -> list[str]:
        """Set runs of the pair still "running", except ``exclude_run_id``, to "abandoned".

        The caller holds the deploy lock, so any other running run has lost its controller.
        Returns the run ids changed.
        """

    @abc.abstractmethod
    def host_releases(self, environment: str) -> list[HostRelease]:
        """Return the newest release per fraise and host of an environment."""

    def ensure_schema(self) -> list[int]:
        """Migrate an empty database, else check its schema version; return versions applied.

        A database with an older non-empty schema is not migrated: ``check_schema`` raises
        SchemaVersionError telling the operator to run ``inv db.migrate``.
        """
        if self.schema_version() == 0:
            return self.migrate()
        self.check_schema()
        return []

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection."""

"""The abstract run store that the SQLite, PostgreSQL and MySQL drivers implement."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from fraisier.records import AuditEvent, HostRecord, LockHolder, RunRecord, StepRecord


@dataclasses.dataclass
class RunDetail:
    run: RunRecord
    hosts: list[HostRecord]
    steps: list[StepRecord]
    events: list[AuditEvent]


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
    def close(self) -> None:
        """Close every connection."""

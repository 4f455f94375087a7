"""The facade through which the engine records runs: a store write, or the journal if it fails."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fraisier.command import command_name
from fraisier.db.base import RunStore
from fraisier.db.journal import Journal, Record
from fraisier.errors import DatabaseError, SchemaVersionError
from fraisier.records import AuditEvent, HostRecord, RunRecord, StepRecord
from fraisier.redact import redact

log = logging.getLogger("fraisier.db.recorder")

DEFAULT_RETRY_INTERVAL = 30.0
# While the database stays unavailable, one warning per this many journaled records.
WARN_EVERY = 100


def redact_record(record: Record) -> Record:
    """Return a copy of a record with every string field and the event detail redacted."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, (str, dict, list)):
            changes[field.name] = redact(value)
    return dataclasses.replace(record, **changes)


class Recorder:
    """Writes run records to the run store and journals the ones that cannot be written.

    ``save_run``, ``save_host``, ``save_step`` and ``save_event`` raise no Exception; only
    KeyboardInterrupt and SystemExit pass through. Once one record
    is journaled, later records are journaled too, so that they reach the store in order. The
    journal is replayed by ``replay()``, and by a save once ``retry_interval`` seconds have
    passed since the last failure. Every string is redacted before it is written anywhere.
    """

    def __init__(
        self,
        store_factory: Callable[[], RunStore],
        journal_path: Path,
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        database: str | None = None,
    ) -> None:
        self._store_factory = store_factory
        self.journal = Journal(journal_path, database=database)
        self._retry_interval = retry_interval
        self._clock = clock
        self._store: RunStore | None = None
        self._schema_ready = False
        self._mutex = threading.RLock()
        self._next_attempt = 0.0
        self._journaled = 0
        self._warned = False
        self._last_error: BaseException | None = None

    def save_run(self, run: RunRecord) -> None:
        """Record a run by run id; journal it if the store fails."""
        self._save(run)

    def save_host(self, host: HostRecord) -> None:
        """Record a host result by (run id, host); journal it if the store fails."""
        self._save(host)

    def save_step(self, step: StepRecord) -> None:
        """Record a step result by (run id, host, position); journal it if the store fails."""
        self._save(step)

    def save_event(self, event: AuditEvent) -> None:
        """Record an audit event; journal it if the store fails."""
        self._save(event)

    def pending(self) -> int:
        """Return the number of journaled records not yet in the store."""
        return self.journal.pending()

    def replay(self, *, strict: bool = False) -> int:
        """Write the journaled records to the store in order and return how many were written.

        The journal is emptied only after every record was written. An empty database is
        migrated first. SchemaVersionError always propagates, because only the operator can
        fix it; other DatabaseErrors propagate with ``strict``, else they are logged and 0 is
        returned.
        """
        with self._mutex:
            try:
                return self._replay()
            except SchemaVersionError:
                raise
            except (DatabaseError, OSError) as exc:
                self._next_attempt = self._clock() + self._retry_interval
                if strict:
                    raise
                log.warning(
                    "could not replay the journal %s (%d record(s) pending): %s",
                    self.journal.path,
                    self.journal.pending(),
                    exc,
                )
                return 0

    def close(self) -> None:
        """Close the store, if one was opened."""
        with self._mutex:
            store, self._store = self._store, None
            if store is not None:
                store.close()

    def _get_store(self) -> RunStore:
        if self._store is None:
            self._store = self._store_factory()
        if not self._schema_ready:
            applied = self._store.ensure_schema()
            if applied:
                log.info("migrated the empty run database to schema version %d", applied[-1])
            self._schema_ready = True
        return self._store

    def _write(self, record: Record) -> None:
        store = self._get_store()
        if isinstance(record, RunRecord):
            store.save_run(record)
        elif isinstance(record, HostRecord):
            store.save_host(record)
        elif isinstance(record, StepRecord):
            store.save_step(record)
        elif isinstance(record, AuditEvent):
            store.save_event(record)
        else:
            raise TypeError(f"cannot record a {type(record).__name__}")

    def _replay(self) -> int:
        self._get_store()
        count = self.journal.replay(self._write)
        if count:
            log.info("replayed %d journaled record(s) into the run database", count)
        self._recovered()
        return count

    def _save(self, record: Record) -> None:
        try:
            record = redact_record(record)
        except Exception as exc:  # a record that cannot be redacted must still not stop a run
            log.error("could not redact a %s record: %s", type(record).__name__, exc)
            return
        with self._mutex:
            try:
                if self.journal.has_pending() and not self._drain_journal():
                    self._append(record, None)
                    return
                self._write(record)
                self._recovered()
            except DatabaseError as exc:
                self._append(record, exc)
            except Exception as exc:  # journal the record whatever the store raised
                log.error(
                    "recording a %s failed unexpectedly; journaling it",
                    type(record).__name__,
                    exc_info=exc,
                )
                self._append(record, exc)

    def _drain_journal(self) -> bool:
        """Replay the journal if the retry interval has passed; tell whether it is empty now."""
        if self._clock() < self._next_attempt:
            return False
        try:
            self._replay()
        except Exception as exc:  # the caller journals its record and logs the cause
            self._next_attempt = self._clock() + self._retry_interval
            self._last_error = exc
            log.debug("replaying the journal %s failed: %s", self.journal.path, exc)
            return False
        return not self.journal.has_pending()

    def _append(self, record: Record, error: BaseException | None) -> None:
        if error is not None:
            self._next_attempt = self._clock() + self._retry_interval
            self._last_error = error
        try:
            self.journal.append(record)
        except OSError as exc:
            log.error(
                "cannot append to the journal %s (%s); a %s record of run %s is lost",
                self.journal.path,
                exc,
                type(record).__name__,
                record.run_id,
            )
            return
        self._journaled += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "the run database is unavailable (%s); journaling records to %s until it is "
                "back, and `%s db.sync` replays them",
                self._last_error or "earlier records are still journaled",
                self.journal.path,
                command_name(),
            )
        elif self._journaled % WARN_EVERY == 0:
            log.warning(
                "the run database is still unavailable; %d record(s) journaled to %s",
                self._journaled,
                self.journal.path,
            )

    def _recovered(self) -> None:
        if self._warned:
            log.info(
                "the run database is reachable again after %d journaled record(s)",
                self._journaled,
            )
        self._warned = False
        self._journaled = 0

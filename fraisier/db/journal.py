"""An append-only JSON-lines file of records that could not reach the run database.

Each line is one object ``{"kind": "run" | "host" | "step" | "event", "record": {...}}`` with
timestamps as ISO 8601 strings. Appends are fsync'ed, and an exclusive ``flock`` on the file
keeps appends and a replay of several processes from interleaving.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fraisier.records import AuditEvent, HostRecord, RunRecord, StepRecord

log = logging.getLogger("fraisier.db.journal")

Record = RunRecord | HostRecord | StepRecord | AuditEvent
RECORD_TYPES: dict[str, type] = {
    "run": RunRecord,
    "host": HostRecord,
    "step": StepRecord,
    "event": AuditEvent,
}
KIND_OF_TYPE = {cls: kind for kind, cls in RECORD_TYPES.items()}
TIME_FIELDS = frozenset({"started_at", "ended_at", "at"})


def encode_record(record: Record) -> str:
    """Serialise a record as one journal line, without the trailing newline."""
    kind = KIND_OF_TYPE.get(type(record))
    if kind is None:
        raise TypeError(f"cannot journal a {type(record).__name__}: expected a run store record")
    fields = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        fields[field.name] = value.isoformat() if isinstance(value, dt.datetime) else value
    return json.dumps({"kind": kind, "record": fields}, ensure_ascii=False, default=str)


def decode_record(line: str) -> Record:
    """Parse one journal line back into its record; raises ValueError on a malformed line."""
    try:
        data = json.loads(line)
        cls = RECORD_TYPES[data["kind"]]
        fields = dict(data["record"])
        for name in TIME_FIELDS & fields.keys():
            if fields[name] is not None:
                fields[name] = dt.datetime.fromisoformat(fields[name])
        return cls(**fields)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed journal line: {exc}") from None


class Journal:
    """The journal file at ``path``; the file and its directory are created on first append.

    ``database`` names the database the records are for, without a password. The first append
    writes it to ``PATH.database``, so that ``db.sync`` can name the database of a journal.
    """

    def __init__(self, path: Path, database: str | None = None) -> None:
        self.path = Path(path)
        self.rejected_path = self.path.with_name(self.path.name + ".rejected")
        self.database = database
        self._database_written = False

    @property
    def database_path(self) -> Path:
        return self.path.with_name(self.path.name + ".database")

    @contextmanager
    def _locked(self, flags: int) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def append(self, record: Record) -> None:
        """Append one record and fsync it; raises OSError when the file cannot be written."""
        data = (encode_record(record) + "\n").encode("utf-8", "surrogatepass")
        with self._locked(os.O_WRONLY | os.O_APPEND) as fd:
            if self.database and not self._database_written:
                # Written once per Journal object, not stat'ed at every append.
                if not self.database_path.exists():
                    self.database_path.write_text(self.database + "\n", encoding="utf-8")
                self._database_written = True
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)

    def pending(self) -> int:
        """Return the number of records waiting in the journal."""
        try:
            with self.path.open("rb") as file:
                return sum(1 for line in file if line.strip())
        except FileNotFoundError:
            return 0

    def has_pending(self) -> bool:
        """Tell whether the journal contains any record, without reading it."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, write: Callable[[Record], None]) -> int:
        """Pass every record to ``write`` in order, then empty the journal.

        The journal stays locked during the replay, so other processes wait to append. When
        ``write`` raises, the journal is left whole and the error propagates; the writes
        already done are upserts, so replaying them again does no harm. Malformed lines, such
        as one cut short by a crash, are moved to ``<journal>.rejected`` with a warning.
        """
        if not self.has_pending():
            return 0
        with self._locked(os.O_RDWR) as fd:
            with os.fdopen(os.dup(fd), "rb") as file:
                lines = file.read().decode("utf-8", "surrogatepass").splitlines()
            records, rejected = [], []
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(decode_record(line))
                except ValueError as exc:
                    log.warning("skipping line %d of the journal %s: %s", number, self.path, exc)
                    rejected.append(line)
            for record in records:
                write(record)
            if rejected:
                self._keep_rejected(rejected)
            os.ftruncate(fd, 0)
            os.fsync(fd)
        return len(records)

    def _keep_rejected(self, lines: list[str]) -> None:
        with self.rejected_path.open("a", encoding="utf-8", errors="surrogatepass") as file:
            file.write("\n".join(lines) + "\n")
        log.warning(
            "moved %d malformed journal line(s) to %s; inspect them by hand",
            len(lines),
            self.rejected_path,
        )

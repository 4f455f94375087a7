"""Records of runs, hosts, steps and audit events, as the run store keeps them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

OUTPUT_TAIL_BYTES = 4096

# Run statuses. A run is "running" until it ends. A later run sets "abandoned" on a running run
# whose controller no longer has the lock.
RUN_STATUSES = ("running", "success", "failed", "rolled_back", "interrupted", "abandoned")
HOST_STATUSES = ("pending", "running", "success", "failed", "rolled_back", "skipped", "unreachable")
STEP_STATUSES = ("success", "failed", "timeout", "skipped")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def tail(text: str, limit: int = OUTPUT_TAIL_BYTES) -> tuple[str, bool]:
    """Return the last ``limit`` characters of ``text`` and whether anything was cut."""
    if len(text) <= limit:
        return text, False
    return text[-limit:], True


@dataclasses.dataclass
class RunRecord:
    run_id: str
    environment: str
    fraise: str
    task: str  # deploy, rollback
    started_at: dt.datetime
    status: str = "running"
    release_id: str | None = None
    git_ref: str | None = None
    git_commit: str | None = None
    started_by: str | None = None  # user name on the controller
    controller: str | None = None  # controller host name
    ci_job: str | None = None  # CI job URL or id, when the run comes from CI
    ended_at: dt.datetime | None = None
    exit_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    rollback_reason: str | None = None
    config_digest: str | None = None
    push_error: str | None = None


@dataclasses.dataclass
class HostRecord:
    run_id: str
    host: str
    status: str = "pending"
    previous_release: str | None = None
    new_release: str | None = None
    final_release: str | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclasses.dataclass
class StepRecord:
    run_id: str
    host: str
    position: int
    name: str
    status: str
    started_at: dt.datetime
    ended_at: dt.datetime
    attempts: int = 1
    exit_status: int | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    output_truncated: bool = False
    error_code: str | None = None

    @property
    def duration(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


@dataclasses.dataclass
class AuditEvent:
    run_id: str
    kind: str  # run_started, run_ended, switched, rolled_back, lock_taken, lock_released, config_changed
    at: dt.datetime
    environment: str | None = None
    fraise: str | None = None
    host: str | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LockHolder:
    run_id: str
    user: str
    controller: str
    since: dt.datetime
    pid: int | None = None

    def describe(self) -> str:
        return (
            f"run {self.run_id} by {self.user} on {self.controller} since "
            f"{self.since.isoformat(timespec='seconds')}"
        )

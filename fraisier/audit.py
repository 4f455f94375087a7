"""Audit trail: who deployed what, where, when, and what changed in the configuration.

Every audit event is redacted, then logged at INFO with ``extra={"event": "audit",
"audit_kind": kind, ...}`` and saved by the recorder (the run store) when there is one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from fraisier.records import AuditEvent, LockHolder, RunRecord, utc_now
from fraisier.redact import redact

AUDIT_KINDS = (
    "run_started",
    "run_ended",
    "switched",
    "rolled_back",
    "lock_taken",
    "lock_released",
    "config_changed",
)
# A config_changed event keeps at most this many changes, so that a rewritten inventory
# does not produce one huge row; ``change_count`` keeps the real number.
MAX_CONFIG_CHANGES = 100


class EventRecorder(Protocol):
    """Store that keeps audit events, such as the database run store."""

    def save_event(self, event: AuditEvent) -> None: ...


class Auditor:
    """Writer of audit events to the log and to a recorder.

    ``strict=False`` logs a recorder failure at ERROR and carries on, because an audit
    row that cannot be saved must not stop a deploy halfway through a switch. With
    ``strict=True`` the recorder error is raised.
    """

    def __init__(
        self,
        recorder: EventRecorder | None,
        logger: logging.Logger | None = None,
        strict: bool = False,
    ) -> None:
        self.recorder = recorder
        self.logger = logger or logging.getLogger("fraisier.audit")
        self.strict = strict
        self.failed_saves = 0
        # Environment and fraise of each run, so that host and lock events carry them too.
        self._runs: dict[str, tuple[str | None, str | None]] = {}

    # Run ---------------------------------------------------------------------------------

    def run_started(self, run: RunRecord) -> AuditEvent:
        """Record the start of ``run`` with who started it, from where and for which ref."""
        detail = {
            "task": run.task,
            "release_id": run.release_id,
            "git_ref": run.git_ref,
            "git_commit": run.git_commit,
            "started_by": run.started_by,
            "controller": run.controller,
            "ci_job": run.ci_job,
            "config_digest": run.config_digest,
        }
        message = f"run {run.run_id} started: {run.task} {run.environment}/{run.fraise}"
        if run.started_by:
            message += f" by {run.started_by}"
        return self.record(
            "run_started",
            run.run_id,
            message,
            environment=run.environment,
            fraise=run.fraise,
            detail=detail,
        )

    def run_ended(self, run: RunRecord) -> AuditEvent:
        """Record the end of ``run`` with its status, exit code and error."""
        duration = None
        if run.ended_at is not None:
            duration = round((run.ended_at - run.started_at).total_seconds(), 3)
        detail = {
            "task": run.task,
            "status": run.status,
            "release_id": run.release_id,
            "exit_code": run.exit_code,
            "error_code": run.error_code,
            "error_message": run.error_message,
            "rollback_reason": run.rollback_reason,
            "duration": duration,
        }
        message = f"run {run.run_id} ended: {run.status}"
        return self.record(
            "run_ended",
            run.run_id,
            message,
            environment=run.environment,
            fraise=run.fraise,
            detail=detail,
        )

    # Host ----------------------------------------------------------------------------------

    def switched(
        self, run_id: str, host: str, from_release: str | None, to_release: str
    ) -> AuditEvent:
        """Record that ``host`` now serves ``to_release`` in place of ``from_release``."""
        detail = {"from_release": from_release, "to_release": to_release}
        message = f"switched {host} from {from_release or 'no release'} to {to_release}"
        return self.record("switched", run_id, message, host=host, detail=detail)

    def rolled_back(
        self,
        run_id: str,
        host: str,
        from_release: str | None,
        to_release: str | None,
        reason: str,
    ) -> AuditEvent:
        """Record that ``host`` went back from ``from_release`` to ``to_release``."""
        detail = {"from_release": from_release, "to_release": to_release, "reason": reason}
        message = (
            f"rolled back {host} from {from_release or 'no release'} "
            f"to {to_release or 'no release'}: {reason}"
        )
        return self.record("rolled_back", run_id, message, host=host, detail=detail)

    # Lock ----------------------------------------------------------------------------------

    def lock_taken(
        self, run_id: str, scope: str, holder: LockHolder | Mapping[str, Any] | str | None
    ) -> AuditEvent:
        """Record that ``run_id`` took the deploy lock of ``scope`` (environment/fraise)."""
        if isinstance(holder, LockHolder):
            holder_detail: Any = dataclasses.asdict(holder)
        elif isinstance(holder, Mapping):
            holder_detail = dict(holder)
        else:
            holder_detail = holder
        detail = {"scope": scope, "holder": holder_detail}
        return self.record("lock_taken", run_id, f"lock {scope} taken", detail=detail)

    def lock_released(self, run_id: str, scope: str) -> AuditEvent:
        """Record that ``run_id`` released the deploy lock of ``scope``."""
        detail = {"scope": scope}
        return self.record("lock_released", run_id, f"lock {scope} released", detail=detail)

    # Configuration -------------------------------------------------------------------------

    def config_changed(
        self,
        run_id: str,
        environment: str,
        fraise: str,
        previous: Mapping[str, Any] | None,
        current: Mapping[str, Any],
    ) -> AuditEvent | None:
        """Record the differences between two configuration snapshots.

        Both snapshots are redacted before the comparison. Returns None, and records
        nothing, when a previous snapshot exists and nothing changed. With no previous
        snapshot every value is recorded as added.
        """
        before = redact(_json_safe(dict(previous))) if previous is not None else None
        after = redact(_json_safe(dict(current)))
        changes = config_diff(before or {}, after)
        if before is not None and not changes:
            return None

        detail = {
            "previous_digest": config_digest(before) if before is not None else None,
            "digest": config_digest(after),
            "change_count": len(changes),
            "truncated": len(changes) > MAX_CONFIG_CHANGES,
            "changes": changes[:MAX_CONFIG_CHANGES],
        }
        paths = ", ".join(change["path"] for change in changes[:5])
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        message = f"configuration of {environment}/{fraise} changed: {paths}{more}"
        return self.record(
            "config_changed",
            run_id,
            message,
            environment=environment,
            fraise=fraise,
            detail=detail,
        )

    # Shared --------------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        run_id: str,
        message: str,
        *,
        environment: str | None = None,
        fraise: str | None = None,
        host: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Redact one audit event, log it and save it with the recorder; return the event.

        Events without an environment or fraise take those of the last event of the same
        run that had them, until ``run_ended``.
        """
        if kind not in AUDIT_KINDS:
            raise ValueError(f"invalid audit kind {kind!r}; use one of {', '.join(AUDIT_KINDS)}")
        known_environment, known_fraise = self._runs.get(run_id, (None, None))
        environment = environment or known_environment
        fraise = fraise or known_fraise
        if kind == "run_ended":
            self._runs.pop(run_id, None)
        elif environment or fraise:
            self._runs[run_id] = (environment, fraise)
        event = AuditEvent(
            run_id=run_id,
            kind=kind,
            at=utc_now(),
            environment=environment,
            fraise=fraise,
            host=host,
            detail=_json_safe(dict(detail or {})),
        )
        event = redact(event)

        extra: dict[str, Any] = {"event": "audit", "audit_kind": kind, "audit_detail": event.detail}
        for key in ("run_id", "environment", "fraise", "host"):
            value = getattr(event, key)
            if value is not None:
                extra[key] = value
        self.logger.info("audit: %s", message, extra=extra)

        if self.recorder is not None:
            self._save(event)
        return event

    def _save(self, event: AuditEvent) -> None:
        try:
            self.recorder.save_event(event)  # type: ignore[union-attr]
        except Exception as exc:
            self.failed_saves += 1
            self.logger.error(
                "saving audit event %s of run %s failed (%d failed so far): %s: %s",
                event.kind,
                event.run_id,
                self.failed_saves,
                type(exc).__name__,
                exc,
            )
            if self.strict:
                raise


# Snapshots and diffs ------------------------------------------------------------------------


def config_snapshot(inventory: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Build the redacted, JSON-safe snapshot of an inventory and a recipe as loaded."""
    return redact(_json_safe({"inventory": dict(inventory), "recipe": dict(recipe)}))


def config_digest(snapshot: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest of the canonical JSON form of ``snapshot``."""
    canonical = json.dumps(
        _json_safe(dict(snapshot)), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def config_diff(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """List the added, removed and changed leaves of two nested dicts, sorted by path.

    Paths join the keys with dots (``fraises.api.hosts``). Lists and empty dicts are
    compared as whole values. Each change is ``{"path", "op", "old", "new"}`` where ``op``
    is ``added``, ``removed`` or ``changed``; ``old`` is absent for an added value and
    ``new`` for a removed one.
    """
    before = _flatten(previous)
    after = _flatten(current)
    changes: list[dict[str, Any]] = []
    for path in sorted(before.keys() | after.keys()):
        if path not in before:
            changes.append({"path": path, "op": "added", "new": after[path]})
        elif path not in after:
            changes.append({"path": path, "op": "removed", "old": before[path]})
        elif before[path] != after[path]:
            changes.append({"path": path, "op": "changed", "old": before[path], "new": after[path]})
    return changes


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            leaves.update(_flatten(value, path))
        else:
            leaves[path] = value
    return leaves


def _json_safe(value: Any) -> Any:
    """Convert ``value`` to plain JSON types: dict keys to str, tuples and sets to lists."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(item) for item in value), key=repr)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    return str(value)

"""Invoke tasks that read the run history and maintain the run database.

``history``, ``status`` and ``show`` read the database; ``db.migrate`` applies schema migrations
and ``db.sync`` replays the journal of records written while the database was unavailable.
The database URL comes from FRAISIER_DATABASE_URL, else ``settings.database`` in
``inventories/<env>.yaml``, else the SQLite file ``var/fraisier.db`` of the project.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json as jsonlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from fraisier.cli.output import error_exit, quiet_on_closed_stdout
from fraisier.command import command_name
from fraisier.db import (
    RunStore,
    database_identity,
    default_journal_path,
    open_store,
    resolve_database_url,
)
from fraisier.errors import ConfigurationError, ExitCode, FraisierError
from fraisier.inventory import load_yaml
from fraisier.records import RunRecord

log = logging.getLogger("fraisier.cli.history")

ENV_HELP = "environment: the name of an inventory in inventories/ (its settings.database)"
JSON_HELP = "print the result as JSON on stdout"
MAX_CELL = 60


def find_project_root(start: Path | None = None) -> Path:
    """Return the project root: ``FRAISIER_PROJECT``, else the nearest folder with ``inventories/``."""
    from fraisier.app import find_project_root as find_root

    return find_root(start)


def inventory_database_setting(project_root: Path, env: str | None) -> str | None:
    """Return ``settings.database`` of ``inventories/<env>.yaml``, or None without ``env``."""
    if not env:
        return None
    path = project_root / "inventories" / f"{env}.yaml"
    if not path.is_file():
        raise ConfigurationError(
            f"inventory {path} not found; pass the name of a file in {path.parent} as --env"
        )
    # The inventory loader's YAML reader understands the !secret and !env tags.
    data = load_yaml(path)
    settings = data.get("settings") if isinstance(data, dict) else None
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ConfigurationError(f"invalid settings in {path}: expected a mapping")
    return settings.get("database")


@contextmanager
def _store(env: str | None, check_schema: bool = True) -> Iterator[tuple[RunStore, Path]]:
    """Open the run store of ``env`` and yield it with the project root.

    A FraisierError becomes an Invoke Exit with the error's exit code: DATABASE (5) for an
    unreachable database or a schema mismatch, CONFIGURATION (2) for an invalid URL.
    """
    from fraisier.logging import configure_logging

    log_format = configure_logging()
    try:
        root = find_project_root()
        url = resolve_database_url(inventory_database_setting(root, env), root)
        store = open_store(url)
    except FraisierError as exc:
        raise error_exit(exc, log_format) from None
    try:
        if check_schema:
            # A database no run has used yet is created here, as a deploy would create it.
            if store.schema_version() == 0:
                store.migrate()
            store.check_schema()
        yield store, root
    except FraisierError as exc:
        raise error_exit(exc, log_format) from None
    finally:
        store.close()


def _time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _duration(run: RunRecord) -> str:
    if run.ended_at is None:
        return "-"
    return f"{(run.ended_at - run.started_at).total_seconds():.1f}s"


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a plain-text table with a header line, columns padded to fit."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def to_json(value: Any) -> str:
    """Serialise records, dataclasses and datetimes as indented JSON."""

    def default(obj: Any) -> Any:
        if isinstance(obj, dt.datetime):
            return obj.isoformat()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        return str(obj)

    return jsonlib.dumps(value, default=default, ensure_ascii=False, indent=2)


def _run_rows(runs: Sequence[RunRecord]) -> list[list[Any]]:
    return [
        [
            r.run_id,
            _time(r.started_at),
            r.task,
            r.fraise,
            r.status,
            r.release_id,
            r.started_by,
            r.controller,
            _duration(r),
            r.error_code,
        ]
        for r in runs
    ]


RUN_HEADERS = (
    "RUN",
    "STARTED (UTC)",
    "TASK",
    "FRAISE",
    "STATUS",
    "RELEASE",
    "BY",
    "CONTROLLER",
    "DURATION",
    "ERROR",
)


@task(
    positional=[],
    help={
        "env": ENV_HELP,
        "fraise": "show only the runs of this fraise",
        "limit": "number of runs to show, newest first (default 20)",
        "json": JSON_HELP,
    },
)
@quiet_on_closed_stdout
def history(
    c: Context, env: str, fraise: str | None = None, limit: int = 20, json: bool = False
) -> None:
    """Print the newest runs of an environment, newest first."""
    if limit < 1:
        raise Exit(
            f"error: invalid --limit {limit}: use 1 or more", code=int(ExitCode.CONFIGURATION)
        )
    with _store(env) as (store, _):
        runs = store.list_runs(env, fraise, int(limit))
    if json:
        print(to_json(runs))
        return
    if not runs:
        print(f"no runs recorded for {env}" + (f"/{fraise}" if fraise else ""))
        return
    print(format_table(RUN_HEADERS, _run_rows(runs)))


@task(positional=[], help={"env": ENV_HELP, "json": JSON_HELP})
@quiet_on_closed_stdout
def status(c: Context, env: str, json: bool = False) -> None:
    """Print the current release of each fraise on each host, and the last run."""
    with _store(env) as (store, _):
        releases = store.host_releases(env)
        last = store.list_runs(env, limit=1)
    if json:
        print(to_json({"hosts": releases, "last_run": last[0] if last else None}))
        return
    if not releases and not last:
        print(f"no runs recorded for {env}")
        return
    rows = [[r.fraise, r.host, r.release, r.status, r.run_id, _time(r.at)] for r in releases]
    print(format_table(("FRAISE", "HOST", "RELEASE", "LAST STATUS", "RUN", "AT (UTC)"), rows))
    if last:
        print()
        print("last run:")
        print(format_table(RUN_HEADERS, _run_rows(last)))


@task(help={"run-id": "id of the run to show, as printed by `inv history`", "json": JSON_HELP})
@quiet_on_closed_stdout
def show(c: Context, run_id: str, env: str | None = None, json: bool = False) -> None:
    """Print one run with its hosts, steps and audit events."""
    with _store(env) as (store, _):
        detail = store.get_run(run_id)
    if detail is None:
        hint = "" if env else "; without --env the default database is read, so pass --env ENV"
        raise Exit(
            f"error: run {run_id!r} not found in {store.url}{hint}; list the run ids with "
            f"`{command_name()} history --env ENV`",
            code=int(ExitCode.CONFIGURATION),
        )
    if json:
        print(to_json(detail))
        return

    run = detail.run
    print(
        f"run {run.run_id}: {run.task} of {run.fraise} to {run.environment}, {run.status}"
        f" (exit code {_cell(run.exit_code)})"
    )
    print(f"  started {_time(run.started_at)} UTC by {_cell(run.started_by)} on "
          f"{_cell(run.controller)}, ended {_time(run.ended_at)}, took {_duration(run)}")  # fmt: skip
    print(f"  release {_cell(run.release_id)}, ref {_cell(run.git_ref)}, "
          f"commit {_cell(run.git_commit)}, CI job {_cell(run.ci_job)}")  # fmt: skip
    if run.error_code:
        print(f"  error {run.error_code}: {run.error_message or ''}")
    if run.rollback_reason:
        print(f"  rollback reason: {run.rollback_reason}")
    if run.push_error:
        print(f"  metrics push failed: {run.push_error}")

    print()
    host_rows = [
        [h.host, h.status, h.previous_release, h.new_release, h.final_release, h.error_code]
        for h in detail.hosts
    ]
    print(format_table(("HOST", "STATUS", "PREVIOUS", "NEW", "FINAL", "ERROR"), host_rows))

    print()
    step_rows = [
        [s.host, s.position, s.name, s.status, s.attempts, s.exit_status, f"{s.duration:.2f}s",
         s.error_code]
        for s in detail.steps
    ]  # fmt: skip
    print(
        format_table(
            ("HOST", "#", "STEP", "STATUS", "ATTEMPTS", "EXIT", "DURATION", "ERROR"), step_rows
        )
    )

    if detail.events:
        print()
        event_rows = [
            [_time(e.at), e.kind, e.host, jsonlib.dumps(e.detail, ensure_ascii=False)]
            for e in detail.events
        ]
        print(format_table(("AT (UTC)", "EVENT", "HOST", "DETAIL"), event_rows))


@task(name="migrate", help={"env": ENV_HELP})
def db_migrate(c: Context, env: str | None = None) -> None:
    """Apply the pending schema migrations to the run database."""
    with _store(env, check_schema=False) as (store, _):
        applied = store.migrate()
        version = store.schema_version()
    if applied:
        print(
            f"applied migration(s) {', '.join(map(str, applied))} to {store.url}; "
            f"schema version {version}"
        )
    else:
        print(f"the run database {store.url} is up to date at schema version {version}")


@task(
    name="sync",
    help={
        "env": ENV_HELP,
        "journal": "journal file to replay instead of this database's own, such as one "
        "written while the database URL was misspelled",
    },
)
def db_sync(c: Context, env: str | None = None, journal: str | None = None) -> None:
    """Replay the journaled records into the run database and empty the journal."""
    from fraisier.db.recorder import Recorder

    with _store(env, check_schema=False) as (store, root):
        url = resolve_database_url(inventory_database_setting(root, env), root)
        own = default_journal_path(root, url)
        path = Path(journal).absolute() if journal else own
        if journal and not path.is_file():
            raise Exit(f"error: journal {journal} not found", code=int(ExitCode.CONFIGURATION))
        recorder = Recorder(lambda: store, path)
        try:
            replayed = recorder.replay(strict=True)
        except OSError as exc:
            raise Exit(
                f"error: cannot read the journal {path}: {exc}", code=int(ExitCode.DATABASE)
            ) from None
    if path.is_file() or replayed:
        print(f"replayed {replayed} journaled record(s) from {path} into {store.url}")
    else:
        print(f"nothing to replay: {store.url} has no journal ({path} does not exist)")
    _report_other_journals(root, env, exclude=path, current=database_identity(url))


def _report_other_journals(root: Path, env: str | None, exclude: Path, current: str) -> None:
    """Name the journals of other databases that still hold records, and whose they are.

    Records journaled under a misspelled or retired URL wait in their own file; only the
    operator can tell whether they belong to this database.
    """
    for other in sorted((root / "var").glob("journal-*.jsonl")):
        if other.absolute() == exclude.absolute() or other.stat().st_size == 0:
            continue
        with other.open(encoding="utf-8") as lines:
            count = sum(1 for line in lines if line.strip())
        label_file = other.with_name(other.name + ".database")
        owner = (
            label_file.read_text(encoding="utf-8").strip()
            if label_file.is_file()
            else "a database it does not name"
        )
        env_option = f" --env {env}" if env else ""
        print(
            f"note: {other} holds {count} record(s) journaled for {owner}, not for {current}; "
            f"if they belong to {current}, replay them with "
            f"`{command_name()} db.sync{env_option} --journal {other}`"
        )


def db_collection() -> Collection:
    """Return the ``db`` task collection: ``db.migrate`` and ``db.sync``."""
    return Collection("db", db_migrate, db_sync)

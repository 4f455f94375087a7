"""Wiring of a task run: project root, inventory, run database, audit, metrics and the summary.

The Invoke tasks in ``fraisier.cli`` stay thin and call the functions here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fraisier.command import command_name
from fraisier.errors import (
    ConfigurationError,
    DatabaseError,
    ExitCode,
    FraisierError,
    LockHeldError,
    SchemaVersionError,
)
from fraisier.interrupt import Interrupt
from fraisier.inventory import Inventory, find_inventory, load_inventory
from fraisier.logging import log_context
from fraisier.records import RunRecord, utc_now
from fraisier.redact import redact
from fraisier.runner import (
    FraiseRun,
    RunOptions,
    RunResult,
    RunServices,
    check_option,
    run_workdir,
)
from fraisier.tracing import configure_tracing, run_span, shutdown_tracing
from fraisier.validation import validate_release_id

log = logging.getLogger("fraisier.app")

PROJECT_ENV = "FRAISIER_PROJECT"


def find_project_root(start: Path | None = None) -> Path:
    """Return the project root: ``FRAISIER_PROJECT``, else the nearest folder with ``inventories/``."""
    if os.environ.get(PROJECT_ENV):
        return Path(os.environ[PROJECT_ENV]).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "inventories").is_dir():
            return folder
    return here


def load(environment: str, inventory: str | None = None) -> Inventory:
    """Load the inventory of ``environment`` from the project, or from an explicit file."""
    if inventory:
        path = Path(inventory).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"inventory file {path} not found; fix --inventory")
        return load_inventory(path, environment or None)
    path = find_inventory(environment, find_project_root())
    return load_inventory(path, environment)


def use_inventory_log_file(inventory: Inventory) -> None:
    """Write JSON logs to ``settings.log_file`` too, relative to the project root."""
    setting = inventory.settings.log_file
    if not setting:
        return
    from fraisier.logging import add_log_file

    path = Path(setting).expanduser()
    if not path.is_absolute():
        path = inventory.project_root / path
    add_log_file(path)


# --- run database, audit and metrics ------------------------------------------------------


@dataclasses.dataclass
class Backends:
    services: RunServices
    store: Any = None
    recorder: Any = None
    database_url: str | None = None
    pushgateway: str | None = None


def _var_dir(inventory: Inventory) -> Path:
    path = inventory.project_root / "var"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def backends(inventory: Inventory) -> Iterator[Backends]:
    """Open the run database (migrating an empty one), the journal, audit and metrics push."""
    from fraisier.audit import Auditor
    from fraisier.db import (
        database_identity,
        default_journal_path,
        open_store,
        resolve_database_url,
    )
    from fraisier.db.recorder import Recorder
    from fraisier.metrics import push_run_metrics, push_run_start, resolve_pushgateway_url

    url = resolve_database_url(inventory.settings.database, inventory.project_root)
    _var_dir(inventory)
    journal = default_journal_path(inventory.project_root, url)
    state: dict[str, Any] = {"store": None, "down": None}

    def store_factory() -> Any:
        if state["down"] is not None:
            # One run pays for the connection timeouts and retries once, not at every record.
            raise DatabaseError(
                f"the run database was unavailable at the start of this run: {state['down']}",
                recoverable=True,
            )
        if state["store"] is None:
            store = open_store(url)
            try:
                prepare_schema(store)
            except BaseException:
                store.close()
                raise
            state["store"] = store
        return state["store"]

    try:
        store_factory()
    except (SchemaVersionError, ConfigurationError):
        # An old or too new schema, a bad URL or a missing driver stops the run before any
        # host is contacted.
        raise
    except FraisierError as exc:
        state["down"] = exc.message
        log.warning(
            "run database unavailable (%s): records go to the journal %s and are replayed by "
            "the next run or '%s db.sync'",
            exc.message,
            journal,
            command_name(),
        )

    recorder = Recorder(store_factory, journal, database=database_identity(url))
    try:
        replayed = recorder.replay() if state["down"] is None else 0
        if replayed:
            log.info("replayed %d journaled record(s) into the run database", replayed)
    except SchemaVersionError:
        raise
    except FraisierError as exc:
        log.warning("journaled records not replayed yet: %s", exc.message)

    auditor = Auditor(recorder, logging.getLogger("fraisier.audit"))
    gateway = resolve_pushgateway_url(inventory.settings.pushgateway)

    def db_lock(environment: str, fraise: str, holder: Any, wait_seconds: float) -> Any:
        from fraisier.records import LockHolder, utc_now

        try:
            store = store_factory()
        except FraisierError as exc:
            log.warning(
                "run database unavailable, deploying without the cross-controller lock: %s",
                exc.message,
            )
            return contextlib.nullcontext(False)
        lock_holder = LockHolder(
            run_id=holder.run_id,
            user=holder.user,
            controller=holder.controller,
            since=utc_now(),
            pid=holder.pid,
        )
        return _locked_and_abandon(store, environment, fraise, lock_holder, wait_seconds)

    def on_run_start(run: Any) -> None:
        error = push_run_start(gateway, run.environment, run.fraise)
        if error:
            log.warning("metrics push at run start failed: %s", error)

    def on_run_end(result: RunResult) -> None:
        stats = None
        with contextlib.suppress(FraisierError):
            stats = (
                state["store"].run_stats(result.run.environment, result.run.fraise)
                if state["store"]
                else None
            )
        error = push_run_metrics(gateway, result.run, result.hosts, result.steps, stats)
        if error:
            result.run.push_error = error
            recorder.save_run(result.run)

    def previous_config(
        environment: str, fraise: str, digest: str
    ) -> tuple[bool, dict[str, Any] | None]:
        """Compare with the last deploy's configuration digest; load its snapshot if it differs."""
        try:
            store = store_factory()
            for run in store.list_runs(environment, fraise, limit=10):
                if run.task != "deploy" or not run.config_digest:
                    continue
                if run.config_digest == digest:
                    return False, None
                # Only a changed configuration pays for reading the run's events.
                detail = store.get_run(run.run_id)
                for event in detail.events if detail else []:
                    if event.kind == "run_started" and isinstance(event.detail.get("config"), dict):
                        return True, event.detail["config"]
                return True, None
        except FraisierError as exc:
            log.warning("cannot read the previous configuration: %s", exc.message)
        return True, None

    services = RunServices(
        recorder=recorder,
        db_lock=db_lock,
        on_run_start=on_run_start,
        on_run_end=on_run_end,
        audit=audit_adapter(auditor),
        previous_config=previous_config,
    )
    try:
        yield Backends(
            services=services, store=state, recorder=recorder, database_url=url, pushgateway=gateway
        )
    finally:
        if state["store"] is not None:
            with contextlib.suppress(Exception):
                state["store"].close()


def audit_adapter(auditor: Any) -> Any:
    """Return a function that sends the runner's audit events to ``auditor``."""

    def handle(event: Any) -> None:
        detail = dict(event.detail)
        where = f"{event.environment}/{event.fraise}"
        if event.kind == "switched":
            auditor.switched(
                event.run_id, event.host, detail.get("from_release"), detail["to_release"]
            )
        elif event.kind == "rolled_back":
            auditor.rolled_back(
                event.run_id,
                event.host,
                detail.get("from_release"),
                detail.get("to_release"),
                detail.get("reason", "unknown"),
            )
        elif event.kind == "lock_taken":
            auditor.lock_taken(
                event.run_id, f"{where} ({detail.get('scope')})", detail.get("holder")
            )
        elif event.kind == "lock_released":
            auditor.lock_released(event.run_id, f"{where} ({detail.get('scope')})")
        elif event.kind == "config_changed":
            auditor.config_changed(
                event.run_id,
                event.environment,
                event.fraise,
                detail.get("previous"),
                detail["current"],
            )
        else:
            summary = ", ".join(
                f"{k}={v}"
                for k, v in detail.items()
                if k not in ("config", "hosts") and v is not None
            )
            auditor.record(
                event.kind,
                event.run_id,
                f"{event.kind.replace('_', ' ')} {where}: {summary}",
                environment=event.environment,
                fraise=event.fraise,
                host=event.host,
                detail=detail,
            )

    return handle


def prepare_schema(store: Any) -> None:
    """Migrate an empty database; refuse one that is older or newer than the code."""
    if store.schema_version() == 0:
        store.migrate()
    store.check_schema()


@contextlib.contextmanager
def _locked_and_abandon(
    store: Any, environment: str, fraise: str, holder: Any, wait_seconds: float
) -> Iterator[bool]:
    with store.lock(environment, fraise, holder, wait_seconds):
        try:
            abandoned = store.mark_abandoned(environment, fraise, holder.run_id)
            for run_id in abandoned:
                log.warning("run %s lost its controller and is marked abandoned", run_id)
        except FraisierError as exc:
            log.warning("could not check for abandoned runs: %s", exc.message)
        yield True


# --- tasks -----------------------------------------------------------------------------------


def run_task(
    task: str,
    environment: str,
    *,
    fraise: str | None = None,
    inventory: str | None = None,
    options: RunOptions | None = None,
    to_release: str | None = None,
    output_json: bool = False,
) -> int:
    """Run ``deploy`` or ``rollback`` for every selected fraise and return the exit code."""
    options = options or RunOptions()
    if to_release is not None:
        # Checked before the run database is opened, so a bad value changes nothing anywhere.
        check_option("--to", to_release, validate_release_id)
    inv = load(environment, inventory)
    use_inventory_log_file(inv)
    fraises = inv.select([f.strip() for f in fraise.split(",")] if fraise else None)
    interrupt = Interrupt()
    results: list[RunResult] = []

    runs = [
        FraiseRun(inv, f, task=task, options=options, services=RunServices(), interrupt=interrupt)
        for f in fraises
    ]
    configure_tracing(inv.settings.otlp_endpoint)
    with interrupt.installed(), contextlib.ExitStack() as cleanup:
        cleanup.callback(shutdown_tracing)
        if options.dry_run:
            for fraise_run in runs:
                results.append(fraise_run.deploy(Path(".")))
            print_plan(results, output_json)
            return worst_exit_code(results)
        with backends(inv) as backend, run_workdir() as workdir:
            for fraise_run in runs:
                if interrupt.is_set:
                    break
                fraise_run.services = backend.services
                with (
                    log_context(
                        run_id=fraise_run.run_id,
                        environment=inv.environment,
                        fraise=fraise_run.fraise.name,
                    ),
                    run_span(fraise_run.run_id, inv.environment, fraise_run.fraise.name, task=task),
                ):
                    try:
                        if task == "deploy":
                            results.append(fraise_run.deploy(Path(workdir)))
                        else:
                            results.append(fraise_run.rollback(to_release))
                    except LockHeldError as exc:
                        if len(runs) == 1:
                            raise
                        # The other fraises have their own locks: go on with them, and list
                        # this one in the summary so that nothing already done is hidden.
                        results.append(lock_held_result(fraise_run, exc))
    print_summary(results, output_json)
    return worst_exit_code(results)


def lock_held_result(fraise_run: FraiseRun, error: LockHeldError) -> RunResult:
    """Return the result of a fraise that did not run because another run holds its lock."""
    log.error("%s", error.message, extra={"error_code": error.code})
    record = RunRecord(
        run_id=fraise_run.run_id,
        environment=fraise_run.inventory.environment,
        fraise=fraise_run.fraise.name,
        task=fraise_run.task,
        started_at=utc_now(),
        status="lock_held",
        exit_code=int(ExitCode.LOCK_HELD),
        error_code=error.code,
        error_message=error.message,
    )
    return RunResult(run=record, hosts=[], steps=[], exit_code=int(ExitCode.LOCK_HELD))


def worst_exit_code(results: list[RunResult]) -> int:
    codes = [r.exit_code for r in results]
    if not codes:
        return int(ExitCode.SUCCESS)
    for preferred in (130, 143, int(ExitCode.ROLLBACK_FAILED), int(ExitCode.DEPLOY_FAILED)):
        if preferred in codes:
            return preferred
    return max(codes)


def print_plan(results: list[RunResult], output_json: bool) -> None:
    for result in results:
        result.plan = redact(result.plan)
    if output_json:
        print(json.dumps({"dry_run": True, "plan": [r.plan for r in results]}, indent=2))
        return
    print("Dry run: nothing was changed on any host.")
    for result in results:
        print("\n".join(result.plan))


def print_summary(results: list[RunResult], output_json: bool, stream: Any = None) -> None:
    """Print which host is on which release, per fraise, and the run's status."""
    stream = stream or sys.stdout
    # Error messages quote command output, which may contain secrets.
    results = [
        dataclasses.replace(r, hosts=[redact(dataclasses.replace(h)) for h in r.hosts])
        for r in results
    ]
    if output_json:
        payload = [
            {
                "run_id": r.run.run_id,
                "environment": r.run.environment,
                "fraise": r.run.fraise,
                "task": r.run.task,
                "status": r.run.status,
                "exit_code": r.exit_code,
                "release": r.run.release_id,
                "hosts": [
                    {
                        "host": h.host,
                        "status": h.status,
                        "previous_release": h.previous_release,
                        "new_release": h.new_release,
                        "final_release": h.final_release,
                        "error": h.error_message,
                    }
                    for h in r.hosts
                ],
            }
            for r in results
        ]
        print(json.dumps(payload, indent=2, ensure_ascii=False), file=stream)
        return
    for r in results:
        print(
            f"\n{r.run.task} {r.run.environment}/{r.run.fraise} run {r.run.run_id}: {r.run.status} (exit {r.exit_code})",
            file=stream,
        )
        width = max([len(h.host) for h in r.hosts] + [4])
        for h in r.hosts:
            if h.final_release:
                where = f"on {h.final_release}"
            elif h.status == "unreachable":
                where = "release unknown (host not reached)"
            elif h.status in ("success", "rolled_back"):
                where = "on no release"
            else:
                where = "release unknown"
            line = f"  {h.host:<{width}}  {h.status:<12} {where}"
            if h.error_message and h.status != "success":
                line += f"  ({h.error_message})"
            print(line, file=stream)


def releases_report(
    environment: str,
    *,
    fraise: str | None = None,
    inventory: str | None = None,
    output_json: bool = False,
) -> int:
    """Print the releases and the current one of every fraise on every host; changes nothing."""
    from concurrent.futures import ThreadPoolExecutor

    inv = load(environment, inventory)
    rows: list[dict[str, Any]] = []
    for selected in inv.select([fraise] if fraise else None):
        run = FraiseRun(
            inv,
            selected,
            task="releases",
            options=RunOptions(),
            services=RunServices(),
            interrupt=Interrupt(),
        )

        def read(host: Any, run: FraiseRun = run) -> dict[str, Any]:
            row: dict[str, Any] = {"fraise": run.fraise.name, "host": host.name}
            try:
                state = run.read_state(host)
            except FraisierError as exc:
                row.update(error=exc.message)
                return row
            row.update(
                current=state.current,
                releases=[{"id": r.release_id, "state": r.state} for r in state.releases],
            )
            return row

        with ThreadPoolExecutor(
            max_workers=max(1, min(selected.settings.forks, len(run.hosts)))
        ) as pool:
            rows += list(pool.map(read, run.hosts))

    if output_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['fraise']} {row['host']}: error: {row['error']}")
                continue
            print(f"{row['fraise']} {row['host']}: current {row['current'] or 'none'}")
            for release in row["releases"]:
                marker = "*" if release["id"] == row["current"] else " "
                print(f"  {marker} {release['id']}  {release['state']}")
    return int(ExitCode.DEPLOY_FAILED) if any("error" in r for r in rows) else int(ExitCode.SUCCESS)


def unlock(
    environment: str,
    fraise: str,
    *,
    host: str | None = None,
    inventory: str | None = None,
    force: bool = False,
) -> int:
    """Remove the deploy lock of a fraise on its hosts (or one host), printing each holder.

    A lock whose holder process still runs on this controller is kept unless ``force``.
    """
    from fraisier.hostlock import break_lock_command, holder_is_alive, read_lock_command
    from fraisier.transport import open_transport

    inv = load(environment, inventory)
    selected = inv.fraise(fraise)
    run = FraiseRun(
        inv,
        selected,
        task="unlock",
        options=RunOptions(limit=host),
        services=RunServices(),
        interrupt=Interrupt(),
    )
    status = int(ExitCode.SUCCESS)
    for target in run.hosts:
        transport = open_transport(target, selected.settings)
        try:
            transport.connect()
            paths = run.release_paths(target)
            holder = transport.run(read_lock_command(paths), timeout=30).stdout.strip()
            if not holder:
                print(f"{target.name}: no lock")
                continue
            if holder_is_alive(holder) and not force:
                print(
                    f"{target.name}: kept the lock of a run that is still running on this "
                    f"controller ({holder}); wait for it, or pass --force"
                )
                status = int(ExitCode.LOCK_HELD)
                continue
            transport.run(break_lock_command(paths), timeout=30)
            log.warning("removed the deploy lock on %s held by %s", target.name, holder)
            print(f"{target.name}: removed lock ({holder})")
        except FraisierError as exc:
            print(f"{target.name}: error: {exc.message}")
            status = int(ExitCode.DEPLOY_FAILED)
        finally:
            transport.close()
    return status

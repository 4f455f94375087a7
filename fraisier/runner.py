"""One run of a task against one environment and fraise: plan, batches, rollback, records.

A deploy first loads the recipe and renders every command for every host, so a bad variable
fails before any host is contacted. It then packs the release archive once, takes the
cross-controller lock in the run database, connects to and locks every host, and deploys batch
after batch. A batch whose failures
push the run over ``max_fail_percentage`` stops the run; hosts it already switched are then
rolled back or left, by ``on_failure``. The exit code is 0 only when every targeted host ended
on the new release and healthy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from fraisier.audit import config_digest
from fraisier.audit import config_snapshot as build_config_snapshot
from fraisier.batches import split_batches, threshold_exceeded
from fraisier.errors import (
    ConfigurationError,
    ExitCode,
    FraisierError,
    LockHeldError,
    ValidationError,
)
from fraisier.hostlock import Holder, controller_identity
from fraisier.hostrun import HostDeployer, HostRun, StepError, rollback_reason
from fraisier.interrupt import Interrupt
from fraisier.inventory import Fraise, Host, Inventory
from fraisier.logging import context_submit, log_context
from fraisier.recipes import Recipe, find_recipe, load_recipe, recipes_dir
from fraisier.records import AuditEvent, HostRecord, RunRecord, StepRecord, utc_now
from fraisier.release import GOOD_STATES, HostState, ReleasePaths, new_release_id
from fraisier.sources import Artifact, prepare_artifact
from fraisier.transport import open_transport
from fraisier.validation import render, render_plain, validate_git_ref, validate_release_id

log = logging.getLogger("fraisier.run")


class Recorder(Protocol):
    def save_run(self, run: RunRecord) -> None: ...
    def save_host(self, host: HostRecord) -> None: ...
    def save_step(self, step: StepRecord) -> None: ...
    def save_event(self, event: AuditEvent) -> None: ...


class NullRecorder:
    """A recorder that keeps records in memory only."""

    def __init__(self) -> None:
        self.runs: list[RunRecord] = []
        self.hosts: list[HostRecord] = []
        self.steps: list[StepRecord] = []
        # Hosts that a rollback could not reach or lock, so it switched none.
        self._blocked: list[HostRun] = []
        self.events: list[AuditEvent] = []

    def save_run(self, run: RunRecord) -> None:
        self.runs.append(dataclasses.replace(run))

    def save_host(self, host: HostRecord) -> None:
        self.hosts.append(dataclasses.replace(host))

    def save_step(self, step: StepRecord) -> None:
        self.steps.append(step)

    def save_event(self, event: AuditEvent) -> None:
        self.events.append(event)


class RecordWriter:
    """Hand host and step records to a recorder from one background thread, in order.

    Host threads then never wait for a database commit. The store commits each record in its
    own transaction and the recorder takes one record at a time, so without this thread the
    host threads of a large run would queue behind each other's commits. Records still queued
    when the process is killed are lost.
    """

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._drain, name="fraisier-records", daemon=True)
        self._thread.start()

    def save_host(self, host: HostRecord) -> None:
        """Queue a copy of ``host``, because its host thread goes on changing the record."""
        self._queue.put((self._recorder.save_host, dataclasses.replace(host)))

    def save_step(self, step: StepRecord) -> None:
        """Queue a step record."""
        self._queue.put((self._recorder.save_step, step))

    def close(self) -> None:
        """Write every queued record, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            save, record = item
            try:
                save(record)
            except Exception:  # a record that cannot be written must not stop the others
                log.exception("recording a %s failed", type(record).__name__)


@dataclasses.dataclass
class RunOptions:
    limit: str | None = None
    ref: str | None = None
    dry_run: bool = False
    wait_lock: float = 0.0


@dataclasses.dataclass
class RunResult:
    run: RunRecord
    hosts: list[HostRecord]
    steps: list[StepRecord]
    exit_code: int
    plan: list[str] = dataclasses.field(default_factory=list)

    @property
    def succeeded(self) -> list[HostRecord]:
        return [h for h in self.hosts if h.status == "success"]

    @property
    def failed(self) -> list[HostRecord]:
        return [h for h in self.hosts if h.status != "success"]


@dataclasses.dataclass
class RunServices:
    """Services of a run besides its hosts: the recorder, the database lock, metrics, audit."""

    recorder: Recorder = dataclasses.field(default_factory=NullRecorder)
    db_lock: Callable[[str, str, Any, float], contextlib.AbstractContextManager[Any]] | None = None
    on_run_start: Callable[[RunRecord], None] | None = None
    on_run_end: Callable[[RunResult], None] | None = None
    audit: Callable[[AuditEvent], None] | None = None
    transport_factory: Callable[[Host], Any] | None = None
    # (environment, fraise, digest) -> whether the configuration changed, and the previous one.
    previous_config: Callable[[str, str, str], tuple[bool, dict[str, Any] | None]] | None = None


def new_run_id() -> str:
    return uuid.uuid4().hex


def ci_job() -> str | None:
    """Return the CI job that started this run, from the usual CI environment variables."""
    for name in (
        "CI_JOB_URL",
        "GITHUB_RUN_ID",
        "BUILD_URL",
        "CIRCLE_BUILD_URL",
        "BUILDKITE_BUILD_URL",
        "CI_JOB_ID",
    ):
        value = os.environ.get(name)
        if value:
            if name == "GITHUB_RUN_ID":
                repo = os.environ.get("GITHUB_REPOSITORY", "")
                return f"github:{repo}/actions/runs/{value}"
            return value
    return None


class FraiseRun:
    """Deploy or roll back one fraise of one environment."""

    def __init__(
        self,
        inventory: Inventory,
        fraise: Fraise,
        *,
        task: str,
        options: RunOptions,
        services: RunServices,
        interrupt: Interrupt,
    ) -> None:
        self.inventory = inventory
        self.fraise = fraise
        self.task = task
        self.options = options
        self.services = services
        self.interrupt = interrupt
        self.settings = fraise.settings
        self.recipe: Recipe = load_recipe(
            find_recipe(fraise, recipes_dir(inventory.project_root, inventory.settings.recipes_dir))
        )
        self.hosts: list[Host] = inventory.hosts_for(fraise, options.limit)
        if options.ref is not None:
            check_option("--ref", options.ref, validate_git_ref)
        self.run_id = new_run_id()
        user, controller, pid = controller_identity()
        self.holder = Holder(
            run_id=self.run_id,
            user=user,
            controller=controller,
            pid=pid,
            since=utc_now().isoformat(timespec="seconds"),
            environment=inventory.environment,
            fraise=fraise.name,
        )
        self.steps: list[StepRecord] = []
        self._writer: RecordWriter | None = None

    # --- helpers shared by deploy and rollback ---------------------------------------------

    def base_variables(self, host: Host) -> dict[str, Any]:
        return self.inventory.variables(self.fraise, host, self.recipe.vars)

    def _save_step(self, step: StepRecord) -> None:
        self.steps.append(step)
        (self._writer or self.services.recorder).save_step(step)

    def _save_host(self, host: HostRecord) -> None:
        (self._writer or self.services.recorder).save_host(host)

    def _audit(self, kind: str, host: str | None = None, **detail: Any) -> None:
        event = AuditEvent(
            run_id=self.run_id,
            kind=kind,
            at=utc_now(),
            environment=self.inventory.environment,
            fraise=self.fraise.name,
            host=host,
            detail=detail,
        )
        if self.services.audit is not None:
            self.services.audit(event)
        else:
            self.services.recorder.save_event(event)

    def _new_run_record(self, release_id: str | None, artifact: Artifact | None) -> RunRecord:
        return RunRecord(
            run_id=self.run_id,
            environment=self.inventory.environment,
            fraise=self.fraise.name,
            task=self.task,
            started_at=utc_now(),
            release_id=release_id,
            git_ref=artifact.ref if artifact else self.options.ref,
            git_commit=artifact.commit if artifact else None,
            started_by=self.holder.user,
            controller=self.holder.controller,
            ci_job=ci_job(),
        )

    def config_snapshot(self) -> dict[str, Any]:
        """Return the inventory parts and recipe this run uses, secrets redacted."""
        raw = self.inventory.raw
        names = {h.name for h in self.hosts}
        inventory_part = {
            "settings": raw.get("settings") or {},
            "vars": raw.get("vars") or {},
            "hosts": {k: v for k, v in (raw.get("hosts") or {}).items() if k in names},
            "groups": raw.get("groups") or {},
            "fraise": (raw.get("fraises") or {}).get(self.fraise.name) or {},
        }
        return build_config_snapshot(inventory_part, self.recipe.raw)

    def plan(self, release_id: str) -> list[str]:
        """Render every command of every host and return the plan as lines of text.

        Raises ConfigurationError for an undefined variable before any host is contacted.
        """
        deployer = self._deployer(release_id, None)
        self._check_source()
        lines = [
            f"fraise {self.fraise.name} ({self.fraise.type}, recipe {self.recipe.path.name}) "
            f"to {len(self.hosts)} host(s) of {self.inventory.environment}, release {release_id}"
        ]
        batches = split_batches(self.hosts, self.settings.serial)
        for number, batch in enumerate(batches, 1):
            lines.append(f"  batch {number}: {', '.join(h.name for h in batch)}")
        for host in self.hosts:
            try:
                variables = deployer.variables_for(host, "<current>")
            except ConfigurationError as exc:
                # deploy_to and the variables come from the inventory: name it.
                raise ConfigurationError(
                    f"{self.inventory.path}: {exc.message}", code=exc.code
                ) from None
            lines.append(f"  {host.name} ({host.address}): deploy_to {variables['deploy_to']}")
            for step in self.recipe.steps:
                if step.builtin:
                    detail = f"[built-in {step.builtin}]"
                    if step.builtin == "restart":
                        detail += " " + render(
                            self.recipe.restart or "", variables, where="restart"
                        )
                    if step.builtin == "health_check" and self.fraise.health_check:
                        check = self.fraise.health_check
                        detail += " " + (
                            render_plain(check.url, variables)
                            if check.url
                            else render(check.command or "", variables)
                        )
                else:
                    detail = render(
                        step.run or "", variables, where=f"{self.recipe.path} step {step.name}"
                    )
                detail = detail.strip().replace("\n", "\n" + " " * (6 + len(step.name)))
                lines.append(f"    {step.name}: {detail}")
        return lines

    def _deployer(self, release_id: str, artifact: Artifact | None) -> HostDeployer:
        factory = self.services.transport_factory or (
            lambda host: open_transport(host, self.settings)
        )
        return HostDeployer(
            run_id=self.run_id,
            environment=self.inventory.environment,
            fraise=self.fraise,
            recipe=self.recipe,
            settings=self.settings,
            release_id=release_id,
            artifact=artifact,
            holder=self.holder,
            transport_factory=factory,
            save_host=self._save_host,
            save_step=self._save_step,
            audit=self._audit,
            should_stop=self.interrupt,
            base_variables=self.base_variables,
        )

    @contextlib.contextmanager
    def _db_lock(self) -> Iterator[None]:
        if self.services.db_lock is None:
            yield
            return
        with self.services.db_lock(
            self.inventory.environment, self.fraise.name, self.holder, self.options.wait_lock
        ) as held:
            # The database lock context gives False when the database is down and no lock
            # was taken, so no audit event claims one.
            if held is False:
                yield
                return
            self._audit("lock_taken", scope="database", holder=self.holder.describe())
            try:
                yield
            finally:
                self._audit("lock_released", scope="database")

    # --- deploy ---------------------------------------------------------------------------

    def deploy(self, workdir: Path) -> RunResult:
        """Deploy a new release of the fraise to its hosts."""
        release_id = new_release_id(self.run_id)
        plan = self.plan(release_id)
        if self.options.dry_run:
            return self._dry_run(plan)

        artifact = self._prepare_artifact(workdir)
        run = self._new_run_record(release_id, artifact)
        try:
            with self._db_lock():
                return self._deploy_locked(run, release_id, artifact, plan)
        finally:
            if artifact is not None:
                artifact.remove()

    def _check_source(self) -> None:
        """Check, without packing it, that a release recipe has a source folder that exists."""
        if not self.recipe.makes_release:
            return
        source = self.fraise.source
        if source is None:
            raise ConfigurationError(
                f"{self.inventory.path}: fraise '{self.fraise.name}' has no 'source', but its "
                f"recipe {self.recipe.path} fetches a release; add 'source: {{path: DIR}}' or "
                "'source: {git: REPO, ref: REF}'"
            )
        for folder in source.paths if source.kind == "path" else ():
            if not Path(folder).is_dir():
                raise ConfigurationError(
                    f"{self.inventory.path}: 'fraises.{self.fraise.name}.source.path' names "
                    f"{folder!r}, which is not a folder; fix the path"
                )

    def _prepare_artifact(self, workdir: Path) -> Artifact | None:
        """Pack the release archive once on the controller, for recipes that make a release."""
        if not self.recipe.makes_release:
            return None
        if self.fraise.source is None:
            raise ConfigurationError(
                f"{self.inventory.path}: fraise '{self.fraise.name}' has no 'source', but its "
                f"recipe {self.recipe.path} fetches a release; add 'source: {{path: DIR}}' or "
                "'source: {git: REPO, ref: REF}'"
            )
        return prepare_artifact(
            self.fraise.source,
            self.options.ref,
            workdir,
            self.inventory.project_root / "var" / "git-cache",
        )

    def _deploy_locked(
        self, run: RunRecord, release_id: str, artifact: Artifact | None, plan: list[str]
    ) -> RunResult:
        snapshot = self.config_snapshot()
        run.config_digest = config_digest(snapshot)
        changed, previous = True, None
        if self.services.previous_config is not None:
            changed, previous = self.services.previous_config(
                self.inventory.environment, self.fraise.name, run.config_digest
            )
        self.services.recorder.save_run(run)
        if self.services.on_run_start:
            self.services.on_run_start(run)
        self._audit(
            "run_started",
            task=self.task,
            release_id=release_id,
            git_ref=run.git_ref,
            git_commit=run.git_commit,
            started_by=run.started_by,
            controller=run.controller,
            ci_job=run.ci_job,
            hosts=[h.name for h in self.hosts],
            config_digest=run.config_digest,
            config=snapshot,
        )
        if changed:
            self._audit("config_changed", previous=previous, current=snapshot)
        log.info(
            "deploying release %s (%s) to %d host(s)",
            release_id,
            artifact.revision if artifact else "no source",
            len(self.hosts),
            extra={"event": "run_start"},
        )

        self._writer = RecordWriter(self.services.recorder)
        deployer = self._deployer(release_id, artifact)
        hostruns = [
            HostRun(host=h, record=HostRecord(run_id=self.run_id, host=h.name)) for h in self.hosts
        ]
        by_name = {hr.host.name: hr for hr in hostruns}
        self.interrupt.describe_state = lambda: describe_hosts(hostruns)

        stopped_reason: str | None = None
        done: list[HostRun] = []
        try:
            # Every host is connected to and locked before any of them changes, so a lock held
            # by another run, or unreachable hosts over the failure threshold, stop the run
            # while every host is still on the release it had.
            stopped_reason = self._prepare_hosts(deployer, hostruns)
            for batch in split_batches(self.hosts, self.settings.serial):
                if stopped_reason:
                    break
                if self.interrupt.is_set:
                    stopped_reason = "interrupted"
                    break
                ready = [by_name[h.name] for h in batch if by_name[h.name].error is None]
                self._run_batch(deployer, ready)
                done += [by_name[h.name] for h in batch]
                failed = sum(1 for hr in done if hr.record.status != "success")
                if self.interrupt.is_set:
                    stopped_reason = "interrupted"
                    break
                if threshold_exceeded(failed, len(hostruns), self.settings.max_fail_percentage):
                    stopped_reason = "threshold"
                    log.error(
                        "%d of %d host(s) failed, over max_fail_percentage %g%%: stopping the run",
                        failed,
                        len(hostruns),
                        self.settings.max_fail_percentage,
                        extra={"event": "run_stop"},
                    )
                    break
            if stopped_reason:
                self._wind_down(deployer, hostruns, stopped_reason)
        finally:
            for hostrun in hostruns:
                deployer.release_lock(hostrun)
                deployer.close(hostrun)
            writer, self._writer = self._writer, None
            writer.close()
        return self._finish(run, hostruns, stopped_reason)

    def _prepare_hosts(self, deployer: HostDeployer, hostruns: list[HostRun]) -> str | None:
        """Connect to and lock every host; return why the run stops, or None to go on."""
        self._run_batch(deployer, hostruns, work=deployer.prepare)
        failed = [hr for hr in hostruns if hr.error is not None]
        if self.interrupt.is_set:
            return "interrupted"
        held = [
            hr for hr in failed if isinstance(getattr(hr.error, "cause", hr.error), LockHeldError)
        ]
        if held:
            log.error(
                "the deploy lock is held on %s: no host was changed",
                ", ".join(hr.host.name for hr in held),
                extra={"event": "run_stop"},
            )
            return "lock"
        if threshold_exceeded(len(failed), len(hostruns), self.settings.max_fail_percentage):
            log.error(
                "%d of %d host(s) cannot be deployed (%s), over max_fail_percentage %g%%: "
                "no host was changed",
                len(failed),
                len(hostruns),
                ", ".join(hr.host.name for hr in failed),
                self.settings.max_fail_percentage,
                extra={"event": "run_stop"},
            )
            return "threshold"
        return None

    def _run_batch(
        self,
        deployer: HostDeployer,
        batch: list[HostRun],
        work: Callable[[HostRun], None] | None = None,
    ) -> None:
        if not batch:
            return
        work = work or deployer.deploy
        workers = max(1, min(self.settings.forks, len(batch)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fraisier-host") as pool:
            futures = set()
            for hostrun in batch:
                with log_context(host=hostrun.host.name):
                    futures.add(context_submit(pool, work, hostrun))
            # Wait in short slices so that the main thread handles SIGINT and SIGTERM at once.
            while futures:
                finished, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()

    def _wind_down(self, deployer: HostDeployer, hostruns: list[HostRun], reason: str) -> None:
        """Mark hosts never started as skipped and roll back switched hosts per ``on_failure``."""
        for hostrun in hostruns:
            if hostrun.record.status == "pending":
                hostrun.record.status = "skipped"
                # The new release never reached this host.
                hostrun.record.new_release = None
                hostrun.record.final_release = hostrun.previous_release
                hostrun.record.error_message = hostrun.record.error_message or SKIP_MESSAGES.get(
                    reason, "not started: the run stopped before this host's batch"
                )
                deployer.save_host(hostrun.record)
        switched = [
            hr for hr in hostruns if hr.switched and not hr.rolled_back and not hr.rollback_failed
        ]
        if not switched:
            return
        if self.settings.on_failure != "rollback":
            log.warning(
                "on_failure is 'leave': %d switched host(s) stay on the new release", len(switched)
            )
            return
        rollback_reason = "interrupted" if reason == "interrupted" else "run_failed"

        def roll_back(hostrun: HostRun) -> None:
            deployer.roll_back(hostrun, rollback_reason)
            hostrun.record.ended_at = utc_now()
            deployer.save_host(hostrun.record)

        # The hosts roll back in parallel, up to forks at a time, like a batch.
        self._run_batch(deployer, switched, work=roll_back)

    def _finish(
        self, run: RunRecord, hostruns: list[HostRun], stopped_reason: str | None
    ) -> RunResult:
        records = [hr.record for hr in hostruns]
        exit_code, status = outcome(hostruns, self.interrupt)
        run.status = status
        run.exit_code = exit_code
        run.ended_at = utc_now()
        failures = [hr for hr in hostruns if hr.error is not None]
        if failures:
            first = failures[0]
            cause = getattr(first.error, "cause", first.error)
            run.error_code = cause.code if cause else None
            run.error_message = f"{first.host.name}: {cause.message}" if cause else None
        elif stopped_reason == "interrupted":
            run.error_code = "interrupted"
            run.error_message = "interrupted before every host was deployed"
        if any(hr.rolled_back for hr in hostruns):
            causes = [
                rollback_reason(getattr(hr.error, "cause", hr.error), self.settings)
                for hr in hostruns
                if hr.error is not None and hr.rolled_back
            ]
            run.rollback_reason = (
                "interrupted"
                if stopped_reason == "interrupted"
                else next((c for c in causes if c), "run_failed")
            )
        return self._close_run(run, records)

    def _close_run(self, run: RunRecord, hosts: list[HostRecord]) -> RunResult:
        """Save the ended run, audit and log its end, and push its metrics."""
        run.ended_at = run.ended_at or utc_now()
        self.services.recorder.save_run(run)
        self._audit("run_ended", status=run.status, exit_code=run.exit_code)
        log.info(
            "run %s: %s (exit %d)",
            self.run_id,
            run.status,
            run.exit_code,
            extra={"event": "run_end", "status": run.status},
        )
        result = RunResult(run=run, hosts=hosts, steps=self.steps, exit_code=int(run.exit_code))
        if self.services.on_run_end:
            self.services.on_run_end(result)
        return result

    def release_paths(self, host: Host) -> ReleasePaths:
        """Return the release layout of this fraise on ``host``."""
        return ReleasePaths(self._deployer("read", None).variables_for(host, None)["deploy_to"])

    def read_state(self, host: Host, check_upload: bool = False) -> HostState:
        """Connect to ``host`` and read, without changing anything, its releases of the fraise.

        With ``check_upload``, also check that a release could be uploaded (SFTP over SSH).
        """
        factory = self.services.transport_factory or (
            lambda target: open_transport(target, self.settings)
        )
        paths = self.release_paths(host)
        transport = factory(host)
        try:
            transport.connect()
            output = transport.run(paths.read_state_command(), timeout=30).stdout
            if check_upload and self.recipe.makes_release:
                transport.check_upload()
        finally:
            transport.close()
        return ReleasePaths.parse_state(output)

    def _dry_run(self, plan: list[str]) -> RunResult:
        """Print the plan and read, but never change, each host's current release."""
        lines = list(plan)
        unchecked: list[str] = []
        for host in self.hosts:
            try:
                state = self.read_state(host, check_upload=True)
            except FraisierError as exc:
                lines.append(f"  {host.name}: cannot read the current release: {exc.message}")
                unchecked.append(host.name)
                continue
            lines.append(
                f"  {host.name}: current release {state.current or 'none'}, "
                f"{len(state.releases)} release(s) on disk"
            )
        # A host that the dry run cannot read would fail the deploy, so the dry run fails too.
        exit_code = int(ExitCode.DEPLOY_FAILED) if unchecked else int(ExitCode.SUCCESS)
        if unchecked:
            lines.append(
                f"  {len(unchecked)} host(s) could not be checked ({', '.join(unchecked)}); "
                "a deploy would fail on them"
            )
        run = self._new_run_record(None, None)
        run.status = "dry_run"
        run.exit_code = exit_code
        return RunResult(run=run, hosts=[], steps=[], exit_code=exit_code, plan=lines)

    # --- rollback task ----------------------------------------------------------------------

    def rollback(self, to_release: str | None) -> RunResult:
        """Switch every host back to ``to_release`` or to its newest good release before current."""
        if to_release is not None:
            check_option("--to", to_release, validate_release_id)
        run = self._new_run_record(to_release, None)
        with self._db_lock():
            self.services.recorder.save_run(run)
            self._audit("run_started", task="rollback", to_release=to_release)
            deployer = self._deployer(to_release or "rollback", None)
            hostruns = [
                HostRun(host=h, record=HostRecord(run_id=self.run_id, host=h.name))
                for h in self.hosts
            ]
            try:
                # As in a deploy, every host is locked before any host switches.
                self._run_batch(deployer, hostruns, work=self._lock_for_rollback)
                blocked = [hr for hr in hostruns if hr.error is not None]
                self._blocked = blocked
                if blocked:
                    for hostrun in hostruns:
                        if hostrun.error is None:
                            hostrun.record.status = "skipped"
                            hostrun.record.final_release = hostrun.previous_release
                            hostrun.record.error_message = (
                                "not changed: another host of this rollback cannot be locked"
                            )
                            self.services.recorder.save_host(hostrun.record)
                elif to_release is None or not self._reject_unusable_target(hostruns, to_release):
                    self._run_batch(
                        deployer,
                        hostruns,
                        work=lambda hr: self._rollback_host(deployer, hr, to_release),
                    )
            finally:
                for hostrun in hostruns:
                    deployer.release_lock(hostrun)
                    deployer.close(hostrun)
            return self._finish_rollback(run, hostruns)

    def _reject_unusable_target(self, hostruns: list[HostRun], target: str) -> bool:
        """Reject ``--to TARGET`` on every host when one locked host cannot switch to it.

        Switching only the hosts that have the release would leave the fleet on mixed
        releases, so no host changes. Returns whether the rollback was rejected.
        """
        problems = {hr.host.name: target_problem(hr, target, explicit=True) for hr in hostruns}
        unusable = sorted(name for name, problem in problems.items() if problem is not None)
        if not unusable:
            return False
        for hostrun in hostruns:
            record = hostrun.record
            record.started_at = record.started_at or utc_now()
            record.ended_at = utc_now()
            record.final_release = hostrun.previous_release
            problem = problems[hostrun.host.name]
            if problem is not None:
                record.status = "failed"
                record.error_code = problem.code
                record.error_message = problem.message
                hostrun.error = problem
            else:
                record.status = "skipped"
                record.error_message = (
                    f"not changed: {target} cannot be used on {', '.join(unusable)}"
                )
            self.services.recorder.save_host(record)
        log.error("rollback to %s rejected: it cannot be used on %s", target, ", ".join(unusable))
        return True

    def _lock_for_rollback(self, hostrun: HostRun) -> None:
        """Connect to and lock one host for a rollback; record the failure on the host."""
        deployer = self._deployer("rollback", None)
        record = hostrun.record
        try:
            deployer._connect_and_lock(hostrun)
        except FraisierError as exc:
            cause = exc.cause if isinstance(exc, StepError) else exc
            hostrun.error = cause
            record.started_at = record.started_at or utc_now()
            record.ended_at = utc_now()
            if record.status != "unreachable":
                record.status = "failed"
            record.error_code = cause.code
            record.error_message = cause.message
            record.final_release = hostrun.previous_release
            self.services.recorder.save_host(record)
            log.error(
                "cannot lock for the rollback: %s", cause.message, extra={"event": "host_end"}
            )

    def _rollback_host(
        self, deployer: HostDeployer, hostrun: HostRun, to_release: str | None
    ) -> None:
        with log_context(host=hostrun.host.name):
            record = hostrun.record
            record.started_at = utc_now()
            record.status = "running"
            try:
                if hostrun.lock is None or not hostrun.lock.held:
                    deployer._connect_and_lock(hostrun)
                state = hostrun.state
                assert state is not None
                target = to_release or state.rollback_target()
                if target is None:
                    raise FraisierError(
                        f"no earlier good release to roll back to on {hostrun.host.name} "
                        f"(current: {state.current or 'none'})",
                        code="nothing_to_roll_back",
                    )
                problem = target_problem(hostrun, target, explicit=to_release is not None)
                if problem is not None:
                    raise problem
                record.new_release = target
                record.previous_release = state.current
                if target == state.current:
                    record.status = "success"
                    record.final_release = target
                    log.info(
                        "already on %s", target, extra={"event": "host_end", "status": "success"}
                    )
                    return
                self._switch_back(hostrun, target, state.current)
                hostrun.switched = True
                if state.current:
                    deployer._mark(hostrun, state.current, "rolled_back")
                record.status = "success"
                record.final_release = target
                self._audit(
                    "rolled_back",
                    host=hostrun.host.name,
                    from_release=state.current,
                    to_release=target,
                    reason="manual",
                )
                log.info(
                    "rolled back to %s", target, extra={"event": "host_end", "status": "success"}
                )
            except FraisierError as exc:
                cause = exc.cause if isinstance(exc, StepError) else exc
                hostrun.error = cause
                record.status = "failed"
                record.error_code = cause.code
                record.error_message = cause.message
                if hostrun.switched:
                    record.final_release = record.new_release
                    record.error_message = (
                        f"current points at {record.new_release}, but {cause.message}; fix the "
                        "service on the host, or deploy a release that starts"
                    )
                elif hostrun.state is not None:
                    record.final_release = hostrun.state.current
                log.error(
                    "rollback failed: %s",
                    cause.message,
                    extra={"event": "host_end", "status": "failed"},
                )
            finally:
                record.ended_at = utc_now()
                self.services.recorder.save_host(record)

    def _switch_back(self, hostrun: HostRun, target: str, current: str | None) -> None:
        """Point ``current`` at ``target`` and restart the service, recording one step."""
        deployer = self._deployer(target, None)
        hostrun.variables = deployer.variables_for(hostrun.host, current)
        paths = deployer.paths_for(hostrun)
        started = utc_now()
        try:
            deployer._checked(hostrun, _step("switch"), paths.switch_command(target), 60)
            # From here "current" points at the target, even if the restart below fails.
            hostrun.switched = True
            if deployer.recipe.restart:
                command = render(
                    deployer.recipe.restart,
                    hostrun.variables,
                    where=f"{deployer.recipe.path} restart",
                )
                deployer._checked(
                    hostrun,
                    _step("restart"),
                    command,
                    self.settings.command_timeout,
                    cwd=paths.current,
                )
        except FraisierError as exc:
            deployer._record_step(hostrun, _step("rollback"), started, 1, None, exc)
            raise
        deployer._record_step(hostrun, _step("rollback"), started, 1, None, None)

    def _finish_rollback(self, run: RunRecord, hostruns: list[HostRun]) -> RunResult:
        failed = [hr for hr in hostruns if hr.record.status != "success"]
        run.status = "failed" if failed else "success"
        run.exit_code = rollback_exit_code(hostruns, failed, self._blocked)
        run.rollback_reason = "manual"

        targets = {hr.record.final_release for hr in hostruns if hr.record.status == "success"}
        if run.release_id is None and len(targets) == 1:
            # The release every host went back to, so history shows it like a deploy's.
            run.release_id = targets.pop()
        if failed:
            run.error_code = failed[0].record.error_code
            run.error_message = f"{failed[0].host.name}: {failed[0].record.error_message}"

        return self._close_run(run, [hr.record for hr in hostruns])


def rollback_exit_code(
    hostruns: list[HostRun], failed: list[HostRun], blocked: list[HostRun]
) -> int:
    """Return the exit code of a rollback from its hosts' outcomes."""
    switched = any(hr.switched for hr in hostruns)
    if any(isinstance(hr.error, LockHeldError) for hr in blocked):
        return int(ExitCode.LOCK_HELD)
    # Hosts skipped because another host refused the request count as refused too.
    considered = [hr for hr in failed if hr.record.status != "skipped"]
    refused = bool(considered) and all(
        hr.record.error_code in REFUSED_ROLLBACK_CODES for hr in considered
    )
    if refused and not switched:
        # Every failure is a request that no host could satisfy, and nothing was switched.
        return int(ExitCode.CONFIGURATION)
    if blocked and not switched and not refused:
        # A host could not be reached or locked, so no host was switched.
        return int(ExitCode.DEPLOY_FAILED)
    return int(ExitCode.ROLLBACK_FAILED if failed else ExitCode.SUCCESS)


SKIP_MESSAGES = {
    "lock": "not changed: another run holds the deploy lock of a host of this run",
    "threshold": "not started: more hosts failed than max_fail_percentage allows",
    "interrupted": "not started: the run was interrupted",
}
REFUSED_ROLLBACK_CODES = ("nothing_to_roll_back", "release_not_found", "release_not_good")


def target_problem(hostrun: HostRun, target: str, explicit: bool) -> FraisierError | None:
    """Return why a locked host cannot switch to ``target``, or None when it can."""
    state = hostrun.state
    assert state is not None
    target_state = state.state_of(target)
    if target_state is None:
        known = ", ".join(r.release_id for r in state.releases) or "none"
        return FraisierError(
            f"release {target} not found on {hostrun.host.name}; releases there: {known}",
            code="release_not_found",
        )
    # A release an operator rolled back from is no default target, but --to may name it again.
    allowed = (*GOOD_STATES, "rolled_back") if explicit else GOOD_STATES
    if target_state not in allowed:
        return FraisierError(
            f"release {target} on {hostrun.host.name} is marked {target_state}; choose a "
            + (
                "release marked ready, healthy or rolled_back"
                if explicit
                else "release marked ready or healthy with --to"
            ),
            code="release_not_good",
        )
    return None


def check_option(option: str, value: str, check: Callable[[str], str]) -> None:
    """Run ``check`` on a command-line value so that its error names the option."""
    try:
        check(value)
    except ValidationError as exc:
        raise ValidationError(f"{option}: {exc.message}", context=exc.context) from None


def _step(name: str) -> Any:
    from fraisier.recipes import Step

    return Step(name=name, builtin=name)


def outcome(hostruns: list[HostRun], interrupt: Interrupt) -> tuple[int, str]:
    """Return the exit code and run status from the hosts' final states."""
    if any(hr.rollback_failed for hr in hostruns):
        return int(ExitCode.ROLLBACK_FAILED), "failed"
    if interrupt.is_set:
        return 128 + (interrupt.signal_number or 2), "interrupted"
    if all(hr.record.status == "success" for hr in hostruns):
        return int(ExitCode.SUCCESS), "success"
    switched = [hr for hr in hostruns if hr.switched]
    status = "rolled_back" if switched and all(hr.rolled_back for hr in switched) else "failed"
    # A deploy lock held by another run on any host is exit 4, so a caller can wait and retry.
    if any(isinstance(getattr(hr.error, "cause", hr.error), LockHeldError) for hr in hostruns):
        return int(ExitCode.LOCK_HELD), status
    return int(ExitCode.DEPLOY_FAILED), status


def describe_hosts(hostruns: list[HostRun]) -> str:
    lines = []
    for hr in hostruns:
        if hr.switched and not hr.rolled_back:
            where = f"switched to {hr.record.new_release} (was {hr.previous_release or 'none'})"
        elif hr.record.status == "pending":
            where = "not started"
        else:
            where = f"on {hr.previous_release or 'no release'} ({hr.record.status})"
        lines.append(f"  {hr.host.name}: {where}")
    return "\n".join(lines)


def run_workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="fraisier-")

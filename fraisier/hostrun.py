"""The steps of one run on one host: connect, lock, build the release, switch, check, roll back."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from fraisier.command import command_name
from fraisier.error_handler import ErrorHandler, default_handler
from fraisier.errors import (
    CommandFailedError,
    ConfigurationError,
    DeploymentTimeoutError,
    FraisierError,
    LockHeldError,
    RollbackError,
    translate_exception,
)
from fraisier.health import health_error, run_health_check
from fraisier.hostlock import Holder, HostLock
from fraisier.inventory import Fraise, Host, Settings
from fraisier.recipes import Recipe, Step
from fraisier.records import HostRecord, StepRecord, tail, utc_now
from fraisier.recovery import RetryStrategy, RollbackRecoveryStrategy
from fraisier.redact import redact
from fraisier.release import HostState, ReleasePaths, releases_to_remove
from fraisier.sources import Artifact
from fraisier.tracing import host_span, step_span
from fraisier.transport.base import CommandResult, Transport
from fraisier.validation import render, render_plain

log = logging.getLogger("fraisier.run")

INTERNAL_TIMEOUT = 60.0


class StepError(FraisierError):
    """Wraps the error of a failed step with the step's name; ``cause`` is the original error."""

    def __init__(self, cause: FraisierError, step: str) -> None:
        super().__init__(
            cause.message,
            code=cause.code,
            context={**cause.context, "step": step},
            recoverable=cause.recoverable,
        )
        self.cause = cause
        self.exit_code = cause.exit_code


@dataclasses.dataclass
class HostRun:
    """The state of one host during a run."""

    host: Host
    record: HostRecord
    transport: Transport | None = None
    lock: HostLock | None = None
    state: HostState | None = None
    previous_release: str | None = None
    switched: bool = False
    healthy: bool = False
    rolled_back: bool = False
    rollback_failed: bool = False
    # A first deploy that failed has no earlier release; its message is given once.
    nothing_to_roll_back: bool = False
    completed: list[Step] = dataclasses.field(default_factory=list)
    variables: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: FraisierError | None = None
    position: int = 0


class HostDeployer:
    """Runs a recipe's steps on hosts for one release; shared by every host worker of a run."""

    def __init__(
        self,
        *,
        run_id: str,
        environment: str,
        fraise: Fraise,
        recipe: Recipe,
        settings: Settings,
        release_id: str,
        artifact: Artifact | None,
        holder: Holder,
        transport_factory: Callable[[Host], Transport],
        save_host: Callable[[HostRecord], None],
        save_step: Callable[[StepRecord], None],
        audit: Callable[..., None],
        should_stop: Callable[[], bool],
        base_variables: Callable[[Host], dict[str, Any]],
        error_handler: ErrorHandler | None = None,
    ) -> None:
        self.run_id = run_id
        self.environment = environment
        self.fraise = fraise
        self.recipe = recipe
        self.settings = settings
        self.release_id = release_id
        self.artifact = artifact
        self.holder = holder
        self.transport_factory = transport_factory
        self.save_host = save_host
        self.save_step = save_step
        self.audit = audit
        self.should_stop = should_stop
        self.base_variables = base_variables
        self.error_handler = error_handler or default_handler(dataclasses.asdict(settings))
        self._step_retries: dict[str, RetryStrategy] = {}

    # --- variables -----------------------------------------------------------------------

    def variables_for(self, host: Host, previous: str | None) -> dict[str, Any]:
        """Return every variable a command of this host can use, run variables last."""
        variables = self.base_variables(host)
        deploy_to = render_plain(
            self.fraise.deploy_to, variables, where=f"deploy_to of fraise {self.fraise.name}"
        )
        check_deploy_to(deploy_to, self.fraise.name, host.name)
        paths = ReleasePaths(deploy_to)
        variables.update(
            deploy_to=paths.deploy_to,
            releases_path=paths.releases,
            release_id=self.release_id,
            release_path=paths.release(self.release_id),
            current_path=paths.current,
            shared_path=paths.shared,
            previous_release=previous or "",
            revision=self.artifact.revision if self.artifact else "",
        )
        return variables

    def paths_for(self, hostrun: HostRun) -> ReleasePaths:
        return ReleasePaths(hostrun.variables["deploy_to"])

    # --- the host's run -------------------------------------------------------------------

    def deploy(self, hostrun: HostRun) -> None:
        """Run every step on the host; on failure, roll back the host when it was switched."""
        with host_span(hostrun.host.name, **{"fraisier.release_id": self.release_id}) as span:
            self._deploy(hostrun)
            span.set_attribute("fraisier.host_status", hostrun.record.status)

    def _deploy(self, hostrun: HostRun) -> None:
        record = hostrun.record
        record.status = "running"
        record.started_at = utc_now()
        record.new_release = self.release_id
        self.save_host(record)
        log.info("deploying %s", self.release_id, extra={"event": "host_start"})
        try:
            if hostrun.lock is None or not hostrun.lock.held:
                self._connect_and_lock(hostrun)
            for step in self.recipe.steps:
                if self.should_stop():
                    raise FraisierError(
                        f"run interrupted before step '{step.name}'", code="interrupted"
                    )
                self._run_step(hostrun, step)
                hostrun.completed.append(step)
            record.status = "success"
            record.final_release = (
                self.release_id if self.recipe.makes_release else hostrun.previous_release
            )
        except FraisierError as exc:
            hostrun.error = exc
            self._after_failure(hostrun, exc)
        finally:
            record.ended_at = utc_now()
            self.save_host(record)
            log.info(
                "%s on %s",
                record.status,
                record.final_release or "no release",
                extra={"event": "host_end", "status": record.status},
            )

    def prepare(self, hostrun: HostRun) -> None:
        """Connect, take the host's deploy lock and read its releases, before any change.

        A failure is recorded on the host, which then counts as failed and is not deployed.
        """
        record = hostrun.record
        record.new_release = self.release_id
        try:
            self._connect_and_lock(hostrun)
        except FraisierError as exc:
            record.started_at = utc_now()
            hostrun.error = exc
            self._after_failure(hostrun, exc)
            record.ended_at = utc_now()
            self.save_host(record)
            log.info(
                "%s before any change: %s",
                record.status,
                record.error_message,
                extra={"event": "host_end", "status": record.status},
            )

    def _connect_and_lock(self, hostrun: HostRun) -> None:
        started = utc_now()
        hostrun.variables = self.variables_for(hostrun.host, None)
        try:
            transport = self.transport_factory(hostrun.host)
            hostrun.transport = transport
            self._connect(hostrun, transport)
            paths = self.paths_for(hostrun)
            hostrun.lock = HostLock(transport, paths, self.holder, self.settings.lock_stale_after)
            # Archives left by a run that died mid-upload are removed once the lock is held.
            state_lines = hostrun.lock.acquire(
                prefix=paths.prepare_command() + " || exit 1",
                suffix=paths.clear_uploads_command() + "\n" + paths.read_state_command(),
            )
        except Exception as raw:
            exc = _as_fraisier_error(raw, hostrun.host.name, "connect")
            self._record_internal(hostrun, "connect", started, exc)
            if isinstance(exc, LockHeldError):
                self._read_current(hostrun)
            if exc.code in (
                "host_unreachable",
                "connection_refused",
                "connect_timeout",
                "dns_failure",
            ):
                hostrun.record.status = "unreachable"
            raise StepError(exc, "connect") from exc
        hostrun.state = ReleasePaths.parse_state("\n".join(state_lines))
        hostrun.previous_release = hostrun.state.current
        hostrun.record.previous_release = hostrun.previous_release
        hostrun.variables = self.variables_for(hostrun.host, hostrun.previous_release)
        self._record_internal(hostrun, "connect", started, None)

    def _connect(self, hostrun: HostRun, transport: Transport) -> None:
        """Connect, retrying an unreachable host as the error handler decides."""
        retry = retry_strategy(self.settings, self.settings.retries, self.settings.retry_delay)
        clock_start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                transport.connect()
                return
            except FraisierError as exc:
                decision = self.error_handler.handle_error(
                    exc,
                    attempt=attempt,
                    elapsed=time.monotonic() - clock_start,
                    context={"run_id": self.run_id, "host": hostrun.host.name, "step": "connect"},
                    retry=retry,
                )
                if decision.action != "retry" or self.should_stop():
                    raise
                if _wait_unless_stopped(decision.delay, self.should_stop):
                    raise

    def _read_current(self, hostrun: HostRun) -> None:
        """Record the host's current release without the lock, so the summary can name it."""
        assert hostrun.transport is not None
        paths = self.paths_for(hostrun)
        try:
            result = hostrun.transport.run(paths.read_state_command(), timeout=INTERNAL_TIMEOUT)
        except FraisierError as exc:
            log.warning("could not read the current release: %s", exc.message)
            return
        hostrun.previous_release = ReleasePaths.parse_state(result.stdout).current
        hostrun.record.previous_release = hostrun.previous_release

    # --- steps ---------------------------------------------------------------------------

    def _run_step(self, hostrun: HostRun, step: Step) -> None:
        started = utc_now()
        log.debug("starting", extra={"event": "step_start", "step": step.name})
        attempts = 0
        result: CommandResult | None = None
        retry = self._retry_strategy(step)
        clock_start = time.monotonic()
        while True:
            attempts += 1
            try:
                with step_span(step.name, attempts):
                    result = self._execute(hostrun, step)
                break
            except Exception as raw:
                exc = _as_fraisier_error(raw, hostrun.host.name, step.name)
                if isinstance(exc, CommandFailedError) and retry.max_attempts > 1:
                    # A step with retries declares its command safe to run again.
                    exc.recoverable = True
                decision = self.error_handler.handle_error(
                    exc,
                    attempt=attempts,
                    elapsed=time.monotonic() - clock_start,
                    context={"run_id": self.run_id, "host": hostrun.host.name, "step": step.name},
                    # Switching and health checks retry on their own terms, never as a step.
                    retry=None if step.builtin in ("switch", "health_check") else retry,
                )
                if decision.action != "retry" or self.should_stop():
                    self._record_step(hostrun, step, started, attempts, result, exc)
                    raise StepError(exc, step.name) from exc
                log.warning(
                    "attempt %d failed (%s); retrying in %.1fs",
                    attempts,
                    exc.message,
                    decision.delay,
                    extra={"event": "step_retry", "step": step.name, "attempt": attempts},
                )
                if exc.code in ("channel_closed", "connection_lost"):
                    self._reconnect(hostrun)
                if _wait_unless_stopped(decision.delay, self.should_stop):
                    self._record_step(hostrun, step, started, attempts, result, exc)
                    raise StepError(exc, step.name) from exc
        self.error_handler.breakers.for_host(hostrun.host.name).record_success()
        self._record_step(hostrun, step, started, attempts, result, None)
        if hostrun.lock is not None:
            hostrun.lock.refresh()

    def _retry_strategy(self, step: Step) -> RetryStrategy:
        """Return the step's retry strategy: its own ``retries``, else the settings'."""
        strategy = self._step_retries.get(step.name)
        if strategy is None:
            settings = self.settings
            strategy = retry_strategy(
                settings,
                step.retries if step.retries is not None else settings.retries,
                step.retry_delay if step.retry_delay is not None else settings.retry_delay,
            )
            self._step_retries[step.name] = strategy
        return strategy

    def _execute(self, hostrun: HostRun, step: Step) -> CommandResult | None:
        transport = hostrun.transport
        assert transport is not None
        paths = self.paths_for(hostrun)
        if step.builtin == "fetch":
            return self._fetch(hostrun, paths)
        if step.builtin == "link_shared":
            return self._checked(
                hostrun,
                step,
                paths.link_shared_command(self.release_id, self.fraise.shared),
                INTERNAL_TIMEOUT,
            )
        if step.builtin == "switch":
            self._checked(
                hostrun, step, paths.set_state_command(self.release_id, "ready"), INTERNAL_TIMEOUT
            )
            result = self._checked(
                hostrun, step, paths.switch_command(self.release_id), INTERNAL_TIMEOUT
            )
            hostrun.switched = True
            self.audit(
                "switched",
                host=hostrun.host.name,
                from_release=hostrun.previous_release,
                to_release=self.release_id,
            )
            return result
        if step.builtin == "restart":
            command = render(
                self.recipe.restart or "", hostrun.variables, where=f"{self.recipe.path} restart"
            )
            return self._checked(hostrun, step, command, self._timeout(step), cwd=paths.current)
        if step.builtin == "health_check":
            return self._health_check(hostrun, paths)
        if step.builtin == "cleanup":
            return self._cleanup(hostrun, paths)

        command = render(
            step.run or "", hostrun.variables, where=f"{self.recipe.path} step {step.name}"
        )
        env = {
            k: render_plain(v, hostrun.variables, where=f"{self.recipe.path} step {step.name} env")
            for k, v in step.env
        }
        return self._checked(
            hostrun,
            step,
            command,
            self._timeout(step),
            cwd=self._cwd(step, paths),
            env=env,
            sudo=step.sudo,
        )

    def _timeout(self, step: Step) -> float:
        return step.timeout if step.timeout is not None else self.settings.command_timeout

    def _cwd(self, step: Step, paths: ReleasePaths) -> str:
        release = paths.release(self.release_id) if self.recipe.makes_release else paths.deploy_to
        named = {
            "release": release,
            "current": paths.current,
            "deploy_to": paths.deploy_to,
            "shared": paths.shared,
        }
        return named.get(step.cwd, step.cwd)

    def _checked(
        self,
        hostrun: HostRun,
        step: Step,
        command: str,
        timeout: float,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        sudo: bool | str = False,
    ) -> CommandResult:
        assert hostrun.transport is not None
        result = hostrun.transport.run(command, timeout=timeout, cwd=cwd, env=env, sudo=sudo)
        if result.exit_status != 0:
            stdout_tail, _ = tail(redact(result.stdout), 2000)
            stderr_tail, _ = tail(redact(result.stderr), 2000)
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise CommandFailedError(
                f"step '{step.name}' exited {result.exit_status} on {hostrun.host.name}"
                + (": " + " | ".join(last) if last else ""),
                command=command,
                exit_status=result.exit_status,
                stdout_tail=stdout_tail,
                stderr_tail=stderr_tail,
                context={"host": hostrun.host.name, "step": step.name},
            )
        return result

    def _fetch(self, hostrun: HostRun, paths: ReleasePaths) -> CommandResult:
        assert hostrun.transport is not None and self.artifact is not None
        upload = paths.upload_path(self.release_id)
        hostrun.transport.put(self.artifact.archive, upload, timeout=self.settings.command_timeout)
        step = Step(name="fetch", builtin="fetch")
        return self._checked(
            hostrun,
            step,
            paths.unpack_command(self.release_id, self.artifact.revision),
            self.settings.command_timeout,
        )

    def _health_check(self, hostrun: HostRun, paths: ReleasePaths) -> CommandResult | None:
        check = self.fraise.health_check
        if check is None:
            hostrun.healthy = True
            self._mark(hostrun, self.release_id, "healthy")
            return None
        where = f"health_check of fraise {self.fraise.name}"
        url = render_plain(check.url, hostrun.variables, where=where) if check.url else None
        command = render(check.command, hostrun.variables, where=where) if check.command else None
        assert hostrun.transport is not None
        result = run_health_check(
            check,
            url=url,
            command=command,
            transport=hostrun.transport,
            cwd=paths.current,
            should_stop=self.should_stop,
        )
        hostrun.variables["_health_attempts"] = result.attempts
        if not result.ok:
            raise health_error(result, hostrun.host.name)
        hostrun.healthy = True
        self._mark(hostrun, self.release_id, "healthy")
        return CommandResult(
            command=url or command or "",
            exit_status=0,
            stdout=result.detail,
            stderr="",
            duration=0.0,
        )

    def _cleanup(self, hostrun: HostRun, paths: ReleasePaths) -> CommandResult | None:
        assert hostrun.transport is not None
        result = hostrun.transport.run(paths.read_state_command(), timeout=INTERNAL_TIMEOUT)
        state = ReleasePaths.parse_state(result.stdout)
        doomed = releases_to_remove(
            state, self.fraise.keep_releases, protect=(hostrun.previous_release, self.release_id)
        )
        command = paths.remove_releases_command(doomed)
        if command is None:
            return CommandResult(
                command="", exit_status=0, stdout="nothing to remove", stderr="", duration=0.0
            )
        step = Step(name="cleanup", builtin="cleanup")
        return self._checked(hostrun, step, command, INTERNAL_TIMEOUT)

    def _mark(self, hostrun: HostRun, release_id: str, state: str) -> None:
        if hostrun.transport is None:
            return
        paths = self.paths_for(hostrun)
        try:
            hostrun.transport.run(
                paths.set_state_command(release_id, state), timeout=INTERNAL_TIMEOUT
            )
        except FraisierError as exc:
            log.warning("could not mark release %s as %s: %s", release_id, state, exc.message)

    def _reconnect(self, hostrun: HostRun) -> None:
        if hostrun.transport is None:
            return
        hostrun.transport.close()
        try:
            hostrun.transport.connect()
        except FraisierError as exc:
            log.warning("reconnecting failed: %s", exc.message)

    # --- records ---------------------------------------------------------------------------

    def _record_step(
        self,
        hostrun: HostRun,
        step: Step,
        started: Any,
        attempts: int,
        result: CommandResult | None,
        error: FraisierError | None,
    ) -> None:
        stdout = result.stdout if result else getattr(error, "stdout_tail", "") or ""
        stderr = result.stderr if result else getattr(error, "stderr_tail", "") or ""
        if error is not None and not stderr:
            stderr = error.message
        # Redact before cutting, so that a secret split by the cut cannot survive in part.
        stdout_tail, cut_out = tail(redact(stdout))
        stderr_tail, cut_err = tail(redact(stderr))
        status = "success"
        if error is not None:
            status = "timeout" if isinstance(error, DeploymentTimeoutError) else "failed"
        if step.builtin == "health_check":
            attempts = hostrun.variables.pop("_health_attempts", attempts)
        record = StepRecord(
            run_id=self.run_id,
            host=hostrun.host.name,
            position=hostrun.position,
            name=step.name,
            status=status,
            started_at=started,
            ended_at=utc_now(),
            attempts=attempts,
            exit_status=result.exit_status if result else getattr(error, "exit_status", None),
            stdout_tail=stdout_tail,
            stderr_tail=stderr_tail,
            output_truncated=cut_out or cut_err,
            error_code=error.code if error else None,
        )
        hostrun.position += 1
        self.save_step(record)
        log.info(
            "%s",
            status if error is None else f"{status}: {error.message}",
            extra={
                "event": "step_end",
                "step": step.name,
                "status": status,
                "duration": round(record.duration, 3),
                "attempt": attempts,
            },
        )

    def _record_internal(
        self, hostrun: HostRun, name: str, started: Any, error: FraisierError | None
    ) -> None:
        self._record_step(hostrun, Step(name=name, builtin=name), started, 1, None, error)

    # --- failure and rollback ---------------------------------------------------------------

    def _after_failure(self, hostrun: HostRun, error: FraisierError) -> None:
        record = hostrun.record
        cause = error.cause if isinstance(error, StepError) else error
        record.error_code = cause.code
        record.error_message = cause.message
        if record.status != "unreachable":
            record.status = "failed"
        if not hostrun.switched:
            # A release that never went live is marked failed so it is never a rollback target.
            # Without a state read, connect or lock failed and no release folder was made.
            if self.recipe.makes_release and hostrun.state is not None:
                self._mark(hostrun, self.release_id, "failed")
            record.final_release = hostrun.previous_release
            if self.settings.on_failure == "rollback":
                self._undo_before_switch(hostrun)
            return
        record.final_release = self.release_id
        reason = rollback_reason(cause, self.settings)
        if reason is None or self.settings.on_failure != "rollback":
            log.warning(
                "left on %s after the failure (on_failure: %s)",
                self.release_id,
                self.settings.on_failure,
            )
            return
        self.roll_back(hostrun, reason)

    def roll_back(self, hostrun: HostRun, reason: str) -> None:
        """Return a switched host to the release it had when the run started."""
        record = hostrun.record
        if not hostrun.switched or hostrun.rolled_back or hostrun.nothing_to_roll_back:
            return
        target = hostrun.previous_release
        if not target or target == self.release_id:
            hostrun.nothing_to_roll_back = True
            message = (
                f"nothing to roll back to on {hostrun.host.name}: no release was current before "
                f"this run, so {self.release_id} stays current"
            )
            log.warning(
                message,
                extra={
                    "event": "rollback",
                    "status": "nothing_to_roll_back",
                    "from_release": self.release_id,
                    "reason": reason,
                },
            )
            record.error_message = (
                record.error_message + "; " if record.error_message else ""
            ) + message
            self._mark(hostrun, self.release_id, "failed")
            return
        started = utc_now()
        log.warning(
            "rolling back to %s (%s)",
            target,
            reason,
            extra={
                "event": "rollback",
                "reason": reason,
                "from_release": self.release_id,
                "to_release": target,
            },
        )
        switched_back = False
        try:
            self._undo_steps(hostrun)
            paths = self.paths_for(hostrun)
            step = Step(name="rollback", builtin="switch")
            assert hostrun.transport is not None
            self._checked(hostrun, step, paths.switch_command(target), INTERNAL_TIMEOUT)
            switched_back = True
            if self.recipe.restart:
                variables = {
                    **hostrun.variables,
                    "release_id": target,
                    "release_path": paths.release(target),
                }
                command = render(
                    self.recipe.restart, variables, where=f"{self.recipe.path} restart"
                )
                self._checked(
                    hostrun,
                    Step(name="restart", builtin="restart"),
                    command,
                    self.settings.command_timeout,
                    cwd=paths.current,
                )
        except FraisierError as exc:
            hostrun.rollback_failed = True
            failure = RollbackError(
                f"rollback of {hostrun.host.name} to {target} failed: {exc.message}; the host may "
                f"be on {self.release_id} or {target}: check it with '{command_name()} releases', "
                f"then run '{command_name()} rollback --limit {hostrun.host.name}'",
                context={"host": hostrun.host.name},
            )
            record.error_code = failure.code
            record.error_message = failure.message
            record.status = "failed"
            if switched_back:
                # "current" points at the target; only the restart after the switch failed.
                record.final_release = target
            self._record_step(
                hostrun, Step(name="rollback", builtin="switch"), started, 1, None, failure
            )
            return
        hostrun.rolled_back = True
        self._mark(hostrun, self.release_id, "failed")
        record.status = "rolled_back"
        record.final_release = target
        self._record_step(hostrun, Step(name="rollback", builtin="switch"), started, 1, None, None)
        self.audit(
            "rolled_back",
            host=hostrun.host.name,
            from_release=self.release_id,
            to_release=target,
            reason=reason,
        )

    def _undo_before_switch(self, hostrun: HostRun) -> None:
        """Undo the completed steps of a host that failed before its switch.

        Such a host keeps its release, but a step with a ``rollback`` command (a database
        migration, say) may have changed something that the old release cannot use.
        """
        if not any(step.rollback for step in hostrun.completed):
            return
        started = utc_now()
        try:
            self._undo_steps(hostrun)
        except FraisierError as exc:
            hostrun.rollback_failed = True
            failure = RollbackError(
                f"undoing the completed steps of {hostrun.host.name} failed: {exc.message}; "
                f"the host is on {hostrun.previous_release or 'no release'}, but what those "
                "steps changed may remain: check it",
                context={"host": hostrun.host.name},
            )
            hostrun.record.error_code = failure.code
            hostrun.record.error_message = failure.message
            self._record_step(
                hostrun, Step(name="undo", builtin="switch"), started, 1, None, failure
            )
            return
        log.warning("undid the completed steps that have a rollback command")
        self._record_step(hostrun, Step(name="undo", builtin="switch"), started, 1, None, None)

    def _undo_steps(self, hostrun: HostRun) -> None:
        for step in reversed(hostrun.completed):
            if not step.rollback:
                continue
            command = render(
                step.rollback,
                hostrun.variables,
                where=f"{self.recipe.path} step {step.name} rollback",
            )
            paths = self.paths_for(hostrun)
            self._checked(
                hostrun,
                step,
                command,
                self._timeout(step),
                cwd=self._cwd(step, paths),
                sudo=step.sudo,
            )

    def release_lock(self, hostrun: HostRun) -> None:
        if hostrun.lock is None or not hostrun.lock.held:
            return
        try:
            hostrun.lock.release()
        except FraisierError as exc:
            log.warning(
                "could not release the deploy lock on %s: %s", hostrun.host.name, exc.message
            )

    def close(self, hostrun: HostRun) -> None:
        if hostrun.transport is not None:
            hostrun.transport.close()


def _wait_unless_stopped(seconds: float, should_stop: Callable[[], bool]) -> bool:
    """Sleep ``seconds`` in slices of 0.1 s; return True as soon as ``should_stop()`` is true."""
    deadline = time.monotonic() + seconds
    while not should_stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(0.1, remaining))
    return True


def retry_strategy(settings: Settings, retries: int, delay: float) -> RetryStrategy:
    """Build the retry strategy of ``retries`` retries starting at ``delay`` seconds."""
    return RetryStrategy(
        max_attempts=retries + 1,
        base_delay=delay,
        multiplier=settings.retry_backoff,
        max_delay=settings.retry_max_delay,
        jitter=settings.retry_jitter,
        max_elapsed=settings.retry_max_elapsed,
    )


def check_deploy_to(deploy_to: str, fraise: str, host: str) -> None:
    """Reject a deploy_to that is relative, the root folder, or climbs with '..'."""
    parts = deploy_to.split("/")
    problem = None
    if not deploy_to.startswith("/"):
        problem = "it must be an absolute path"
    elif ".." in parts or "." in parts:
        problem = "it must not contain '.' or '..' parts"
    elif deploy_to.rstrip("/") == "":
        problem = "it must not be the root folder '/'"
    if problem:
        raise ConfigurationError(
            f"invalid deploy_to {deploy_to!r} of fraise '{fraise}' on host {host}: {problem}; "
            f"fix 'fraises.{fraise}.deploy_to' in the inventory, for example /srv/{fraise}"
        )


def _as_fraisier_error(exc: Exception, host: str, step: str) -> FraisierError:
    """Translate any exception of a host worker, so one host's bug never ends the whole run."""
    if isinstance(exc, FraisierError):
        return exc
    error = translate_exception(exc, host=host, step=step)
    log.error(
        "unexpected %s on %s during %s: %s",
        type(exc).__name__,
        host,
        step,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error


def rollback_reason(error: FraisierError, settings: Settings) -> str | None:
    """Return why a switched host is rolled back after ``error``, or None to leave it."""
    from fraisier.errors import HealthCheckError

    if error.code == "interrupted":
        return "interrupted"
    strategy = RollbackRecoveryStrategy(
        on_step_failure=settings.rollback_on_step_failure,
        on_timeout=settings.rollback_on_timeout,
        on_health_check=settings.rollback_on_health_check,
    )
    reason = strategy.reason_for(error)
    configurable = (HealthCheckError, DeploymentTimeoutError)
    if reason is None and not isinstance(error, configurable) and settings.rollback_on_step_failure:
        # An error the strategy leaves alone (a configuration or database error after the
        # switch) still leaves a host that may not serve the new release: roll it back.
        return "step_failed"
    return reason

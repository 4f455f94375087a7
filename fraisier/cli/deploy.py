"""Deploy, rollback, releases and unlock tasks."""

from __future__ import annotations

from collections.abc import Callable

from invoke import Context, task
from invoke.exceptions import Exit

from fraisier.cli.output import error_exit, quiet_on_closed_stdout
from fraisier.errors import ConfigurationError, ExitCode, FraisierError

LOG_HELP = {
    "log-format": "log format on stderr: console, json, or auto (console on a terminal)",
    "log-level": "log level: debug, info, warning or error (default: FRAISIER_LOG_LEVEL or info)",
    "log-file": "also write JSON logs to this file, rotated by size",
    "inventory": "inventory file to use instead of inventories/ENV.yaml",
}
JSON_HELP = {"json": "print the result as JSON on stdout"}


def _require(**values: str | None) -> None:
    for name, value in values.items():
        if not value:
            hint = (
                " (the name of an inventory in inventories/, or give --inventory FILE)"
                if name == "env"
                else ""
            )
            raise ConfigurationError(f"--{name} is required{hint}")


def _wait_lock_seconds(value: str) -> float:
    """Return ``--wait-lock`` as seconds; Invoke passes it as text, so Fraisier checks it."""
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigurationError(
            f"--wait-lock must be a number of seconds, got {value!r}"
        ) from None
    if not seconds >= 0:
        raise ConfigurationError(f"--wait-lock must be 0 or more seconds, got {value}")
    return seconds


def _run(
    action: Callable[[], int], log_format: str, log_level: str | None, log_file: str | None
) -> None:
    """Set up logging, run ``action`` and turn its result or error into the exit code.

    With JSON logs, every stderr line is a JSON object: an error before the run, or one that
    stops logging from being set up, is written as one too.
    """
    from fraisier.logging import configure_logging

    stream_format = "json" if log_format == "json" else "console"
    configured = False
    try:
        stream_format = configure_logging(level=log_level, fmt=log_format, log_file=log_file)
        configured = True
        code = action()
    except FraisierError as exc:
        raise error_exit(exc, stream_format, logging_ready=configured) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=int(ExitCode.INTERRUPTED_SIGINT)) from None
    if code != 0:
        raise Exit(code=code)


@task(
    positional=[],
    auto_shortflags=False,
    help={
        "env": "environment to deploy: the name of an inventory in inventories/",
        "fraise": "fraise to deploy, or several separated by commas (default: all)",
        "limit": "deploy only these hosts or groups, separated by commas",
        "ref": "git ref to deploy (branch, tag or commit), for git sources",
        "dry-run": "print the plan and read each host's current release; change nothing",
        "wait-lock": "seconds to wait for another run's deploy lock before failing",
        **LOG_HELP,
        **JSON_HELP,
    },
)
def deploy(
    c: Context,
    env: str | None = None,
    fraise: str | None = None,
    limit: str | None = None,
    ref: str | None = None,
    dry_run: bool = False,
    wait_lock: str = "0",
    inventory: str | None = None,
    json: bool = False,
    log_format: str = "auto",
    log_level: str | None = None,
    log_file: str | None = None,
) -> None:
    """Deploy a new release of every fraise (or --fraise) of an environment."""

    def action() -> int:
        from fraisier.app import run_task
        from fraisier.runner import RunOptions

        _require(env=env or inventory)
        seconds = _wait_lock_seconds(wait_lock)
        options = RunOptions(limit=limit, ref=ref, dry_run=dry_run, wait_lock=seconds)
        return run_task(
            "deploy", env, fraise=fraise, inventory=inventory, options=options, output_json=json
        )

    _run(action, log_format, log_level, log_file)


@task(
    positional=[],
    auto_shortflags=False,
    help={
        "env": "environment to roll back",
        "fraise": "fraise to roll back (default: all)",
        "to": "release id to switch to (default: the newest good release before the current one)",
        "limit": "roll back only these hosts or groups, separated by commas",
        "wait-lock": "seconds to wait for another run's deploy lock before failing",
        **LOG_HELP,
        **JSON_HELP,
    },
)
def rollback(
    c: Context,
    env: str | None = None,
    fraise: str | None = None,
    to: str | None = None,
    limit: str | None = None,
    wait_lock: str = "0",
    inventory: str | None = None,
    json: bool = False,
    log_format: str = "auto",
    log_level: str | None = None,
    log_file: str | None = None,
) -> None:
    """Switch hosts back to an earlier good release and restart the service."""

    def action() -> int:
        from fraisier.app import run_task
        from fraisier.runner import RunOptions

        _require(env=env or inventory)
        options = RunOptions(limit=limit, wait_lock=_wait_lock_seconds(wait_lock))
        return run_task(
            "rollback",
            env,
            fraise=fraise,
            inventory=inventory,
            options=options,
            to_release=to,
            output_json=json,
        )

    _run(action, log_format, log_level, log_file)


@task(
    positional=[],
    auto_shortflags=False,
    help={
        "env": "environment to inspect",
        "fraise": "fraise to inspect (default: all)",
        **LOG_HELP,
        **JSON_HELP,
    },
)
@quiet_on_closed_stdout
def releases(
    c: Context,
    env: str | None = None,
    fraise: str | None = None,
    inventory: str | None = None,
    json: bool = False,
    log_format: str = "auto",
    log_level: str | None = None,
    log_file: str | None = None,
) -> None:
    """List the releases on every host and mark the current one; changes nothing."""

    def action() -> int:
        from fraisier.app import releases_report

        _require(env=env or inventory)
        return releases_report(env, fraise=fraise, inventory=inventory, output_json=json)

    _run(action, log_format, log_level, log_file)


@task(
    positional=[],
    auto_shortflags=False,
    help={
        "env": "environment",
        "fraise": "fraise whose lock to remove",
        "host": "only this host",
        "force": "remove the lock even when its run still runs on this controller",
        **LOG_HELP,
    },
)
def unlock(
    c: Context,
    env: str | None = None,
    fraise: str | None = None,
    host: str | None = None,
    inventory: str | None = None,
    force: bool = False,
    log_format: str = "auto",
    log_level: str | None = None,
    log_file: str | None = None,
) -> None:
    """Remove a deploy lock left on hosts by a dead run, printing its holder."""

    def action() -> int:
        from fraisier.app import unlock as unlock_hosts

        _require(env=env or inventory, fraise=fraise)
        return unlock_hosts(env, fraise, host=host, inventory=inventory, force=force)

    _run(action, log_format, log_level, log_file)

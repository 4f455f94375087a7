"""The deploy lock kept on each host, per environment and fraise, naming its holder.

The lock is a directory made with ``mkdir`` (atomic on POSIX file systems) holding
``holder.json``. Its holder refreshes the file's modification time as the run goes on. A lock
whose holder stopped refreshing it for ``lock_stale_after`` seconds, or whose holder process on
this controller is gone, is reported as stale. It is never taken over: ``inv unlock`` removes
it once an operator has checked that its run is dead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Any

from fraisier.command import command_name
from fraisier.errors import DeploymentError, LockHeldError
from fraisier.release import ReleasePaths
from fraisier.transport.base import Transport
from fraisier.validation import quote

HOLDER_FILE = "holder.json"


@dataclasses.dataclass(frozen=True)
class Holder:
    run_id: str
    user: str
    controller: str
    pid: int
    since: str
    environment: str
    fraise: str

    def describe(self) -> str:
        return f"run {self.run_id} by {self.user} on {self.controller} (pid {self.pid}) since {self.since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostLock:
    """Acquire, refresh and release the lock of one fraise on one host."""

    def __init__(
        self,
        transport: Transport,
        paths: ReleasePaths,
        holder: Holder,
        stale_after: float,
        timeout: float = 30.0,
    ):
        self.transport = transport
        self.paths = paths
        self.holder = holder
        self.stale_after = stale_after
        self.timeout = timeout
        self.held = False
        self._refreshed = 0.0

    @property
    def _holder_path(self) -> str:
        return f"{self.paths.lock}/{HOLDER_FILE}"

    def acquire(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Take the lock, or raise LockHeldError naming the holder and whether it looks stale.

        ``prefix`` runs before the lock is taken and ``suffix`` after, in the same remote
        command, which saves a round trip each. The output lines of ``suffix`` are returned.
        A failing ``prefix`` or an unwritable lock directory raises DeploymentError.
        """
        body = json.dumps(dataclasses.asdict(self.holder), sort_keys=True)
        command = (
            f"{prefix}\n"
            f"mkdir -p -- {quote(self.paths.meta)} || exit 1\n"
            f"if mkdir -- {quote(self.paths.lock)} 2>/dev/null; then\n"
            f"  printf '%s\\n' {quote(body)} > {quote(self._holder_path)} || exit 1\n"
            "  echo acquired\n"
            f"elif [ ! -d {quote(self.paths.lock)} ]; then\n"
            f"  echo 'cannot create {self.paths.lock}' >&2\n"
            "  exit 1\n"
            "else\n"
            "  echo held\n"
            f"  cat -- {quote(self._holder_path)} 2>/dev/null || echo '{{}}'\n"
            f'  echo "age=$(( $(date +%s) - $(stat -c %Y -- {quote(self._holder_path)} 2>/dev/null || date +%s) ))"\n'
            "  exit 0\n"
            "fi\n"
            f"{suffix}"
        )
        result = self.transport.run(command, timeout=self.timeout)
        lines = result.stdout.splitlines()
        if result.exit_status == 0 and lines and lines[0] == "acquired":
            self.held = True
            self._refreshed = time.monotonic()
            return lines[1:]
        if result.exit_status != 0 or not lines or lines[0] != "held":
            raise DeploymentError(
                f"cannot prepare {self.paths.deploy_to} or create its deploy lock on "
                f"{self.transport.name}: "
                f"{result.stderr.strip() or 'exit status ' + str(result.exit_status)}; check "
                "that the deploy user can write there",
                code="lock_failed",
                context={"host": self.transport.name},
            )
        raise self._held_error(lines[1:])

    def _held_error(self, lines: list[str]) -> LockHeldError:
        info: dict[str, Any] = {}
        age = None
        for line in lines:
            if line.startswith("age="):
                try:
                    age = int(line[4:])
                except ValueError:
                    age = None
            elif line.startswith("{"):
                try:
                    info = json.loads(line)
                except ValueError:
                    info = {}
        who = (
            f"run {info.get('run_id', '?')} by {info.get('user', '?')} on {info.get('controller', '?')} "
            f"(pid {info.get('pid', '?')}) since {info.get('since', '?')}"
        )
        stale_reason = None
        same_controller = info.get("controller") == self.holder.controller
        if same_controller and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            stale_reason = f"its process {info['pid']} no longer runs on this controller"
        if stale_reason is None and age is not None and age > self.stale_after:
            stale_reason = f"it was last refreshed {age}s ago (more than {self.stale_after:g}s)"
        host = self.transport.name
        if stale_reason:
            message = (
                f"stale deploy lock on {host} ({self.paths.lock}) left by {who}: {stale_reason}; "
                "check that run is dead, then remove the lock with "
                f"'{command_name()} unlock --env {self.holder.environment} "
                f"--fraise {self.holder.fraise} --host {host}'"
            )
        else:
            message = f"deploy lock on {host} is held by {who}; wait for that run to end"
        error = LockHeldError(
            message,
            holder={**info, "stale": bool(stale_reason), "age": age},
            context={"host": host},
        )
        if stale_reason:
            error.code = "lock_stale"
        return error

    def refresh(self, every: float = 30.0) -> None:
        """Touch the holder file when the last refresh is older than ``every`` seconds."""
        if not self.held or time.monotonic() - self._refreshed < every:
            return
        self.transport.run(f"touch -c -- {quote(self._holder_path)}", timeout=self.timeout)
        self._refreshed = time.monotonic()

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        if not self.held:
            return
        command = (
            f"grep -q -- {quote(self.holder.run_id)} {quote(self._holder_path)} 2>/dev/null && "
            f"rm -rf -- {quote(self.paths.lock)}; true"
        )
        self.transport.run(command, timeout=self.timeout)
        self.held = False


def read_lock_command(paths: ReleasePaths) -> str:
    """Return the command that prints the lock's holder, or nothing when there is no lock."""
    holder = f"{paths.lock}/{HOLDER_FILE}"
    return f"[ -d {quote(paths.lock)} ] && {{ cat -- {quote(holder)} 2>/dev/null || echo '{{}}'; }}; true"


def break_lock_command(paths: ReleasePaths) -> str:
    """Return the command that removes a lock, for ``inv unlock``."""
    return f"rm -rf -- {quote(paths.lock)}"


def holder_is_alive(holder_json: str) -> bool:
    """Return whether a lock holder is a process that still runs on this controller."""
    try:
        info = json.loads(holder_json)
    except ValueError:
        return False
    pid = info.get("pid") if isinstance(info, dict) else None
    if info.get("controller") != socket.gethostname() or not isinstance(pid, int):
        return False
    return _pid_alive(pid)


def controller_identity() -> tuple[str, str, int]:
    """Return the user, host name and pid of this controller process."""
    try:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        user = os.environ.get("USER", "unknown")
    return user, socket.gethostname(), os.getpid()

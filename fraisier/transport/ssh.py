"""SSH transport: one Fabric connection per host and one long-lived ``sh`` channel for its steps.

Opening an exec channel per command costs a full session setup on the server (tens of
milliseconds), while a command sent to a shell that stays open costs one round trip. Each command runs
in its own process group, with stdin closed, so that:

* stdout and stderr stay separate (the channel has no pty);
* the exit status is exact: the shell prints it after a random end marker;
* a command that times out is killed on the host by its process group, over a fresh exec channel,
  and the shell channel is closed and replaced.
"""

from __future__ import annotations

import logging
import re
import secrets
import select
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paramiko

from fraisier.errors import (
    AuthenticationError,
    ConnectionLostError,
    DeploymentTimeoutError,
    FraisierError,
    HostKeyError,
    HostUnreachableError,
    ProviderError,
    translate_exception,
)
from fraisier.transport.base import CommandResult, Transport, wrap_command
from fraisier.transport.hostkeys import AcceptNewHostKey, RejectUnknownHostKey, default_known_hosts

log = logging.getLogger("fraisier.ssh")

KILL_TIMEOUT = 5.0
# The long-lived shell is bash where the host has it, else /bin/sh. Commands still run under
# ``sh -c``; bash only starts them: with job control on (``set -m``) it puts each background job
# in its own process group, which saves the exec of ``setsid`` per command (about half of the
# remote cost of a step on the benchmark hosts, see docs/benchmarks.md).
SHELL_COMMAND = "command -v bash >/dev/null 2>&1 && exec bash --noprofile --norc; exec /bin/sh"
# Sent once to each new shell. Commands and the markers write to fd 3, the channel's stderr;
# the shell's own stderr goes to /dev/null, because bash with job control may print job
# notices there. ``__fr_spawn`` starts a command in the background in a new process group and
# ``__fr_wait`` waits for it to exit. bash before 5.1 lacks ``wait -f``, and its plain ``wait``
# returns when a job is stopped, so such a bash is run with ``setsid`` as /bin/sh is.
SHELL_SETUP = (
    "exec 3>&2 2>/dev/null\n"
    'if [ -n "${BASH_VERSION:-}" ] && ( wait -f ); then\n'
    "  set -m\n"
    '  __fr_spawn() { "$@" </dev/null 2>&3 3>&- & }\n'
    '  __fr_wait() { wait -f "$1"; }\n'
    "else\n"
    '  __fr_spawn() { setsid "$@" </dev/null 2>&3 3>&- & }\n'
    '  __fr_wait() { wait "$1"; }\n'
    "fi\n"
)
_PID_LINE = re.compile(rb"(?P<token>[0-9a-f]{32}):pid:(?P<pid>\d+)\n")


class SSHTransport(Transport):
    """Runs commands over one long-lived shell channel on an SSH connection."""

    def __init__(self, host, settings) -> None:
        self.host = host
        self.name = host.name
        self.settings = settings
        self.connection = None
        self._shell: paramiko.Channel | None = None
        self._lock = threading.Lock()

    @property
    def _context(self) -> dict[str, str]:
        return {"host": self.name}

    def _explained(self, error: FraisierError, connection: Any) -> FraisierError:
        """Add the user, keys and known_hosts entry that a failed login involved."""
        port = connection.port or 22
        if isinstance(error, AuthenticationError):
            keys = self.host.identity_file or "ssh-agent and the default keys in ~/.ssh"
            error.message = (
                f"{error.message}: tried user '{connection.user}' on "
                f"{connection.host}:{port}, offering {keys}; set 'user' or 'identity_file' of "
                f"host {self.name} in the inventory, or fix authorized_keys on the host"
            )
        elif isinstance(error, HostKeyError) and error.code == "host_key_changed":
            known_hosts = self.settings.known_hosts or str(default_known_hosts())
            entry = connection.host if port == 22 else f"[{connection.host}]:{port}"
            error.message = (
                f"{error.message} (entry '{entry}' of {known_hosts}); to accept a planned "
                f"change run: ssh-keygen -f {known_hosts} -R '{entry}'"
            )
        return error

    def connect(self) -> None:
        from fabric import Connection

        client = self._checked_client(self.name)

        connect_kwargs: dict[str, object] = {
            "banner_timeout": self.settings.connect_timeout,
            "auth_timeout": self.settings.connect_timeout,
        }
        if self.host.identity_file:
            connect_kwargs["key_filename"] = [self.host.identity_file]
        connection = Connection(
            host=self.host.address,
            user=self.host.user,
            port=self.host.port,
            connect_timeout=self.settings.connect_timeout,
            connect_kwargs=connect_kwargs,
            config=_fabric_config(),
        )
        connection.client = client
        # Fabric connects to a ProxyJump host from ~/.ssh/config with its own client, which
        # accepts any host key, so each jump host gets a client that checks it like the host.
        gateway = connection.gateway
        while isinstance(gateway, Connection):
            gateway.client = self._checked_client(f"jump host {gateway.host} of {self.name}")
            gateway = gateway.gateway
        try:
            connection.open()
        except FraisierError as exc:
            client.close()
            _close_gateways(connection)
            raise exc.with_context(**self._context) from None
        except Exception as exc:
            client.close()
            _close_gateways(connection)
            error = translate_exception(exc, **self._context)
            if isinstance(error, ConnectionLostError):
                # No session existed yet, so nothing was lost: the SSH handshake failed. A hung
                # sshd shows up here as "No existing session" when Paramiko's banner timeout
                # ends the handshake while authentication starts.
                error = HostUnreachableError(
                    f"SSH handshake with {self.name} ({self.host.address}:{self.host.port}) "
                    f"failed within connect_timeout {self.settings.connect_timeout:g}s: "
                    f"{error.message}; sshd may be hung or overloaded",
                    context=self._context,
                )
            raise self._explained(error, connection) from exc
        transport = connection.transport
        if self.settings.keepalive:
            transport.set_keepalive(int(self.settings.keepalive))
        sock = transport.sock
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connection = connection

    def _checked_client(self, label: str) -> paramiko.SSHClient:
        """Create an SSH client that checks host keys per the settings, naming ``label``."""
        known_hosts = Path(self.settings.known_hosts or default_known_hosts()).expanduser()
        client = paramiko.SSHClient()
        if known_hosts.is_file():
            client.load_host_keys(str(known_hosts))
        policy_class = (
            AcceptNewHostKey
            if self.settings.host_key_checking == "accept-new"
            else RejectUnknownHostKey
        )
        client.set_missing_host_key_policy(policy_class(known_hosts, label))
        return client

    def _open_shell(self, timeout: float) -> paramiko.Channel:
        if self._shell is not None and not self._shell.closed:
            return self._shell
        try:
            channel = self.connection.transport.open_session(timeout=timeout)
            channel.exec_command(SHELL_COMMAND)
            channel.sendall(SHELL_SETUP.encode())
        except Exception as exc:
            raise translate_exception(exc, **self._context) from exc
        self._shell = channel
        return channel

    def run(
        self,
        command: str,
        *,
        timeout: float,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        sudo: bool | str = False,
    ) -> CommandResult:
        if self.connection is None:
            self.connect()
        line = wrap_command(command, cwd=cwd, env=env, sudo=sudo)
        token = secrets.token_hex(16)
        script = (
            f"__fr_spawn {line}; __fr_pid=$!\n"
            f"printf '{token}:pid:%d\\n' \"$__fr_pid\" >&3\n"
            f'__fr_wait "$__fr_pid"; __fr_rc=$?\n'
            f"printf '{token}:rc:%d\\n' \"$__fr_rc\"; printf '{token}:end\\n' >&3\n"
        )
        with self._lock:
            started = time.monotonic()
            deadline = started + timeout
            channel = self._open_shell(min(timeout, self.settings.connect_timeout))
            try:
                channel.sendall(script.encode())
                stdout, stderr, exit_status, _ = self._read_until_end(channel, token, deadline)
            except DeploymentTimeoutError as exc:
                self._abandon_shell()
                killed = self._kill_remote(exc.context.pop("_pid", None))
                raise DeploymentTimeoutError(
                    f"command timed out after {timeout:g}s on {self.name}"
                    + (
                        " and was killed"
                        if killed
                        else "; killing it failed, so it may still run on the host"
                    ),
                    context=self._context,
                ) from None
            except FraisierError:
                self._abandon_shell()
                raise
            except Exception as exc:
                self._abandon_shell()
                raise translate_exception(exc, **self._context) from exc
        return CommandResult(
            command=command,
            exit_status=exit_status,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
            duration=time.monotonic() - started,
        )

    def _read_until_end(
        self, channel: paramiko.Channel, token: str, deadline: float
    ) -> tuple[bytes, bytes, int, int | None]:
        rc_marker = f"{token}:rc:".encode()
        end_marker = f"{token}:end\n".encode()
        stdout = bytearray()
        stderr = bytearray()
        pid: int | None = None
        exit_status: int | None = None
        stdout_done = stderr_done = False
        while not (stdout_done and stderr_done):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = DeploymentTimeoutError("timed out", context={})
                error.context["_pid"] = pid if pid is not None else _find_pid(stderr, token)
                raise error
            if not (channel.recv_ready() or channel.recv_stderr_ready()):
                if channel.exit_status_ready() or channel.closed:
                    raise ConnectionLostError(
                        f"the shell channel on {self.name} closed while a command was running",
                        code="channel_closed",
                        context=self._context,
                    )
                select.select([channel], [], [], min(remaining, 1.0))
            while channel.recv_ready():
                data = channel.recv(65536)
                if not data:
                    break
                stdout += data
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            if not stdout_done:
                at = stdout.find(rc_marker)
                newline = stdout.find(b"\n", at) if at >= 0 else -1
                if newline >= 0:
                    exit_status = int(stdout[at + len(rc_marker) : newline])
                    del stdout[at:]
                    stdout_done = True
            if not stderr_done:
                at = stderr.find(end_marker)
                if at >= 0:
                    del stderr[at:]
                    stderr_done = True
        pid = _find_pid(stderr, token)
        cleaned = _PID_LINE.sub(
            lambda m: b"" if m["token"] == token.encode() else m[0], bytes(stderr)
        )
        assert exit_status is not None
        return bytes(stdout), cleaned, exit_status, pid

    def _abandon_shell(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            try:
                shell.close()
            except Exception:
                log.debug("closing the shell channel on %s failed", self.name, exc_info=True)

    def _kill_remote(self, pid: int | None) -> bool:
        """Kill a timed-out command's process group over a fresh exec channel; return success."""
        if pid is None or self.connection is None:
            return False
        # dash, Debian's /bin/sh, rejects "kill -- -PID" with "Illegal number", so the group
        # is named as "-PID" right after the signal.
        command = f"kill -TERM -{pid} 2>/dev/null; sleep 1; kill -KILL -{pid} 2>/dev/null; true"
        try:
            channel = self.connection.transport.open_session(timeout=KILL_TIMEOUT)
            try:
                channel.settimeout(KILL_TIMEOUT)
                channel.exec_command(command)
                # recv_exit_status() has no timeout and would hang on a host that stops
                # responding after the channel opened.
                if not channel.status_event.wait(KILL_TIMEOUT):
                    raise TimeoutError(f"no exit status from kill within {KILL_TIMEOUT:g}s")
            finally:
                channel.close()
            log.info("killed process group %s of a timed-out command on %s", pid, self.name)
            return True
        except Exception as exc:
            # The connection no longer opens channels, for example because the host's sshd
            # is stopped or frozen. Dropping it makes the next command (marking the release
            # failed, rolling back, releasing the lock) reconnect instead of waiting again.
            log.warning(
                "could not kill process group %s on %s after a timeout: %s; closing the "
                "connection so that the next command reconnects",
                pid,
                self.name,
                exc,
            )
            self.close()
            return False

    def _open_sftp(self) -> paramiko.SFTPClient:
        try:
            return self.connection.client.open_sftp()
        except paramiko.SSHException as exc:
            transport = self.connection.client.get_transport()
            if transport is None or not transport.is_active():
                raise
            # The connection is up but the server closed the subsystem channel: its sshd has
            # no SFTP subsystem, which a retry cannot fix.
            raise ProviderError(
                f"{self.name} rejected the SFTP subsystem request ({exc}); Fraisier uploads releases "
                "over SFTP, so add 'Subsystem sftp internal-sftp' (or the path of "
                "sftp-server) to the host's sshd_config and reload sshd",
                code="sftp_unavailable",
                context=dict(self._context),
                recoverable=False,
            ) from exc

    def check_upload(self) -> None:
        if self.connection is None:
            self.connect()
        try:
            self._open_sftp().close()
        except FraisierError:
            raise
        except Exception as exc:
            raise translate_exception(exc, **self._context) from exc

    def put(self, local_path: Path, remote_path: str, *, timeout: float) -> None:
        if self.connection is None:
            self.connect()
        try:
            sftp = self._open_sftp()
            try:
                sftp.get_channel().settimeout(timeout)
                sftp.put(str(local_path), remote_path)
            finally:
                sftp.close()
        except FraisierError:
            raise
        except Exception as exc:
            error = translate_exception(exc, **self._context)
            if isinstance(exc, (OSError, IOError)) and not isinstance(exc, socket.error):
                error.message = (
                    f"upload of {local_path.name} to {self.name}:{remote_path} failed: {exc}"
                )
            raise error from exc

    def close(self) -> None:
        self._abandon_shell()
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("closing the connection to %s failed", self.name, exc_info=True)
            _close_gateways(connection)


def _close_gateways(connection: Any) -> None:
    """Close the ProxyJump connections of ``connection``, which Fabric's close() leaves open."""
    from fabric import Connection

    gateway = connection.gateway
    while isinstance(gateway, Connection):
        try:
            gateway.close()
        except Exception:
            log.debug("closing the jump host connection %s failed", gateway.host, exc_info=True)
        gateway = gateway.gateway


_config_lock = threading.Lock()
_config_cache: dict[tuple[object, ...], Any] = {}


def _fabric_config() -> Any:
    """Return a Fabric Config for one connection, cloned from one parsed per process.

    Building a Config reads and parses the SSH config files, which cost 5 to 6 ms of CPU per
    connection on the loaded benchmark machine (see docs/benchmarks.md), so the files are parsed
    once and each connection gets a clone. A Connection changes its Config as it resolves its
    host, so sharing one Config between threads raced and failed. The parsed Config is rebuilt
    when ``~/.ssh/config`` or ``/etc/ssh/ssh_config`` changes.
    """
    from fabric import Config

    key: tuple[object, ...] = ()
    for path in (Path("~/.ssh/config").expanduser(), Path("/etc/ssh/ssh_config")):
        try:
            stat = path.stat()
        except OSError:
            key += (str(path), None)
        else:
            key += (str(path), stat.st_mtime_ns, stat.st_size)
    with _config_lock:
        config = _config_cache.get(key)
        if config is None:
            _config_cache.clear()
            config = _config_cache[key] = Config()
        return config.clone()


def _find_pid(stderr: bytes | bytearray, token: str) -> int | None:
    for match in _PID_LINE.finditer(bytes(stderr)):
        if match["token"] == token.encode():
            return int(match["pid"])
    return None

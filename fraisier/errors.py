"""The exception hierarchy of Fraisier and the translation of transport errors into it.

Every error carries a stable machine-readable ``code``, a ``context`` dict (run id, environment,
fraise, host, step, attempt) and a ``recoverable`` flag that the retry strategies read.
"""

from __future__ import annotations

import enum
import json
import socket
from typing import Any


class ExitCode(enum.IntEnum):
    """Process exit codes of the Fraisier tasks, documented in docs/exit-codes.md."""

    SUCCESS = 0
    DEPLOY_FAILED = 1
    CONFIGURATION = 2
    ROLLBACK_FAILED = 3
    LOCK_HELD = 4
    DATABASE = 5
    INTERRUPTED_SIGINT = 130
    INTERRUPTED_SIGTERM = 143


CONTEXT_KEYS = ("run_id", "environment", "fraise", "host", "step", "attempt")


class FraisierError(Exception):
    """Root of every error that Fraisier raises on purpose."""

    code = "fraisier_error"
    recoverable = False
    exit_code = ExitCode.DEPLOY_FAILED

    def __init__(
        self,
        message: str,
        code: str | None = None,
        context: dict[str, Any] | None = None,
        recoverable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # Instance attributes shadow the class defaults only when the caller passes a value.
        if code is not None:
            self.code = code
        if recoverable is not None:
            self.recoverable = recoverable
        self.context: dict[str, Any] = {k: v for k, v in (context or {}).items() if v is not None}

    def with_context(self, **context: Any) -> FraisierError:
        """Add context keys that are not set yet and return the same error."""
        for key, value in context.items():
            if value is not None and key not in self.context:
                self.context[key] = value
        return self

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-safe dict: type, code, message, recoverable and context."""
        return {
            "type": type(self).__name__,
            "code": self.code,
            "message": self.message,
            "recoverable": self.recoverable,
            "context": {k: _json_safe(v) for k, v in self.context.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    def __str__(self) -> str:
        where = ", ".join(f"{k}={self.context[k]}" for k in ("host", "step") if k in self.context)
        return f"{self.message} [{where}]" if where else self.message


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class ConfigurationError(FraisierError):
    """Invalid inventory, recipe, option or setting; raised before any host is contacted."""

    code = "configuration_error"
    exit_code = ExitCode.CONFIGURATION


class ValidationError(ConfigurationError):
    """A value that fails its strict pattern: a release id, fraise, environment name or ref."""

    code = "invalid_value"


class DeploymentError(FraisierError):
    """A deploy step failed on a host."""

    code = "deployment_error"


class CommandFailedError(DeploymentError):
    """A remote command exited non-zero; carries the command, exit status and output tail."""

    code = "command_failed"

    def __init__(
        self,
        message: str,
        *,
        command: str = "",
        exit_status: int | None = None,
        stdout_tail: str = "",
        stderr_tail: str = "",
        context: dict[str, Any] | None = None,
        recoverable: bool | None = None,
    ) -> None:
        super().__init__(message, context=context, recoverable=recoverable)
        self.command = command
        self.exit_status = exit_status
        self.stdout_tail = stdout_tail
        self.stderr_tail = stderr_tail

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(
            command=self.command,
            exit_status=self.exit_status,
            stdout_tail=self.stdout_tail,
            stderr_tail=self.stderr_tail,
        )
        return data


class DeploymentTimeoutError(DeploymentError):
    """A remote command or a whole step ran past its timeout."""

    code = "timeout"
    recoverable = True


class HealthCheckError(DeploymentError):
    """The health check of a switched release failed after its retries."""

    code = "health_check_failed"


class ProviderError(FraisierError):
    """A host, connection or external source (git, artifact mirror) failed."""

    code = "provider_error"


class ProviderUnavailableError(ProviderError):
    """A host or source that cannot be reached now and may be reachable later."""

    code = "provider_unavailable"
    recoverable = True


class HostUnreachableError(ProviderUnavailableError):
    """Connecting to a host failed: refused, timed out, DNS failure or network down."""

    code = "host_unreachable"


class ConnectionLostError(ProviderUnavailableError):
    """An open SSH connection or channel closed under a running command."""

    code = "connection_lost"


class AuthenticationError(ProviderError):
    """The host rejected every key or password offered."""

    code = "authentication_failed"


class HostKeyError(ProviderError):
    """The host key is unknown or differs from known_hosts; the host is never trusted silently."""

    code = "host_key_rejected"

    def __init__(
        self,
        message: str,
        *,
        expected: str | None = None,
        received: str | None = None,
        code: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, context=context)
        self.expected = expected
        self.received = received


class LockHeldError(FraisierError):
    """Another run holds the deploy lock of this environment and fraise."""

    code = "lock_held"
    exit_code = ExitCode.LOCK_HELD

    def __init__(
        self,
        message: str,
        *,
        holder: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, context=context)
        self.holder = holder or {}


class RollbackError(FraisierError):
    """A rollback failed: the host may be on an unknown release and needs manual action."""

    code = "rollback_failed"
    exit_code = ExitCode.ROLLBACK_FAILED


class DatabaseError(FraisierError):
    """The run database failed; transient failures are recoverable."""

    code = "database_error"
    exit_code = ExitCode.DATABASE


class SchemaVersionError(DatabaseError):
    """The database schema is older or newer than this version of Fraisier."""

    code = "schema_version"


class InterruptedRunError(FraisierError):
    """The run received SIGINT or SIGTERM."""

    code = "interrupted"

    def __init__(self, message: str, *, signal_number: int, context: dict[str, Any] | None = None):
        super().__init__(message, context=context)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


def translate_exception(exc: BaseException, **context: Any) -> FraisierError:
    """Translate a Paramiko, socket or Invoke exception into the Fraisier hierarchy.

    The original exception is kept as ``__cause__`` by the caller's ``raise ... from exc``;
    ``context`` is attached to the returned error.
    """
    if isinstance(exc, FraisierError):
        return exc.with_context(**context)

    import paramiko

    host = context.get("host", "the host")
    detail = f"{type(exc).__name__}: {exc}".strip()

    if isinstance(exc, paramiko.BadHostKeyException):
        from fraisier.transport.hostkeys import fingerprint

        expected = fingerprint(exc.expected_key)
        received = fingerprint(exc.key)
        return HostKeyError(
            f"host key of {host} changed: expected {expected}, "
            f"received {received}; find out why before you trust the new key",
            expected=expected,
            received=received,
            code="host_key_changed",
            context=context,
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthenticationError(
            f"authentication to {host} failed ({detail}); check the user and identity file",
            context=context,
        )
    if isinstance(exc, socket.gaierror):
        return HostUnreachableError(
            f"cannot resolve {host}: {exc}", code="dns_failure", context=context
        )
    if isinstance(exc, ConnectionRefusedError):
        return HostUnreachableError(
            f"connection to {host} refused; is sshd running on that port?",
            code="connection_refused",
            context=context,
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return HostUnreachableError(
            f"connecting to {host} timed out", code="connect_timeout", context=context
        )
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        # Paramiko raises this when every address of the host failed; ``errors`` maps each
        # (address, port) to its socket error, and its own message has "[Errno None]".
        where = ", ".join(f"{address[0]}:{address[1]}" for address in exc.errors)
        if all(isinstance(error, ConnectionRefusedError) for error in exc.errors.values()):
            return HostUnreachableError(
                f"connection to {host} ({where}) refused; is sshd running on that port?",
                code="connection_refused",
                context=context,
            )
        reasons = "; ".join(str(error) for error in exc.errors.values())
        return HostUnreachableError(
            f"no connection to {host} ({where}): {reasons}; check the address, port and network",
            context=context,
        )
    if isinstance(exc, (paramiko.ChannelException, EOFError, ConnectionResetError)):
        return ConnectionLostError(
            f"connection to {host} lost: {detail}", code="channel_closed", context=context
        )
    if isinstance(exc, paramiko.SSHException) and "protocol banner" in str(exc):
        # Paramiko's banner_timeout ran out: sshd accepted the TCP connection and sent nothing.
        return HostUnreachableError(
            f"connecting to {host} timed out: sshd accepted the TCP connection but sent no SSH "
            "banner; it may be hung or overloaded",
            code="connect_timeout",
            context=context,
        )
    if isinstance(exc, paramiko.SSHException):
        return ConnectionLostError(f"SSH error on {host}: {detail}", context=context)
    if isinstance(exc, OSError):
        return HostUnreachableError(f"network error on {host}: {detail}", context=context)

    from invoke.exceptions import CommandTimedOut, UnexpectedExit

    if isinstance(exc, CommandTimedOut):
        # str(CommandTimedOut) spans many lines with the whole output; the message stays on one.
        return DeploymentTimeoutError(
            f"command {exc.result.command!r} timed out after {exc.timeout}s on {host}",
            context=context,
        )
    if isinstance(exc, UnexpectedExit):
        result = exc.result
        return CommandFailedError(
            f"command exited {result.exited} on {host}",
            command=result.command,
            exit_status=result.exited,
            stdout_tail=result.stdout[-2000:],
            stderr_tail=result.stderr[-2000:],
            context=context,
        )

    return DeploymentError(f"unexpected error on {host}: {detail}", context=context)

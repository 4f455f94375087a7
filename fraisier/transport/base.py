"""The transport interface and the shell wrapping shared by every transport."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from fraisier.validation import quote


@dataclasses.dataclass
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def build_script(
    command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Build the shell script that runs ``command`` in ``cwd`` with ``env`` exported.

    ``command`` is shell code from a recipe and is kept whole; ``cwd`` and the values are quoted.
    """
    lines: list[str] = []
    if cwd:
        lines.append(f"cd -- {quote(cwd)} || exit 1")
    for key, value in (env or {}).items():
        lines.append(f"export {key}={quote(value)}")
    lines.append(command)
    return "\n".join(lines)


def wrap_command(
    command: str,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    sudo: bool | str = False,
) -> str:
    """Build one shell command line that runs ``command`` through ``sh -c``, with sudo if asked."""
    line = f"sh -c {quote(build_script(command, cwd=cwd, env=env))}"
    if sudo:
        user = "root" if sudo is True else str(sudo)
        line = f"sudo -n -H -u {quote(user)} -- {line}"
    return line


class Transport(abc.ABC):
    """Runs commands on one host and uploads files to it."""

    name: str

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the connection; raise a ProviderError subclass when the host cannot be used."""

    @abc.abstractmethod
    def run(
        self,
        command: str,
        *,
        timeout: float,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        sudo: bool | str = False,
    ) -> CommandResult:
        """Run a shell command and return its result; a non-zero exit status is not an error.

        Raises DeploymentTimeoutError after ``timeout`` seconds (the command is killed on the host
        when the host still responds) and ConnectionLostError when the connection drops.
        """

    @abc.abstractmethod
    def put(self, local_path: Path, remote_path: str, *, timeout: float) -> None:
        """Upload one file."""

    def check_upload(self) -> None:  # noqa: B027 - a no-op unless a transport needs a check
        """Check, without writing anything, that ``put`` can upload to this host.

        The local transport copies files and needs no check.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Close every channel and the connection; safe to call twice."""

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The controller itself as a host (``connection: local``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from fraisier.errors import DeploymentTimeoutError
from fraisier.transport.base import CommandResult, Transport, wrap_command


class LocalTransport(Transport):
    """Runs each command in a new session of ``sh`` on the controller."""

    def __init__(self, host) -> None:
        self.host = host
        self.name = host.name

    def connect(self) -> None:
        return None

    def run(
        self,
        command: str,
        *,
        timeout: float,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        sudo: bool | str = False,
    ) -> CommandResult:
        line = wrap_command(command, cwd=cwd, env=env, sudo=sudo)
        started = time.monotonic()
        process = subprocess.Popen(
            ["/bin/sh", "-c", line],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise DeploymentTimeoutError(
                f"command timed out after {timeout:g}s on {self.name} and was killed",
                context={"host": self.name},
            ) from None
        return CommandResult(
            command=command,
            exit_status=process.returncode,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
            duration=time.monotonic() - started,
        )

    def put(self, local_path: Path, remote_path: str, *, timeout: float) -> None:
        shutil.copyfile(local_path, remote_path)

    def close(self) -> None:
        return None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=2)
            break
        except subprocess.TimeoutExpired:
            continue
    process.communicate()

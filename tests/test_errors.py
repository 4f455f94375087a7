"""Tests of the error hierarchy and of translate_exception on exceptions raised for real."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import invoke
import paramiko
import pytest
from paramiko.packet import Packetizer

from fraisier.errors import (
    AuthenticationError,
    CommandFailedError,
    ConfigurationError,
    ConnectionLostError,
    DeploymentTimeoutError,
    ExitCode,
    FraisierError,
    HealthCheckError,
    HostKeyError,
    HostUnreachableError,
    InterruptedRunError,
    LockHeldError,
    ProviderUnavailableError,
    ValidationError,
    translate_exception,
)
from fraisier.transport.hostkeys import fingerprint

SSHD = "/usr/sbin/sshd"


# --- class defaults, context and serialisation ---


def test_class_defaults_hold_for_instances() -> None:
    assert ProviderUnavailableError("x").recoverable is True
    assert HostUnreachableError("x").recoverable is True
    assert ConnectionLostError("x").recoverable is True
    assert DeploymentTimeoutError("x").recoverable is True
    assert FraisierError("x").recoverable is False
    assert AuthenticationError("x").recoverable is False
    assert HealthCheckError("x").recoverable is False
    assert CommandFailedError("x").recoverable is False


def test_codes_and_exit_codes_per_class() -> None:
    assert ProviderUnavailableError("x").code == "provider_unavailable"
    assert ValidationError("x").code == "invalid_value"
    assert ValidationError("x").exit_code == ExitCode.CONFIGURATION
    assert LockHeldError("x").exit_code == ExitCode.LOCK_HELD
    assert InterruptedRunError("x", signal_number=2).exit_code == 130
    assert InterruptedRunError("x", signal_number=15).exit_code == 143


def test_instance_arguments_override_defaults() -> None:
    error = ProviderUnavailableError("x", code="mirror_down", recoverable=False)

    assert error.code == "mirror_down"
    assert error.recoverable is False
    # The class default stays untouched for other instances.
    assert ProviderUnavailableError("y").code == "provider_unavailable"
    assert ProviderUnavailableError("y").recoverable is True


def test_context_drops_none_values() -> None:
    error = FraisierError("x", context={"host": "web1", "step": None})

    assert error.context == {"host": "web1"}


def test_with_context_keeps_existing_keys() -> None:
    error = FraisierError("x", context={"host": "web1"})

    returned = error.with_context(host="web2", step="build", fraise=None)

    assert returned is error
    assert error.context == {"host": "web1", "step": "build"}


def test_str_names_host_and_step() -> None:
    error = CommandFailedError("make failed", context={"host": "web1", "step": "build"})

    assert str(error) == "make failed [host=web1, step=build]"
    assert str(FraisierError("plain")) == "plain"


def test_to_dict_json_round_trip() -> None:
    error = CommandFailedError(
        "make exited 2",
        command="make",
        exit_status=2,
        stdout_tail="out",
        stderr_tail="err",
        context={"host": "web1", "attempt": 2, "path": Path("/srv/app"), "tags": ("a", "b")},
    )

    data = json.loads(error.to_json())

    assert data == error.to_dict()
    assert data["type"] == "CommandFailedError"
    assert data["code"] == "command_failed"
    assert data["message"] == "make exited 2"
    assert data["recoverable"] is False
    assert data["exit_status"] == 2
    assert data["command"] == "make"
    assert data["stdout_tail"] == "out"
    assert data["stderr_tail"] == "err"
    # Values that JSON cannot represent become strings or lists.
    assert data["context"] == {
        "host": "web1",
        "attempt": 2,
        "path": "/srv/app",
        "tags": ["a", "b"],
    }


def test_to_json_keeps_non_ascii() -> None:
    error = ConfigurationError("invalid fraise 'café'", context={"fraise": "café"})

    text = error.to_json()

    assert "café" in text
    assert json.loads(text)["context"]["fraise"] == "café"


# --- translate_exception on real exceptions ---


def _closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_translate_connection_refused() -> None:
    port = _closed_loopback_port()
    with pytest.raises(ConnectionRefusedError) as caught:
        socket.create_connection(("127.0.0.1", port), timeout=2)

    error = translate_exception(caught.value, host="web1", step="connect")

    assert isinstance(error, HostUnreachableError)
    assert error.code == "connection_refused"
    assert error.recoverable is True
    assert "web1" in error.message
    assert error.context == {"host": "web1", "step": "connect"}


def test_translate_dns_failure() -> None:
    # The top-level domain .invalid is reserved, so it never resolves.
    with pytest.raises(socket.gaierror) as caught:
        socket.getaddrinfo("nonexistent.invalid", 22)

    error = translate_exception(caught.value, host="nonexistent.invalid")

    assert isinstance(error, HostUnreachableError)
    assert error.code == "dns_failure"
    assert error.recoverable is True
    assert "nonexistent.invalid" in error.message


def test_translate_socket_timeout() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=2)
        peer, _ = server.accept()
        try:
            client.settimeout(0.2)
            with pytest.raises(socket.timeout) as caught:
                client.recv(1)
        finally:
            peer.close()
            client.close()

    error = translate_exception(caught.value, host="web1")

    assert isinstance(error, HostUnreachableError)
    assert error.code == "connect_timeout"
    assert error.recoverable is True


def test_translate_eof_from_closed_peer() -> None:
    left, right = socket.socketpair()
    right.close()
    packetizer = Packetizer(left)
    try:
        with pytest.raises(EOFError) as caught:
            packetizer.read_all(4)
    finally:
        left.close()

    error = translate_exception(caught.value, host="web1", step="build")

    assert isinstance(error, ConnectionLostError)
    assert error.code == "channel_closed"
    assert error.recoverable is True
    assert error.context["step"] == "build"


def test_translate_bad_host_key_from_generated_keys() -> None:
    expected = paramiko.RSAKey.generate(2048)
    received = paramiko.RSAKey.generate(2048)
    exc = paramiko.BadHostKeyException("web1", received, expected)

    error = translate_exception(exc, host="web1")

    assert isinstance(error, HostKeyError)
    assert error.code == "host_key_changed"
    assert error.recoverable is False
    assert error.expected == fingerprint(expected)
    assert error.received == fingerprint(received)
    assert error.expected != error.received
    assert error.expected.startswith("ssh-rsa SHA256:")
    assert "find out why" in error.message


def test_translate_unexpected_exit() -> None:
    with pytest.raises(invoke.UnexpectedExit) as caught:
        invoke.run("sh -c 'echo out; echo err >&2; exit 3'", hide=True, in_stream=False)

    error = translate_exception(caught.value, host="web1", step="build")

    assert isinstance(error, CommandFailedError)
    assert error.exit_status == 3
    assert error.stdout_tail == "out\n"
    assert error.stderr_tail == "err\n"
    assert "exit 3" in error.command
    assert error.recoverable is False
    assert error.to_dict()["exit_status"] == 3


def test_translate_command_timed_out() -> None:
    started = time.monotonic()
    with pytest.raises(invoke.CommandTimedOut) as caught:
        invoke.run("sleep 5", timeout=0.2, hide=True, in_stream=False)
    assert time.monotonic() - started < 4

    error = translate_exception(caught.value, host="web1")

    assert isinstance(error, DeploymentTimeoutError)
    assert error.recoverable is True
    assert "sleep 5" in error.message
    assert "\n" not in error.message


def test_translate_unknown_exception() -> None:
    error = translate_exception(ZeroDivisionError("division by zero"), host="web1")

    assert type(error).__name__ == "DeploymentError"
    assert "ZeroDivisionError" in error.message


def test_translate_fraisier_error_merges_context() -> None:
    original = HealthCheckError("503 from /healthz", context={"host": "web1"})

    error = translate_exception(original, host="web2", step="health_check")

    assert error is original
    assert error.context == {"host": "web1", "step": "health_check"}


# --- translate_exception on a real OpenSSH server on loopback ---


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Start a real sshd on a free loopback port that accepts no key; yield port and dir."""
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} not found; install the Debian package openssh-server")
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen not found; install the Debian package openssh-client")
    workdir = tmp_path_factory.mktemp("sshd")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "host_key")],
        check=True,
    )
    port = _closed_loopback_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {workdir / 'host_key'}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        "AuthorizedKeysFile none\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
    )
    # sshd exits at start when its privilege separation directory is missing.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - closed after the process ends
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    output = (workdir / "sshd.log").read_text(errors="replace")
                    pytest.fail(f"sshd did not start on 127.0.0.1:{port}: {output}")
                time.sleep(0.05)
        yield port, workdir
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _client() -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def test_translate_real_authentication_failure(sshd: tuple[int, Path]) -> None:
    port, workdir = sshd
    client = _client()
    host_key = paramiko.Ed25519Key.from_private_key_file(str(workdir / "host_key"))
    client.get_host_keys().add(f"[127.0.0.1]:{port}", "ssh-ed25519", host_key)
    unauthorized = paramiko.RSAKey.generate(2048)

    with pytest.raises(paramiko.AuthenticationException) as caught:
        client.connect(
            "127.0.0.1",
            port,
            username="nobody",
            pkey=unauthorized,
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()

    error = translate_exception(caught.value, host="127.0.0.1")

    assert isinstance(error, AuthenticationError)
    assert error.code == "authentication_failed"
    assert error.recoverable is False
    assert "identity file" in error.message


def test_translate_real_host_key_change(sshd: tuple[int, Path]) -> None:
    port, workdir = sshd
    other_key_path = workdir / "other_key"
    if not other_key_path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key_path)],
            check=True,
        )
    other_key = paramiko.Ed25519Key.from_private_key_file(str(other_key_path))
    real_key = paramiko.Ed25519Key.from_private_key_file(str(workdir / "host_key"))
    client = _client()
    client.get_host_keys().add(f"[127.0.0.1]:{port}", "ssh-ed25519", other_key)

    with pytest.raises(paramiko.BadHostKeyException) as caught:
        client.connect(
            "127.0.0.1",
            port,
            username="nobody",
            pkey=paramiko.RSAKey.generate(2048),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()

    error = translate_exception(caught.value, host="127.0.0.1")

    assert isinstance(error, HostKeyError)
    assert error.code == "host_key_changed"
    assert error.expected == fingerprint(other_key)
    assert error.received == fingerprint(real_key)

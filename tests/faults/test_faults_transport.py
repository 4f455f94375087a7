"""Transport limits: keepalives, command timeouts that kill the remote process, frozen sshd."""

from __future__ import annotations

import inspect
import socket
import threading
import time
import uuid

import pytest
from faultlab import FRAISE, Lab

from fraisier.errors import DeploymentTimeoutError, ExitCode
from fraisier.inventory import load_inventory
from fraisier.transport import open_transport
from fraisier.transport.base import Transport
from fraisier.transport.local import LocalTransport
from fraisier.transport.ssh import SSHTransport


def open_first_host(lab: Lab) -> SSHTransport:
    """Connect an SSHTransport to the first host with the fraise's settings."""
    inventory = load_inventory(lab.inventory_path, "test")
    fraise = inventory.fraise(FRAISE)
    host = inventory.hosts_for(fraise)[0]
    transport = open_transport(host, fraise.settings)
    assert isinstance(transport, SSHTransport)
    transport.connect()
    return transport


def test_keepalive_is_set(lab: Lab) -> None:
    lab.write_inventory(settings={"keepalive": 7})

    transport = open_first_host(lab)
    try:
        assert transport.connection is not None
        ssh = transport.connection.transport
        # Paramiko keeps the interval in a name-mangled attribute of its packetizer.
        assert ssh.packetizer._Packetizer__keepalive_interval == 7
        assert ssh.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        transport.close()


@pytest.mark.parametrize("transport_class", [Transport, SSHTransport, LocalTransport])
def test_run_has_no_default_timeout(transport_class: type[Transport]) -> None:
    for method in ("run", "put"):
        parameter = inspect.signature(getattr(transport_class, method)).parameters["timeout"]
        assert parameter.default is inspect.Parameter.empty
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


def test_timeout_kills_remote_command(lab: Lab) -> None:
    lab.write_inventory()
    host = lab.hosts[0]
    marker = f"fraisier-timeout-{uuid.uuid4().hex}"
    before = set(threading.enumerate())

    transport = open_first_host(lab)
    try:
        started = time.monotonic()
        with pytest.raises(DeploymentTimeoutError) as raised:
            transport.run(f"sh -c 'sleep 30; echo {marker}' & wait", timeout=1)
        elapsed = time.monotonic() - started
        assert "timed out after 1s" in raised.value.message
        assert "was killed" in raised.value.message
        # The same transport still runs commands: it opened a new shell channel.
        assert transport.run("echo still here", timeout=10).stdout == "still here\n"
    finally:
        transport.close()

    # One second of timeout plus the TERM-then-KILL of the kill command.
    assert elapsed < 5
    lab.assert_no_leaked_threads(before)
    lab.assert_no_sessions()
    leftovers = [pid for pid in host.user_pids() if "sleep 30" in _command_line(pid)]
    assert leftovers == []


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_frozen_listener_fails_within_connect_timeout(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h3 = lab.hosts[2]
    lab.write_recipe()
    lab.write_inventory(settings={"connect_timeout": 2})
    h3.freeze(listener=True)

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.host(h3.name)["status"] == "unreachable", outcome.host(h3.name)
    # Paramiko reports the missing banner either itself or as "No existing session".
    error = outcome.host(h3.name)["error"]
    assert "no SSH banner" in error or "handshake" in error, error
    # The SSH banner never comes, so connecting gives up after connect_timeout (2 s).
    assert outcome.elapsed < 15, f"the deploy took {outcome.elapsed:.1f}s"
    h3.thaw()
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    error_codes = {h.host: h.error_code for h in detail.hosts}
    assert error_codes[h3.name] in ("connect_timeout", "host_unreachable")

"""Per-step overhead on one open connection: Fraisier's transport against the floor's shell.

Whole-process timings cannot resolve a cost of a millisecond per step on a loaded 2-core
machine, so this script times steps inside one process, on one real sshd host on loopback:

* floor: a command written to a long-lived ``sh`` channel, followed by a ``printf`` of its exit
  status after a marker, read back until the marker (no process started for a builtin);
* fraisier: ``SSHTransport.run``, which starts each command in its own process group under
  ``sh -c`` with stdin closed, separate stdout and stderr, and an exact exit status.

Usage (as root, because the test host creates a user): ``python bench/step_overhead.py
[--steps 300] [--rounds 5]``. It prints the median milliseconds per step of each and the ratio.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support import SshHost  # noqa: E402

from fraisier.inventory import Host, Settings  # noqa: E402
from fraisier.transport.ssh import SSHTransport  # noqa: E402


def floor_steps(host: SshHost, steps: int) -> float:
    """Return the seconds that ``steps`` commands take on a raw long-lived shell channel."""
    client = host.paramiko_client()
    try:
        channel = client.get_transport().open_session()
        channel.exec_command("exec /bin/sh")
        started = time.perf_counter()
        for _ in range(steps):
            token = secrets.token_hex(8)
            channel.sendall(f"echo step; printf '{token}:%d\\n' $?\n".encode())
            buffer = b""
            while token.encode() not in buffer or not buffer.endswith(b"\n"):
                buffer += channel.recv(65536)
        elapsed = time.perf_counter() - started
        channel.close()
        return elapsed
    finally:
        client.close()


def fraisier_steps(host: SshHost, steps: int) -> float:
    """Return the seconds that ``steps`` commands take through Fraisier's SSH transport."""
    inventory_host = Host(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.user,
        identity_file=host.identity_file,
    )
    transport = SSHTransport(inventory_host, Settings(known_hosts=host.known_hosts))
    transport.connect()
    try:
        transport.run("true", timeout=30)
        started = time.perf_counter()
        for _ in range(steps):
            result = transport.run("echo step", timeout=30)
            if result.exit_status != 0 or result.stdout != "step\n":
                raise SystemExit(f"unexpected result: {result}")
        return time.perf_counter() - started
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each, alternating")
    args = parser.parse_args()

    host = SshHost()
    host.start()
    try:
        floor, fraisier = [], []
        for _ in range(args.rounds):
            floor.append(floor_steps(host, args.steps) / args.steps * 1000)
            fraisier.append(fraisier_steps(host, args.steps) / args.steps * 1000)
    finally:
        host.close()

    floor_median = statistics.median(floor)
    fraisier_median = statistics.median(fraisier)
    print(f"steps per round: {args.steps}, rounds: {args.rounds}")
    print(
        f"floor     ms per step: median {floor_median:.3f} (min {min(floor):.3f}, max {max(floor):.3f})"
    )
    print(
        f"fraisier  ms per step: median {fraisier_median:.3f} "
        f"(min {min(fraisier):.3f}, max {max(fraisier):.3f})"
    )
    print(f"fraisier / floor: {fraisier_median / floor_median:.2f}x")


if __name__ == "__main__":
    main()

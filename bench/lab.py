"""The benchmark's test hosts, workspace and release source tree.

The hosts are the test suite's real OpenSSH servers (``tests/support/sshd.py``), one sshd per
loopback address 127.0.0.N, each with its own deploy user, key and deploy root. Every tool
gets its own folder under each deploy root, so no tool sees another tool's files.
"""

from __future__ import annotations

import dataclasses
import logging
import pwd
import random
import shutil
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.sshd import SshHost  # noqa: E402

log = logging.getLogger("fraisier.bench.lab")

SOURCE_FILES = 200
SOURCE_BYTES = 5 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """Connection facts of one test host, as every tool's inventory needs them."""

    name: str
    address: str
    port: int
    user: str
    identity_file: str
    deploy_root: str


class Lab:
    """Start test hosts on demand and keep them until ``close()``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._hosts: list[SshHost] = []
        self.known_hosts = workdir / "known_hosts"

    def hosts(self, count: int) -> list[HostInfo]:
        """Return the first ``count`` hosts, starting the missing ones."""
        while len(self._hosts) < count:
            host = SshHost(base_dir=str(self.workdir))
            self._hosts.append(host)
            host.start()
            log.info("started test host %s on %s:%s", host.name, host.address, host.port)
        self.known_hosts.write_text("".join(f"{h.known_hosts_line}\n" for h in self._hosts))
        return [
            HostInfo(
                name=h.name,
                address=h.address,
                port=h.port,
                user=h.user,
                identity_file=h.identity_file,
                deploy_root=h.deploy_root,
            )
            for h in self._hosts[:count]
        ]

    def close(self) -> None:
        """Stop every host and remove its keys, deploy root and the Fabric work folder."""
        for host in self._hosts:
            try:
                shutil.rmtree(Path(pwd.getpwnam(host.user).pw_dir) / "bench-fabric", True)
                host.close()
            except Exception:
                log.exception("closing test host %r failed", host)
        self._hosts.clear()


def make_source_tree(target: Path, seed: int = 7) -> Path:
    """Write ``SOURCE_FILES`` files of ``SOURCE_BYTES`` in total, half text and half random.

    The text half compresses well, like source code; the random half does not, like images
    or wheels. The same seed gives the same tree.
    """
    rng = random.Random(seed)
    target.mkdir(parents=True, exist_ok=True)
    size = SOURCE_BYTES // SOURCE_FILES
    words = [f"token{n}" for n in range(500)]
    for index in range(SOURCE_FILES):
        folder = target / f"pkg{index % 10}"
        folder.mkdir(exist_ok=True)
        if index % 2 == 0:
            text = " ".join(rng.choice(words) for _ in range(size // 6))
            data = (text.encode() + b"\n" * size)[:size]
            (folder / f"module{index}.py").write_bytes(data)
        else:
            (folder / f"blob{index}.bin").write_bytes(rng.randbytes(size))
    return target

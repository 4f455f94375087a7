"""Host key checking against known_hosts: strict by default, ``accept-new`` on request."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from pathlib import Path

import paramiko

from fraisier.errors import HostKeyError

log = logging.getLogger("fraisier.hostkeys")

_write_lock = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH-style fingerprint, for example ``ssh-ed25519 SHA256:abc...``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def default_known_hosts() -> Path:
    return Path("~/.ssh/known_hosts").expanduser()


class RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Reject a host whose key is not in known_hosts, showing the received fingerprint."""

    def __init__(self, known_hosts: Path, host_name: str) -> None:
        self.known_hosts = known_hosts
        self.host_name = host_name

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        received = fingerprint(key)
        raise HostKeyError(
            f"host key of {self.host_name} ({hostname}) is not in {self.known_hosts}: received "
            f"{received}; verify it with the host's owner, then add it (ssh-keyscan) or set "
            "'host_key_checking: accept-new' to trust new hosts on first contact",
            received=received,
            code="host_key_unknown",
            context={"host": self.host_name},
        )


class AcceptNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust a host seen for the first time and append its key to known_hosts.

    A changed key is still rejected: Paramiko raises BadHostKeyException before any policy runs.
    """

    def __init__(self, known_hosts: Path, host_name: str) -> None:
        self.known_hosts = known_hosts
        self.host_name = host_name

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        with _write_lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with self.known_hosts.open("a", encoding="utf-8") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning(
            "accepted new host key of %s (%s): %s, added to %s",
            self.host_name,
            hostname,
            fingerprint(key),
            self.known_hosts,
        )

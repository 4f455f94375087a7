"""The floor of the benchmark: the least work that runs the same commands on every host.

One Paramiko connection per host, one ``sh`` channel per host that stays open, one thread per
host. Each command is sent to the shell followed by a ``printf`` of its exit status after a
marker, and the client reads until the marker. No records, no locks, no retries, no separate
stderr: any deploy tool does at least this much work.

Usage: ``python bench/floor.py CONFIG.json``, where the config is written by ``bench/run.py``.
Exits 0 when every command on every host exited 0 and printed what it should.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

import paramiko


def connect(host: dict[str, Any], known_hosts: str) -> paramiko.SSHClient:
    """Connect to one host, rejecting any host key that ``known_hosts`` does not list."""
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host["address"],
        port=host["port"],
        username=host["user"],
        key_filename=host["identity_file"],
        look_for_keys=False,
        allow_agent=False,
        timeout=30,
    )
    return client


class Shell:
    """One long-lived ``sh`` on an exec channel, which runs the commands and prints their status."""

    def __init__(self, client: paramiko.SSHClient) -> None:
        transport = client.get_transport()
        assert transport is not None
        self.channel = transport.open_session()
        self.channel.exec_command("exec /bin/sh")
        self.buffer = b""

    def run(self, command: str) -> tuple[int, str]:
        """Run ``command`` and return its exit status and output."""
        marker = secrets.token_hex(8).encode()
        self.channel.sendall(f"{command}\nprintf '%s:%d\\n' {marker.decode()} $?\n".encode())
        while True:
            at = self.buffer.find(marker + b":")
            if at >= 0:
                end = self.buffer.find(b"\n", at)
                if end >= 0:
                    output = self.buffer[:at].decode()
                    status = int(self.buffer[at + len(marker) + 1 : end])
                    self.buffer = self.buffer[end + 1 :]
                    return status, output
            data = self.channel.recv(65536)
            if not data:
                raise ConnectionError("the shell channel closed before the exit status arrived")
            self.buffer += data


def run_steps(host: dict[str, Any], config: dict[str, Any]) -> int:
    """Run the ``steps`` echo commands on one host and return how many succeeded."""
    client = connect(host, config["known_hosts"])
    try:
        shell = Shell(client)
        done = 0
        for number in range(1, config["steps"] + 1):
            status, output = shell.run(f"echo step{number}")
            if status == 0 and output == f"step{number}\n":
                done += 1
        return done
    finally:
        client.close()


def run_release(host: dict[str, Any], config: dict[str, Any], archive: str) -> int:
    """Upload the archive over SFTP, unpack it as a release and switch ``current``."""
    client = connect(host, config["known_hosts"])
    try:
        shell = Shell(client)
        root = f"{host['deploy_root']}/floor"
        release = f"releases/{config['release_id']}"
        upload = f"{root}/upload-{config['release_id']}.tar.gz"
        status, _ = shell.run(f"mkdir -p {root}/{release} && cd {root}")
        if status != 0:
            return 0
        sftp = client.open_sftp()
        try:
            sftp.put(archive, upload)
        finally:
            sftp.close()
        commands = [
            f"tar -xzf {upload} -C {release} && rm -f {upload}",
            f"ln -sfn {release} current.tmp && mv -T current.tmp current",
        ]
        return sum(1 for command in commands if shell.run(command)[0] == 0)
    finally:
        client.close()


def pack(source: str) -> str:
    """Pack ``source`` into a temporary tar.gz at gzip level 6, as Fraisier and GNU tar do."""
    handle, path = tempfile.mkstemp(prefix="floor-", suffix=".tar.gz")
    os.close(handle)
    with tarfile.open(path, "w:gz", compresslevel=6) as archive:
        archive.add(source, arcname=".")
    return path


def main() -> int:
    """Run the configured work on every host in parallel and report the commands that passed."""
    config = json.loads(Path(sys.argv[1]).read_text())
    hosts = config["hosts"]
    archive = pack(config["source"]) if config["mode"] == "release" else ""
    results: dict[str, int | str] = {}

    def work(host: dict[str, Any]) -> None:
        try:
            if config["mode"] == "release":
                results[host["name"]] = run_release(host, config, archive)
            else:
                results[host["name"]] = run_steps(host, config)
        except Exception as exc:
            results[host["name"]] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=work, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if archive:
        os.unlink(archive)

    expected = config["steps"] if config["mode"] == "steps" else 2
    passed = sum(1 for value in results.values() if value == expected)
    print(json.dumps({"hosts": len(hosts), "passed": passed, "results": results}))
    return 0 if passed == len(hosts) else 1


if __name__ == "__main__":
    sys.exit(main())

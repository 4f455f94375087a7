"""The Fabric peer of the benchmark: a ``ThreadingGroup`` of all hosts, one ``run`` per step.

Runs in the Fabric virtual environment that ``bench/run.py`` makes. Each ``group.run`` opens
a fresh exec channel per host and waits for every host before the next step, which is how
Fabric's groups work. Host keys are checked against the benchmark's known_hosts file.

Usage: ``python bench/fabric_group.py CONFIG.json``. Exits 0 when every command passed.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection, ThreadingGroup
from fabric.exceptions import GroupException


def connection(host: dict[str, Any], known_hosts: str) -> Connection:
    """Build a Connection whose client rejects host keys missing from ``known_hosts``."""
    conn = Connection(
        host["address"],
        user=host["user"],
        port=host["port"],
        connect_kwargs={
            "key_filename": host["identity_file"],
            "look_for_keys": False,
            "allow_agent": False,
        },
        connect_timeout=30,
    )
    conn.client.load_host_keys(known_hosts)
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return conn


def main() -> int:
    """Run the configured work on the group and report the commands that passed."""
    config = json.loads(Path(sys.argv[1]).read_text())
    hosts = config["hosts"]
    conns = [connection(host, config["known_hosts"]) for host in hosts]
    group = ThreadingGroup.from_connections(conns)

    # A ThreadingGroup sends the same command to every host, so the work folder is relative to
    # each deploy user's home directory, where the shell and SFTP start.
    root = "bench-fabric"
    passed = 0

    try:
        if config["mode"] == "steps":
            for number in range(1, config["steps"] + 1):
                results = group.run(f"echo step{number}", hide=True)
                passed += sum(1 for r in results.values() if r.stdout == f"step{number}\n")
            expected = len(hosts) * config["steps"]
        else:
            handle, archive = tempfile.mkstemp(prefix="fabric-", suffix=".tar.gz")
            os.close(handle)
            with tarfile.open(archive, "w:gz", compresslevel=6) as packed:
                packed.add(config["source"], arcname=".")
            release = f"releases/{config['release_id']}"
            upload = f"upload-{config['release_id']}.tar.gz"
            group.run(f"mkdir -p {root}/{release}", hide=True)
            group.put(archive, f"{root}/{upload}")
            os.unlink(archive)
            results = group.run(
                f"cd {root} && tar -xzf {upload} -C {release} && rm -f {upload} && "
                f"ln -sfn {release} current.tmp && mv -T current.tmp current",
                hide=True,
            )
            passed = sum(1 for r in results.values() if r.ok)
            expected = len(hosts)
    except GroupException as exc:
        failures = {c.host: repr(r) for c, r in exc.result.items() if not hasattr(r, "ok")}
        print(json.dumps({"error": failures}))
        return 1
    finally:
        group.close()
    print(json.dumps({"hosts": len(hosts), "passed": passed, "expected": expected}))
    return 0 if passed == expected else 1


if __name__ == "__main__":
    sys.exit(main())

"""The pyinfra peer of the benchmark: ``server.shell`` operations, and ``files.put`` for a release.

pyinfra runs this file once per host to collect its operations, then executes them. The work
comes from the JSON file named by ``BENCH_CONFIG``, which ``bench/run.py`` writes.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from pyinfra import host
from pyinfra.operations import files, server

config = json.loads(Path(os.environ["BENCH_CONFIG"]).read_text())

if config["mode"] == "steps":
    for number in range(1, config["steps"] + 1):
        server.shell(name=f"step{number}", commands=[f"echo step{number}"])
else:
    # The archive is packed once per run: the first host's pass writes it, later passes reuse it.
    archive = config["archive"]
    if not os.path.exists(archive):
        with tarfile.open(archive + ".part", "w:gz", compresslevel=6) as packed:
            packed.add(config["source"], arcname=".")
        os.rename(archive + ".part", archive)
    root = f"{host.data.deploy_root}/pyinfra"
    release = f"releases/{config['release_id']}"
    upload = f"{root}/upload-{config['release_id']}.tar.gz"
    server.shell(name="make release folder", commands=[f"mkdir -p {root}/{release}"])
    files.put(name="upload archive", src=archive, dest=upload)
    server.shell(
        name="unpack and switch",
        commands=[
            f"cd {root} && tar -xzf {upload} -C {release} && rm -f {upload}",
            f"cd {root} && ln -sfn {release} current.tmp && mv -T current.tmp current",
        ],
    )

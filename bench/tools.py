"""The tools under test: how each one is installed, configured, started and checked.

Every tool runs as a separate process started by ``bench/run.py``, so its wall time includes
its interpreter start and imports, as an operator would see it. ``prepare()`` writes the
tool's inventory and work files for one run and returns the command to start and a check of
its output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml
from lab import BENCH_DIR, REPO_ROOT, HostInfo

log = logging.getLogger("fraisier.bench.tools")

VENV_DIR = BENCH_DIR / ".venvs"
RECIPES_DIR = BENCH_DIR / "recipes"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One piece of work: ``steps`` echo commands, or a release upload, on ``hosts`` hosts."""

    mode: str  # "steps" or "release"
    hosts: int
    steps: int = 0

    @property
    def name(self) -> str:
        """Short label such as ``steps10-n50`` or ``release-n10``."""
        work = f"steps{self.steps}" if self.mode == "steps" else "release"
        return f"{work}-n{self.hosts}"


@dataclasses.dataclass
class RunSpec:
    """A prepared run: the command, its environment and folder, and how to check its output."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    # Returns None when the output shows that every host did the work, else the reason.
    check: Callable[[int, str, str], str | None]
    cleanup: Callable[[], None] = lambda: None


@dataclasses.dataclass
class Context:
    """What ``prepare()`` needs besides the scenario: hosts, known_hosts, folders."""

    hosts: list[HostInfo]
    known_hosts: Path
    workdir: Path
    source: Path
    release_id: str
    run_label: str


def host_dicts(hosts: list[HostInfo]) -> list[dict[str, object]]:
    return [dataclasses.asdict(h) for h in hosts]


def check_exit(code: int, stdout: str, stderr: str) -> str | None:
    return None if code == 0 else f"exit status {code}: {stderr.strip()[-300:]}"


class Tool:
    """Base of the tools: a name, an optional virtual environment, and ``prepare()``."""

    name = ""
    packages: tuple[str, ...] = ()

    @property
    def venv(self) -> Path:
        return VENV_DIR / self.name

    def install(self) -> None:
        """Create the tool's virtual environment and install its packages, unless present."""
        if not self.packages:
            return
        marker = self.venv / ".installed"
        if marker.exists():
            return
        log.info("installing %s into %s", " ".join(self.packages), self.venv)
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        subprocess.run(
            [str(self.venv / "bin" / "pip"), "install", "-q", *self.packages], check=True
        )
        marker.write_text("\n".join(self.packages) + "\n")

    def version(self) -> str:
        """Return the installed versions of the tool's packages, for the report."""
        if not self.packages:
            return ""
        result = subprocess.run(
            [str(self.venv / "bin" / "pip"), "list", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        wanted = {p.lower() for p in (*self.packages, "paramiko")}
        found = {p["name"].lower(): p["version"] for p in json.loads(result.stdout)}
        return ", ".join(f"{name} {found[name]}" for name in sorted(wanted) if name in found)

    def prepare(self, scenario: Scenario, ctx: Context) -> RunSpec:
        raise NotImplementedError


# --- Fraisier --------------------------------------------------------------------------------


class Fraisier(Tool):
    """``python -m fraisier deploy`` with a SQLite run database in the workspace."""

    name = "fraisier"
    runner: list[str] = [sys.executable, "-m", "fraisier"]

    def inventory(self, scenario: Scenario, ctx: Context) -> Path:
        project = ctx.workdir / self.name
        fraise: dict[str, object] = {
            "type": "api",
            "recipe": "release" if scenario.mode == "release" else f"steps{scenario.steps}",
            "hosts": ["bench"],
            "deploy_to": "{{ deploy_root }}/fraisier",
        }
        if scenario.mode == "release":
            fraise["source"] = {"path": str(ctx.source)}
        inventory = {
            "environment": "bench",
            "settings": {
                "known_hosts": str(ctx.known_hosts),
                "host_key_checking": "strict",
                "database": f"sqlite:///{project / 'var' / 'runs.db'}",
                "recipes_dir": str(RECIPES_DIR),
                "forks": max(50, scenario.hosts),
            },
            "hosts": {
                h.name: {
                    "address": h.address,
                    "port": h.port,
                    "user": h.user,
                    "identity_file": h.identity_file,
                    "vars": {"deploy_root": h.deploy_root},
                }
                for h in ctx.hosts
            },
            "groups": {"bench": {"hosts": [h.name for h in ctx.hosts]}},
            "fraises": {"bench": fraise},
        }
        path = project / "inventories" / f"{scenario.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    def prepare(self, scenario: Scenario, ctx: Context) -> RunSpec:
        path = self.inventory(scenario, ctx)
        argv = [*self.runner, "deploy", "--env", "bench", "--inventory", str(path), "--json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        expected = len(ctx.hosts)

        def check(code: int, stdout: str, stderr: str) -> str | None:
            if code != 0:
                return f"exit status {code}: {stderr.strip()[-300:]}"
            runs = json.loads(stdout)
            statuses = [h["status"] for run in runs for h in run["hosts"]]
            good = statuses.count("success")
            return None if good == expected else f"{good} of {expected} hosts succeeded"

        return RunSpec(argv=argv, cwd=ctx.workdir, env=env, check=check)


class FraisierNoRecord(Fraisier):
    """Fraisier with records kept in memory, to measure what the SQLite run database costs."""

    name = "fraisier-norecord"
    runner = [sys.executable, str(BENCH_DIR / "fraisier_norecord.py")]


# --- Ansible ---------------------------------------------------------------------------------


class Ansible(Tool):
    """``ansible-playbook`` with pipelining, ControlPersist, forks >= hosts, no fact gathering."""

    name = "ansible"
    packages = ("ansible-core",)

    def playbook(self, scenario: Scenario, folder: Path) -> Path:
        if scenario.mode == "steps":
            tasks: list[dict[str, object]] = [
                {"name": f"step{n}", "ansible.builtin.command": f"echo step{n}"}
                for n in range(1, scenario.steps + 1)
            ]
        else:
            root = "{{ deploy_root }}/ansible"
            release = "releases/{{ release_id }}"
            tasks = [
                {
                    "name": "pack the release",
                    "ansible.builtin.command": "tar -czf {{ archive }} -C {{ source }} .",
                    "delegate_to": "localhost",
                    "run_once": True,
                },
                {
                    "name": "make the release folder",
                    "ansible.builtin.file": {"path": f"{root}/{release}", "state": "directory"},
                },
                {
                    "name": "upload and unpack",
                    "ansible.builtin.unarchive": {
                        "src": "{{ archive }}",
                        "dest": f"{root}/{release}",
                    },
                },
                {
                    "name": "switch current",
                    "ansible.builtin.shell": f"ln -sfn {release} current.tmp && mv -T current.tmp current",
                    "args": {"chdir": root},
                },
            ]
        play = [{"name": "bench", "hosts": "all", "gather_facts": False, "tasks": tasks}]
        path = folder / f"{scenario.name}.yml"
        path.write_text(yaml.safe_dump(play, sort_keys=False))
        return path

    def prepare(self, scenario: Scenario, ctx: Context) -> RunSpec:
        folder = ctx.workdir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        ssh_args = (
            "-o ControlMaster=auto -o ControlPersist=60s -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={ctx.known_hosts} -o GlobalKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=yes"
        )
        config = folder / "ansible.cfg"
        config.write_text(
            "[defaults]\n"
            "host_key_checking = True\n"
            "gathering = explicit\n"
            "interpreter_python = /usr/bin/python3\n"
            "retry_files_enabled = False\n"
            "deprecation_warnings = False\n"
            "[ssh_connection]\n"
            "pipelining = True\n"
            f"ssh_args = {ssh_args}\n"
        )
        lines = ["[all]"]
        for h in ctx.hosts:
            lines.append(
                f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user} "
                f"ansible_ssh_private_key_file={h.identity_file} deploy_root={h.deploy_root}"
            )
        inventory = folder / f"hosts-{scenario.hosts}.ini"
        inventory.write_text("\n".join(lines) + "\n")
        playbook = self.playbook(scenario, folder)
        extra = folder / "extra.json"
        extra.write_text(
            json.dumps(
                {
                    "release_id": ctx.release_id,
                    "source": str(ctx.source),
                    "archive": str(folder / f"release-{ctx.release_id}.tar.gz"),
                }
            )
        )
        # Each run gets its own ControlPersist sockets, so no run reuses another's connections.
        control_dir = Path(tempfile.mkdtemp(prefix="bench-cp-", dir="/tmp"))
        env = dict(os.environ)
        env.update(
            ANSIBLE_CONFIG=str(config),
            ANSIBLE_HOME=str(folder / "home"),
            ANSIBLE_FORKS=str(max(5, scenario.hosts)),
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(control_dir),
            ANSIBLE_NOCOLOR="1",
        )
        argv = [
            str(self.venv / "bin" / "ansible-playbook"),
            "-i",
            str(inventory),
            str(playbook),
            "-e",
            f"@{extra}",
        ]
        expected = len(ctx.hosts)

        def check(code: int, stdout: str, stderr: str) -> str | None:
            if code != 0:
                return f"exit status {code}: {(stdout + stderr).strip()[-300:]}"
            recap = re.findall(
                r"^(\S+)\s+:\s+ok=(\d+).*?unreachable=(\d+)\s+failed=(\d+)", stdout, re.M
            )
            good = [r for r in recap if r[0] != "localhost" and r[2] == "0" and r[3] == "0"]
            return (
                None if len(good) == expected else f"{len(good)} of {expected} hosts in the recap"
            )

        def cleanup() -> None:
            close_control_masters(control_dir)
            (folder / f"release-{ctx.release_id}.tar.gz").unlink(missing_ok=True)

        return RunSpec(argv=argv, cwd=folder, env=env, check=check, cleanup=cleanup)


def close_control_masters(control_dir: Path) -> None:
    """Ask every ssh ControlPersist master with a socket in ``control_dir`` to exit."""
    for socket_path in control_dir.iterdir():
        subprocess.run(
            ["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "bench-host"],
            capture_output=True,
            check=False,
            timeout=10,
        )
    shutil.rmtree(control_dir, ignore_errors=True)


# --- pyinfra ---------------------------------------------------------------------------------


class Pyinfra(Tool):
    """``pyinfra INVENTORY bench/pyinfra_deploy.py -y --parallel N``."""

    name = "pyinfra"
    packages = ("pyinfra",)

    def prepare(self, scenario: Scenario, ctx: Context) -> RunSpec:
        folder = ctx.workdir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for h in ctx.hosts:
            data = {
                "ssh_hostname": h.address,
                "ssh_port": h.port,
                "ssh_user": h.user,
                "ssh_key": h.identity_file,
                "ssh_known_hosts_file": str(ctx.known_hosts),
                "ssh_strict_host_key_checking": "yes",
                "ssh_allow_agent": False,
                "ssh_look_for_keys": False,
                "deploy_root": h.deploy_root,
            }
            entries.append(f"    ({h.name!r}, {data!r}),")
        inventory = folder / f"inventory_{scenario.hosts}.py"
        inventory.write_text("hosts = [\n" + "\n".join(entries) + "\n]\n")
        config = folder / "config.json"
        config.write_text(
            json.dumps(
                {
                    "mode": scenario.mode,
                    "steps": scenario.steps,
                    "release_id": ctx.release_id,
                    "source": str(ctx.source),
                    "archive": str(folder / f"release-{ctx.release_id}.tar.gz"),
                }
            )
        )
        env = dict(os.environ, BENCH_CONFIG=str(config))
        argv = [
            str(self.venv / "bin" / "pyinfra"),
            str(inventory),
            str(BENCH_DIR / "pyinfra_deploy.py"),
            "-y",
            "--parallel",
            str(max(1, scenario.hosts)),
        ]

        def cleanup() -> None:
            (folder / f"release-{ctx.release_id}.tar.gz").unlink(missing_ok=True)

        return RunSpec(argv=argv, cwd=folder, env=env, check=check_exit, cleanup=cleanup)


# --- Fabric and the floor ------------------------------------------------------------------


class Fabric(Tool):
    """``bench/fabric_group.py``: a Fabric ThreadingGroup, one ``run`` per step."""

    name = "fabric"
    packages = ("fabric",)
    script = BENCH_DIR / "fabric_group.py"

    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def prepare(self, scenario: Scenario, ctx: Context) -> RunSpec:
        folder = ctx.workdir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / f"{scenario.name}.json"
        config.write_text(
            json.dumps(
                {
                    "mode": scenario.mode,
                    "steps": scenario.steps,
                    "hosts": host_dicts(ctx.hosts),
                    "known_hosts": str(ctx.known_hosts),
                    "release_id": ctx.release_id,
                    "source": str(ctx.source),
                }
            )
        )
        return RunSpec(
            argv=[self.python(), str(self.script), str(config)],
            cwd=folder,
            env=dict(os.environ),
            check=check_exit,
        )


class Floor(Fabric):
    """``bench/floor.py``: one Paramiko connection and one open shell channel per host."""

    name = "floor"
    packages = ()
    script = BENCH_DIR / "floor.py"

    def python(self) -> str:
        return sys.executable


TOOLS: dict[str, type[Tool]] = {
    tool.name: tool for tool in (Fraisier, Ansible, Pyinfra, Fabric, Floor, FraisierNoRecord)
}

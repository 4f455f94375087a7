"""Run the commands and check the configuration shown in the README and the guides.

A Markdown file's fenced blocks are read with their section (the nearest ``##`` heading above)
and the ``doc-test`` HTML comments written just above them:

- ``<!-- doc-test: skip: REASON -->`` keeps an ``sh`` block from being run, for a command that
  cannot run on the test machine (it runs the test suite itself, or needs a real cloud host);
- ``<!-- doc-test: exit N -->`` expects the ``sh`` block to exit with status N, not 0;
- ``<!-- doc-test: excerpt PATH -->`` marks a ``yaml`` block as a copy of lines of the file
  PATH of the repository, whose example deploys are tested;
- ``<!-- doc-test: before ... -->`` holds hidden shell lines run just before the next block,
  to set the scene (a broken health check, a stale lock) that the shown command needs.

Every ``sh`` block of a section runs, in order, in one ``Sandbox``: a copy of the checkout
whose inventories point at the real sshd test hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from support import REPO_ROOT, SshHost, free_port

BLOCK_TIMEOUT = 240.0
DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(?P<body>.*?)\s*-->", re.DOTALL)
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)\s*$")

# Markdown files whose blocks the tests read, relative to the repository root: the README and
# every page under docs/.
DOC_FILES = (
    "README.md",
    "docs/OPERATOR_GUIDE.md",
    "docs/DEPLOYMENT_PATTERNS.md",
    "docs/configuration.md",
    *sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "docs").glob("*.md")
        if p.name not in ("OPERATOR_GUIDE.md", "DEPLOYMENT_PATTERNS.md", "configuration.md")
    ),
)


@dataclasses.dataclass
class Block:
    """One fenced block of a Markdown file, with the doc-test directives above it."""

    path: Path
    line: int
    section: str
    lang: str
    text: str
    skip: str | None = None
    exit_code: int = 0
    excerpt: str | None = None
    before: list[str] = dataclasses.field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Return the fenced blocks of the Markdown file at ``path`` in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    section = "top"
    pending: list[str] = []  # directive bodies seen since the last block or paragraph
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
            pending = []
        if "<!--" in line and "doc-test:" in line:
            # A directive may span lines; read up to its closing "-->".
            end = index
            while "-->" not in lines[end]:
                end += 1
            comment = "\n".join(lines[index : end + 1])
            pending += [m.group("body") for m in DIRECTIVE.finditer(comment)]
            index = end + 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent = len(fence.group("indent"))
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index][indent:])
                index += 1
            block = Block(path, index - len(body), section, fence.group("lang"), "\n".join(body))
            _apply_directives(block, pending)
            blocks.append(block)
            pending = []
        index += 1
    return blocks


def _apply_directives(block: Block, directives: list[str]) -> None:
    for directive in directives:
        word, _, rest = directive.partition(" ")
        word = word.rstrip(":")
        if word == "skip":
            reason = rest.strip().lstrip(":").strip()
            if not reason:
                raise ValueError(f"{block.where}: 'doc-test: skip' needs a reason")
            block.skip = reason
        elif word == "exit":
            block.exit_code = int(rest)
        elif word == "excerpt":
            block.excerpt = rest.strip()
        elif word == "before":
            block.before.append(rest)
        else:
            raise ValueError(f"{block.where}: unknown doc-test directive {directive!r}")


# --- inventories bound to the test hosts ---------------------------------------------------


class _Tagged:
    """A ``!secret`` or ``!env`` value kept as written when an inventory is rewritten."""

    def __init__(self, tag: str, value: str) -> None:
        self.tag = tag
        self.value = value


class _TagLoader(yaml.SafeLoader):
    pass


class TagDumper(yaml.SafeDumper):
    pass


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    return _Tagged("!" + suffix, str(loader.construct_scalar(node)))  # type: ignore[arg-type]


def _represent_tagged(dumper: yaml.SafeDumper, value: _Tagged) -> yaml.Node:
    return dumper.represent_scalar(value.tag, value.value)


_TagLoader.add_multi_constructor("!", _construct_tagged)
TagDumper.add_representer(_Tagged, _represent_tagged)


def bind_inventory(
    path: Path,
    hosts: Sequence[SshHost],
    known_hosts: Path,
    database: str,
    pushgateway: str | None,
) -> list[str]:
    """Point the SSH hosts of the inventory at ``path`` to the test hosts, in file order.

    Only what the test machine forces changes. Each host gets the address, port, user and key
    of its test host, and the host variables ``deploy_root`` (the test hosts share one file
    system) and ``bind`` (each service listens on its host's own loopback address). The
    settings get the known_hosts file, a SQLite database in place of any other, and the test
    Pushgateway. Returns the names of the bound hosts.
    """
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagLoader)
    ssh_names = [
        name
        for name, entry in (data.get("hosts") or {}).items()
        if (entry or {}).get("connection", "ssh") == "ssh"
    ]
    if not ssh_names:
        return []
    if len(ssh_names) > len(hosts):
        raise ValueError(
            f"{path} has {len(ssh_names)} SSH hosts but the sandbox has {len(hosts)} test hosts"
        )
    for fraise_name, fraise in (data.get("fraises") or {}).items():
        # The test hosts share this machine's file system, so each host's releases must go
        # under its own deploy root, never to a fixed path such as /srv.
        if "{{ deploy_root }}" not in str((fraise or {}).get("deploy_to", "")):
            raise ValueError(
                f"{path}: fraises.{fraise_name}.deploy_to must start with '{{{{ deploy_root }}}}' "
                "so the tests can give each test host its own folder"
            )
    for name, host in zip(ssh_names, hosts, strict=False):
        entry = data["hosts"][name] or {}
        entry.update(
            address=host.address,
            port=host.port,
            user=host.user,
            identity_file=host.identity_file,
        )
        entry.setdefault("vars", {})
        entry["vars"].update(deploy_root=host.deploy_root, bind=host.address)
        data["hosts"][name] = entry
    settings = data.setdefault("settings", {}) or {}
    settings["known_hosts"] = str(known_hosts)
    settings["host_key_checking"] = "strict"
    if not str(settings.get("database", "sqlite")).startswith("sqlite"):
        settings["database"] = database
    if "pushgateway" in settings:
        if pushgateway is None:
            del settings["pushgateway"]
        else:
            settings["pushgateway"] = pushgateway
    data["settings"] = settings
    path.write_text(yaml.dump(data, Dumper=TagDumper, sort_keys=False), encoding="utf-8")
    return ssh_names


def _free_local_ports(path: Path) -> None:
    """Give the services of ``connection: local`` hosts free ports on this machine."""
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagLoader)
    hosts = data.get("hosts") or {}
    if not any((entry or {}).get("connection") == "local" for entry in hosts.values()):
        return
    for fraise in (data.get("fraises") or {}).values():
        if "port" in (fraise.get("vars") or {}):
            fraise["vars"]["port"] = free_port()
    path.write_text(yaml.dump(data, Dumper=TagDumper, sort_keys=False), encoding="utf-8")


# --- the sandbox ---------------------------------------------------------------------------


def _checkout_files() -> list[str]:
    """Return the checkout's files: tracked ones and new ones that git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


@dataclasses.dataclass
class BlockResult:
    block: Block
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"{self.block.where} exited {self.returncode} (expected {self.block.exit_code})\n"
            f"--- block ---\n{self.block.text}\n"
            f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
        )


class Sandbox:
    """A copy of the checkout in which the shown commands run against the test hosts.

    Every inventory under ``inventories/`` and ``examples/*/inventories/`` is bound to the
    test hosts with ``bind_inventory``; the project's own SQLite files go to the copy's
    ``var/``. ``HOME`` is a fresh folder, so no ``~/.ssh/config`` of this machine applies.
    """

    def __init__(
        self, root: Path, hosts: Sequence[SshHost], pushgateway: str | None = None
    ) -> None:
        self.root = root / "checkout"
        self.home = root / "home"
        self.hosts = list(hosts)
        self.home.mkdir(parents=True)
        for name in _checkout_files():
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("".join(f"{h.known_hosts_line}\n" for h in self.hosts))
        database = f"sqlite:///{root / 'team.db'}"
        inventories = [
            *self.root.glob("inventories/*.yaml"),
            *self.root.glob("examples/*/inventories/*.yaml"),
        ]
        for inventory in inventories:
            bind_inventory(inventory, self.hosts, self.known_hosts, database, pushgateway)
            _free_local_ports(inventory)
        self._venv: Path | None = None

    def environment(self, needs_venv: bool) -> dict[str, str]:
        """Return the environment of a shown command: this sandbox's code, no FRAISIER_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_")}
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(name, None)
        env["HOME"] = str(self.home)
        env["PYTHONPATH"] = str(self.root)
        path = [str(Path(sys.executable).parent), env.get("PATH", "")]
        if needs_venv:
            path.insert(0, str(self._make_venv() / "bin"))
        env["PATH"] = os.pathsep.join(path)
        return env

    def _make_venv(self) -> Path:
        """Create, once, a virtual environment that also uses this machine's installed packages.

        A command that runs ``pip install -e .`` installs the sandbox there, not over the
        checkout's own installation.
        """
        if self._venv is None:
            self._venv = self.root.parent / "venv"
            venv.EnvBuilder(system_site_packages=True, with_pip=True).create(self._venv)
        return self._venv

    def run(self, block: Block) -> BlockResult:
        """Run the block's hidden lines, then the block, with bash in the sandbox root."""
        needs_venv = "pip install" in block.text
        for setup in block.before:
            # Hidden lines also stop at an unset variable, so a typo cannot set a wrong scene.
            prepared = self.shell("set -u\n" + setup, venv=needs_venv)
            if prepared.returncode != 0:
                raise AssertionError(
                    f"{block.where}: hidden setup failed ({prepared.returncode}):\n{setup}\n"
                    f"{prepared.stdout}\n{prepared.stderr}"
                )
        completed = self.shell(block.text, venv=needs_venv)
        return BlockResult(block, completed.returncode, completed.stdout, completed.stderr)

    def shell(
        self,
        command: str,
        cwd: str = ".",
        env: dict[str, str] | None = None,
        venv: bool | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with bash in the folder ``cwd`` of the sandbox; output is captured.

        ``env`` adds or replaces environment variables. ``venv`` puts the sandbox's virtual
        environment first on PATH; by default only a command that runs ``pip install`` gets
        it. The exit status is not checked.
        """
        needs_venv = "pip install" in command if venv is None else venv
        return subprocess.run(
            ["bash", "-eo", "pipefail", "-c", command],
            cwd=self.root / cwd,
            env={**self.environment(needs_venv), **(env or {})},
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )

    def stop_local_services(self) -> None:
        """Stop processes started from the sandbox on this machine, such as a local service."""
        marker = str(self.root)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in cmdline:
                    os.kill(int(proc.name), signal.SIGTERM)


def load_doc_yaml(text: str) -> Any:
    """Parse a YAML block of a guide, keeping ``!secret`` and ``!env`` values as written."""
    return yaml.load(text, Loader=_TagLoader)

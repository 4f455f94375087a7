"""Bad inventories, recipes and options: exit 2, a message naming the file, key and fix, and
no host contacted.

The only host of these inventories is a tripwire: a TCP listener on 127.0.0.1 that accepts no
connection. A connection attempt completes in the kernel's backlog, so the listener becomes
readable as soon as Fraisier tries to reach the host.
"""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import CliResult, run_fraisier
from support import REPO_ROOT


class Tripwire:
    """A listening socket that reports whether any client connected to it."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])

    def contacted(self, wait: float = 0.0) -> bool:
        """Return whether a connection is waiting in the backlog."""
        readable, _, _ = select.select([self.socket], [], [], wait)
        return bool(readable)

    def close(self) -> None:
        self.socket.close()


class BadProject:
    """A project whose inventory ``inventories/test.yaml`` targets the tripwire only."""

    def __init__(self, root: Path, tripwire: Tripwire) -> None:
        self.root = root
        self.tripwire = tripwire
        self.inventory = root / "inventories" / "test.yaml"
        self.inventory.parent.mkdir()
        (root / "known_hosts").write_text("")
        self.data: dict[str, Any] = {
            "environment": "test",
            "settings": {
                "database": f"sqlite:///{root / 'runs.db'}",
                "known_hosts": str(root / "known_hosts"),
                "recipes_dir": str(REPO_ROOT / "tasks"),
                "connect_timeout": 2,
            },
            "hosts": {
                "web1": {"address": "127.0.0.1", "port": tripwire.port, "user": "deploy"},
            },
            "fraises": {
                "hello": {
                    "type": "api",
                    "deploy_to": "/srv/never-used/hello",
                    "source": {"path": str(REPO_ROOT / "examples" / "hello")},
                }
            },
        }
        self.write()

    def write(self) -> None:
        """Write ``data`` to the inventory file."""
        self.inventory.write_text(yaml.safe_dump(self.data, sort_keys=False))

    def recipe(self, text: str) -> Path:
        """Write ``recipes/api.yaml`` with ``text`` and point the inventory at it."""
        directory = self.root / "recipes"
        directory.mkdir(exist_ok=True)
        path = directory / "api.yaml"
        path.write_text(text)
        self.data["settings"]["recipes_dir"] = str(directory)
        self.write()
        return path

    def git_source(self) -> Path:
        """Commit examples/hello to a new git repository and make it the fraise's source."""
        repo = self.root / "repo"
        shutil.copytree(REPO_ROOT / "examples" / "hello", repo)
        for command in (
            ["git", "init", "-q", "-b", "main"],
            ["git", "add", "."],
            ["git", "-c", "user.name=t", "-c", "user.email=t@invalid", "commit", "-qm", "x"],
        ):
            subprocess.run(command, cwd=repo, check=True, capture_output=True)
        self.data["fraises"]["hello"]["source"] = {"git": str(repo), "ref": "main"}
        self.write()
        return repo

    def fraisier(self, *args: str) -> CliResult:
        """Run a task against this project's inventory."""
        return run_fraisier(
            self.root, *args, "--env", "test", "--inventory", str(self.inventory), timeout=60
        )


@pytest.fixture
def tripwire() -> Iterator[Tripwire]:
    """Return a listener on 127.0.0.1 that records whether anything connected."""
    wire = Tripwire()
    yield wire
    wire.close()


@pytest.fixture
def bad(tmp_path: Path, tripwire: Tripwire) -> BadProject:
    """Return a valid project aimed at the tripwire, for each test to break."""
    return BadProject(tmp_path, tripwire)


def assert_rejected(bad: BadProject, result: CliResult, *fragments: str) -> None:
    """Check exit 2, each message fragment on stderr, and no connection to the host."""
    assert result.returncode == 2, str(result)
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} missing from:\n{result}"
    assert not bad.tripwire.contacted(), "the host was contacted"


def test_tripwire_sees_deploy(bad: BadProject) -> None:
    result = bad.fraisier("deploy", "--json")

    assert result.returncode == 1, str(result)
    assert bad.tripwire.contacted(wait=1.0)


def test_unknown_environment(bad: BadProject) -> None:
    result = run_fraisier(bad.root, "deploy", "--env", "staging")

    assert_rejected(
        bad,
        result,
        "unknown environment 'staging'",
        str(bad.root / "inventories" / "staging.yaml"),
        "known environments: test",
    )


def test_malformed_yaml(bad: BadProject) -> None:
    bad.inventory.write_text(
        "environment: test\nhosts:\n  web1:\n    address: 127.0.0.1\n   port: [22\n"
    )

    result = bad.fraisier("deploy")

    assert_rejected(bad, result, f"{bad.inventory}:5", "malformed YAML", "fix the syntax")


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        (("settings",), "forsk", "unknown key 'settings.forsk'; did you mean 'forks'?"),
        (
            ("hosts", "web1"),
            "adress",
            "unknown key 'hosts.web1.adress'; did you mean 'address'?",
        ),
        (
            ("fraises", "hello"),
            "helth_check",
            "unknown key 'fraises.hello.helth_check'; did you mean 'health_check'?",
        ),
    ],
)
def test_unknown_key(bad: BadProject, section: tuple[str, ...], key: str, expected: str) -> None:
    target = bad.data
    for name in section:
        target = target[name]
    target[key] = 1
    bad.write()

    result = bad.fraisier("deploy")

    assert_rejected(bad, result, str(bad.inventory), expected)


def test_missing_host_address(bad: BadProject) -> None:
    del bad.data["hosts"]["web1"]["address"]
    bad.write()

    result = bad.fraisier("deploy")

    assert_rejected(
        bad,
        result,
        str(bad.inventory),
        "'hosts.web1.address' is missing",
        "give the host's IP address or DNS name",
    )


@pytest.mark.parametrize("port", [0, 70000, "ssh"])
def test_invalid_port(bad: BadProject, port: Any) -> None:
    bad.data["hosts"]["web1"]["port"] = port
    bad.write()

    result = bad.fraisier("deploy")

    assert_rejected(
        bad,
        result,
        str(bad.inventory),
        "'hosts.web1.port' must be a whole number from 1 to 65535",
        f"(got {port!r})",
    )


def test_missing_identity_file(bad: BadProject) -> None:
    bad.data["hosts"]["web1"]["identity_file"] = "keys/deploy_ed25519"
    bad.write()

    result = bad.fraisier("deploy")

    assert_rejected(
        bad,
        result,
        str(bad.inventory),
        "'hosts.web1.identity_file' 'keys/deploy_ed25519': file not found",
        "fix the path",
    )


def test_step_without_command(bad: BadProject) -> None:
    recipe = bad.recipe(
        textwrap.dedent(
            """\
            steps:
              - builtin: fetch
              - name: build
                timeout: 10
              - builtin: switch
            """
        )
    )

    result = bad.fraisier("deploy")

    assert_rejected(
        bad,
        result,
        str(recipe),
        "step 'build' (steps[1]) has no command",
        "add 'run: COMMAND'",
    )


def test_undefined_variable(bad: BadProject) -> None:
    recipe = bad.recipe(
        textwrap.dedent(
            """\
            steps:
              - builtin: fetch
              - name: build
                run: make -C {{ build_dir }}
              - builtin: switch
            """
        )
    )

    result = bad.fraisier("deploy")

    assert_rejected(
        bad,
        result,
        "undefined variable {{ build_dir }}",
        f"{recipe} step build",
        "define it under 'vars'",
    )


def test_undefined_variable_dry_run(bad: BadProject) -> None:
    bad.data["fraises"]["hello"]["deploy_to"] = "{{ app_root }}/hello"
    bad.write()

    result = bad.fraisier("deploy", "--dry-run")

    assert_rejected(
        bad,
        result,
        "undefined variable {{ app_root }}",
        "deploy_to of fraise hello",
        f"{bad.inventory}: ",
    )


@pytest.mark.parametrize("ref", ["main; rm -rf /", "$(id)", "--upload-pack=x", "a..b"])
def test_hostile_ref(bad: BadProject, ref: str) -> None:
    repo = bad.git_source()

    result = bad.fraisier("deploy", "--ref", ref)

    assert_rejected(bad, result, "--ref", f"invalid git ref {ref!r}", "without spaces")
    assert not (bad.root / "var" / "git-cache").exists() or not any(
        (bad.root / "var" / "git-cache").iterdir()
    ), "git ran before the ref was checked"
    assert (repo / "app.py").is_file()


@pytest.mark.parametrize("release", ["../../etc", "a b", "-rf", ".hidden"])
def test_hostile_release_id(bad: BadProject, release: str) -> None:
    result = bad.fraisier("rollback", "--to", release)

    assert_rejected(bad, result, "--to", f"invalid release id {release!r}")


def test_ref_with_path_source(bad: BadProject) -> None:
    result = bad.fraisier("deploy", "--ref", "main")

    assert_rejected(bad, result, "--ref applies to git sources only")


def test_inventory_file_missing(bad: BadProject) -> None:
    missing = bad.root / "inventories" / "nope.yaml"

    result = run_fraisier(bad.root, "deploy", "--env", "test", "--inventory", str(missing))

    assert_rejected(bad, result, f"inventory file {missing} not found", "fix --inventory")


CHANGES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "serial",
        lambda data: data["settings"].update(serial="0%"),
        "'settings.serial'",
    ),
    (
        "host_key_checking",
        lambda data: data["settings"].update(host_key_checking="no"),
        "'settings.host_key_checking' must be one of strict, accept-new (got 'no')",
    ),
    (
        "connect_timeout",
        lambda data: data["settings"].update(connect_timeout=0.5),
        "'settings.connect_timeout' must be a number from 1 to 600 (got 0.5)",
    ),
    (
        "fraise hosts",
        lambda data: data["fraises"]["hello"].update(hosts=["db"]),
        "'fraises.hello.hosts' names 'db', which is neither a host nor a group",
    ),
]


@pytest.mark.parametrize(("label", "change", "expected"), CHANGES, ids=[c[0] for c in CHANGES])
def test_invalid_setting(
    bad: BadProject, label: str, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    change(bad.data)
    bad.write()

    result = bad.fraisier("deploy")

    assert_rejected(bad, result, str(bad.inventory), expected)


def test_unknown_fraise(bad: BadProject) -> None:
    result = bad.fraisier("deploy", "--fraise", "helo")

    assert_rejected(bad, result, "fraise 'helo' not found", "known fraises: hello")


def test_unknown_limit(bad: BadProject) -> None:
    result = bad.fraisier("deploy", "--limit", "web9")

    assert_rejected(
        bad, result, "--limit: 'web9' is neither a host nor a group", "known: all, web1"
    )


@pytest.mark.parametrize("task", ["deploy", "rollback", "releases"])
def test_json_log_error_before_run(tmp_path: Path, task: str) -> None:
    import json

    (tmp_path / "inventories").mkdir()

    result = run_fraisier(tmp_path, task, "--env", "nosuch", "--log-format", "json")

    assert result.returncode == 2, str(result)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1, result.stderr
    assert errors[0]["error_code"] == "configuration_error"
    assert errors[0]["exit_code"] == 2
    assert "unknown environment 'nosuch'" in errors[0]["message"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["unlock", "--env", "prod"], "--fraise is required"),
        (["deploy", "--env", "prod", "--log-level", "LOUD"], "invalid log level 'LOUD'"),
        (["deploy", "--env", "prod", "--log-file", "/proc/version"], "cannot open log file"),
        (["deploy", "--env", "prod", "--wait-lock", "abc"], "--wait-lock must be a number"),
        (["rollback", "--env", "prod", "--wait-lock", "-1"], "--wait-lock must be 0 or more"),
    ],
)
def test_json_log_option_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    import json

    (tmp_path / "inventories").mkdir()

    result = run_fraisier(tmp_path, *args, "--log-format", "json")

    assert result.returncode == 2, str(result)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0]["error_code"] == "configuration_error"
    assert fragment in lines[0]["message"]

"""Table tests of the engine's pure parts: batches, templating, release bookkeeping, inventories."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fraisier.batches import batch_size, parse_serial, split_batches, threshold_exceeded
from fraisier.errors import ConfigurationError, ValidationError
from fraisier.inventory import load_inventory
from fraisier.recipes import load_recipe
from fraisier.release import HostState, ReleaseInfo, ReleasePaths, releases_to_remove
from fraisier.transport.base import wrap_command
from fraisier.validation import render, validate_git_ref, validate_release_id

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("serial", "hosts", "expected"),
    [
        ((1,), 3, [1, 1, 1]),
        (("100%",), 5, [5]),
        ((1, "50%"), 5, [1, 3, 1]),
        ((1, "25%", "100%"), 9, [1, 3, 5]),
        ((2,), 5, [2, 2, 1]),
        (("10%",), 3, [1, 1, 1]),
    ],
)
def test_split_batches_sizes(serial, hosts, expected):
    batches = split_batches(list(range(hosts)), serial)
    assert [len(b) for b in batches] == expected
    assert [h for b in batches for h in b] == list(range(hosts))


@pytest.mark.parametrize("bad", [0, -1, "0%", "150%", "abc", [], True, 1.5])
def test_parse_serial_rejects(bad):
    with pytest.raises(ValueError):
        parse_serial(bad)


def test_parse_serial_accepts_list():
    assert parse_serial([1, "25%", "100%"]) == (1, "25%", "100%")
    assert batch_size("25%", 10) == 3


@pytest.mark.parametrize(
    ("failed", "total", "limit", "exceeded"),
    [(0, 3, 0, False), (1, 3, 0, True), (1, 4, 25, False), (2, 4, 25, True), (3, 3, 100, False)],
)
def test_threshold_exceeded(failed, total, limit, exceeded):
    assert threshold_exceeded(failed, total, limit) is exceeded


@pytest.mark.parametrize(
    "value",
    ["main; rm -rf /", "$(id)", "--upload-pack=x", "a b", "x..y", "`id`", "a|b", ""],
)
def test_git_ref_rejects_hostile(value):
    with pytest.raises(ValidationError):
        validate_git_ref(value)


@pytest.mark.parametrize("value", ["../../etc", "a b", "-rf", ".hidden", "a/b", "x;y", "é"])
def test_release_id_rejects_hostile(value):
    with pytest.raises(ValidationError):
        validate_release_id(value)


def test_render_quotes_values_for_the_shell():
    hostile = "x'; touch /tmp/pwned; echo '$(id)"
    command = render("printf '%s' {{ value }}", {"value": hostile})
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert output.stdout == hostile


def test_render_raw_and_undefined():
    assert render("echo {{ n | raw }}", {"n": "a b"}) == "echo a b"
    with pytest.raises(ConfigurationError, match="undefined variable"):
        render("echo {{ missing }}", {"n": 1})


def test_wrap_command_runs_in_cwd_with_env(tmp_path):
    line = wrap_command(
        'printf "%s %s" "$(pwd)" "$GREETING"', cwd=str(tmp_path), env={"GREETING": "a 'b'"}
    )
    output = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True)
    assert output.stdout == f"{tmp_path} a 'b'"


def _state(current, *releases):
    return HostState(True, current, tuple(ReleaseInfo(r, s) for r, s in releases))


def test_cleanup_keeps_current_last_healthy_and_protected():
    state = _state(
        "r5",
        ("r1", "healthy"),
        ("r2", "healthy"),
        ("r3", "failed"),
        ("r4", "failed"),
        ("r5", "healthy"),
    )
    assert releases_to_remove(state, keep=1, protect=["r1"]) == ["r2", "r3"]


def test_cleanup_never_deletes_current_even_if_failed():
    state = _state("r2", ("r1", "healthy"), ("r2", "failed"), ("r3", "failed"))
    removed = releases_to_remove(state, keep=1, protect=[])
    assert "r2" not in removed
    assert "r1" not in removed


def test_rollback_target_skips_failed_releases():
    state = _state("r4", ("r1", "healthy"), ("r2", "healthy"), ("r3", "failed"), ("r4", "healthy"))
    assert state.rollback_target() == "r2"


def test_release_state_round_trip(tmp_path):
    paths = ReleasePaths(str(tmp_path / "app"))
    subprocess.run(["sh", "-c", paths.prepare_command()], check=True)
    (tmp_path / "app" / "releases" / "r1").mkdir()
    subprocess.run(["sh", "-c", paths.set_state_command("r1", "healthy")], check=True)
    subprocess.run(["sh", "-c", paths.switch_command("r1")], check=True)
    output = subprocess.run(
        ["sh", "-c", paths.read_state_command()], capture_output=True, text=True, check=True
    )
    state = ReleasePaths.parse_state(output.stdout)
    assert state.current == "r1"
    assert state.releases == (ReleaseInfo("r1", "healthy"),)
    assert os.readlink(tmp_path / "app" / "current") == "releases/r1"


def test_switch_replaces_current_atomically(tmp_path):
    paths = ReleasePaths(str(tmp_path))
    subprocess.run(["sh", "-c", paths.prepare_command()], check=True)
    for name in ("a", "b"):
        (tmp_path / "releases" / name).mkdir()
    subprocess.run(["sh", "-c", paths.switch_command("a")], check=True)
    subprocess.run(["sh", "-c", paths.switch_command("b")], check=True)
    assert os.readlink(tmp_path / "current") == "releases/b"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".current-")]
    assert leftovers == []


def _write_inventory(tmp_path: Path, body: dict) -> Path:
    folder = tmp_path / "inventories"
    folder.mkdir(exist_ok=True)
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_variable_precedence(tmp_path):
    path = _write_inventory(
        tmp_path,
        {
            "vars": {"a": "env", "b": "env", "c": "env", "d": "env"},
            "hosts": {"h1": {"address": "127.0.0.9", "vars": {"d": "host"}}},
            "groups": {
                "first": {"hosts": ["h1"], "vars": {"c": "first", "b": "first"}},
                "second": {"hosts": ["h1"], "vars": {"c": "second"}},
            },
            "fraises": {"app": {"deploy_to": "/srv/app", "vars": {"b": "fraise", "a": "fraise"}}},
        },
    )
    inventory = load_inventory(path, "test")
    fraise = inventory.fraise("app")
    variables = inventory.variables(fraise, inventory.hosts["h1"], {"a": "recipe", "e": "recipe"})
    assert variables["e"] == "recipe"
    assert variables["a"] == "fraise"
    assert variables["b"] == "first"
    assert variables["c"] == "second"
    assert variables["d"] == "host"
    assert variables["host"] == "h1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"hosts": {"h1": {"adress": "x"}}, "fraises": {}}, "did you mean 'address'"),
        (
            {"hosts": {"h1": {"port": 22}}, "fraises": {"a": {"deploy_to": "/x"}}},
            "hosts.h1.address' is missing",
        ),
        (
            {
                "hosts": {"h1": {"address": "127.0.0.9", "port": 70000}},
                "fraises": {"a": {"deploy_to": "/x"}},
            },
            "hosts.h1.port",
        ),
        (
            {
                "hosts": {"h1": {"address": "127.0.0.9", "identity_file": "/nonexistent/key"}},
                "fraises": {"a": {"deploy_to": "/x"}},
            },
            "file not found",
        ),
        (
            {"hosts": {"h1": {"address": "127.0.0.9"}}, "fraises": {"a": {}}},
            "deploy_to' is missing",
        ),
        (
            {
                "hosts": {"h1": {"address": "127.0.0.9"}},
                "fraises": {"a": {"deploy_to": "/x", "hosts": ["nope"]}},
            },
            "neither a host nor a group",
        ),
        (
            {"hosts": {"h1": {"address": "bad address!"}}, "fraises": {"a": {"deploy_to": "/x"}}},
            "neither an IP address",
        ),
        (
            {
                "hosts": {"h1": {"address": "127.0.0.9"}},
                "fraises": {"a": {"deploy_to": "/x", "vars": {"release_id": "x"}}},
            },
            "set by Fraisier",
        ),
        (
            {
                "hosts": {"h1": {"address": "127.0.0.9"}},
                "fraises": {"a": {"deploy_to": "/x", "serial": ["0%"]}},
            },
            "serial",
        ),
    ],
)
def test_inventory_errors_name_file_and_key(tmp_path, body, message):
    path = _write_inventory(tmp_path, body)
    with pytest.raises(ConfigurationError) as caught:
        load_inventory(path, "test")
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_malformed_yaml_names_line(tmp_path):
    folder = tmp_path / "inventories"
    folder.mkdir()
    path = folder / "test.yaml"
    path.write_text("hosts:\n  h1: {address: [\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:\d+:\d+: malformed YAML"):
        load_inventory(path, "test")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"name": "build"}], "has no command"),
        ([{"builtin": "switch"}, {"builtin": "fetch"}], "'fetch' must come before 'switch'"),
        ([{"builtin": "fetch"}], "exactly one 'switch'"),
        ([{"builtin": "launch"}], "built-in steps are"),
        ([{"name": "a", "run": "x"}, {"name": "a", "run": "y"}], "repeated: a"),
        ([{"name": "Bad Name", "run": "x"}], "invalid step name"),
    ],
)
def test_recipe_errors(tmp_path, steps, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"steps": steps}))
    with pytest.raises(ConfigurationError, match=message):
        load_recipe(path)


def test_shipped_inventories_and_recipes_load():
    for path in sorted((REPO / "inventories").glob("*.yaml")):
        inventory = load_inventory(path, path.stem)
        assert inventory.fraises, path
    for path in sorted((REPO / "tasks").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.steps, path


def test_shell_quote_helper_matches_shlex():
    assert render("{{ v }}", {"v": "a b"}) == shlex.quote("a b")


def test_host_worker_bug_fails_only_that_host(tmp_path):
    from fraisier.interrupt import Interrupt
    from fraisier.runner import FraiseRun, RunOptions, RunServices
    from fraisier.transport.local import LocalTransport

    class BrokenTransport(LocalTransport):
        def connect(self) -> None:
            raise KeyError("gateway")

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "job.yaml").write_text(
        yaml.safe_dump({"steps": [{"name": "hi", "run": "true"}]})
    )
    path = _write_inventory(
        tmp_path,
        {
            "hosts": {"good": {"connection": "local"}, "bad": {"connection": "local"}},
            "fraises": {"job": {"recipe": "job", "deploy_to": str(tmp_path / "d" / "{{ host }}")}},
            "settings": {"max_fail_percentage": 50},
        },
    )
    inventory = load_inventory(path, "test")

    def factory(host):
        return BrokenTransport(host) if host.name == "bad" else LocalTransport(host)

    run = FraiseRun(
        inventory,
        inventory.fraise("job"),
        task="deploy",
        options=RunOptions(),
        services=RunServices(transport_factory=factory),
        interrupt=Interrupt(),
    )
    result = run.deploy(tmp_path)
    statuses = {h.host: h.status for h in result.hosts}
    assert statuses == {"good": "success", "bad": "failed"}
    assert result.exit_code == 1
    bad = next(h for h in result.hosts if h.host == "bad")
    assert "KeyError" in bad.error_message


def test_unwritable_lock_is_not_a_held_lock(tmp_path):
    from fraisier.errors import DeploymentError, LockHeldError
    from fraisier.hostlock import Holder, HostLock
    from fraisier.inventory import Host
    from fraisier.transport.local import LocalTransport

    (tmp_path / ".fraisier").write_text("a file where the lock folder belongs")
    holder = Holder("run1", "me", "controller", 1, "2026-01-01T00:00:00+00:00", "test", "app")
    lock = HostLock(
        LocalTransport(Host("h", "127.0.0.1", "local")), ReleasePaths(str(tmp_path)), holder, 60
    )

    with pytest.raises(DeploymentError) as caught:
        lock.acquire()

    assert not isinstance(caught.value, LockHeldError)
    assert caught.value.code == "lock_failed"
    assert "check that the deploy user can write there" in caught.value.message


def test_lock_acquire_runs_suffix_and_names_holder(tmp_path):
    from fraisier.errors import LockHeldError
    from fraisier.hostlock import Holder, HostLock
    from fraisier.inventory import Host
    from fraisier.transport.local import LocalTransport

    transport = LocalTransport(Host("h", "127.0.0.1", "local"))
    paths = ReleasePaths(str(tmp_path))
    first = Holder("run1", "alice", "ctl-a", 1, "2026-01-01T00:00:00+00:00", "test", "app")
    second = Holder("run2", "bob", "ctl-b", 2, "2026-01-01T00:00:01+00:00", "test", "app")

    lines = HostLock(transport, paths, first, 60).acquire(
        prefix=paths.prepare_command(), suffix="echo after"
    )
    assert lines == ["after"]
    with pytest.raises(LockHeldError) as caught:
        HostLock(transport, paths, second, 60).acquire()
    assert "run run1 by alice on ctl-a" in caught.value.message


def test_duplicate_yaml_key_rejected(tmp_path):
    folder = tmp_path / "inventories"
    folder.mkdir()
    path = folder / "test.yaml"
    path.write_text(
        "hosts:\n  a: {connection: local}\nfraises:\n  app: {deploy_to: /x}\n  app: {deploy_to: /y}\n"
    )
    with pytest.raises(
        ConfigurationError, match=rf"{path}:5: duplicate key 'app', first defined at line 4"
    ):
        load_inventory(path, "test")


@pytest.mark.parametrize("deploy_to", ["relative/dir", "/", "/srv/../etc", "/srv/./app"])
def test_deploy_to_rejected_before_contact(tmp_path, deploy_to):
    from fraisier.interrupt import Interrupt
    from fraisier.runner import FraiseRun, RunOptions, RunServices

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "job.yaml").write_text(
        yaml.safe_dump({"steps": [{"name": "hi", "run": "true"}]})
    )
    path = _write_inventory(
        tmp_path,
        {
            "hosts": {"h": {"connection": "local"}},
            "fraises": {"job": {"recipe": "job", "deploy_to": deploy_to}},
        },
    )
    inventory = load_inventory(path, "test")
    run = FraiseRun(
        inventory,
        inventory.fraise("job"),
        task="deploy",
        options=RunOptions(),
        services=RunServices(),
        interrupt=Interrupt(),
    )
    with pytest.raises(ConfigurationError, match="invalid deploy_to"):
        run.plan("r1")


def test_select_deduplicates_fraises(tmp_path):
    path = _write_inventory(
        tmp_path, {"hosts": {"h": {"connection": "local"}}, "fraises": {"a": {"deploy_to": "/x"}}}
    )
    inventory = load_inventory(path, "test")
    assert [f.name for f in inventory.select(["a", "a"])] == ["a"]


def test_metrics_seed_every_error_code_the_engine_sets():
    import re as regex

    from fraisier.metrics import _error_codes

    sources = (REPO / "fraisier").rglob("*.py")
    set_codes = set()
    for path in sources:
        set_codes.update(regex.findall(r'code\s*=\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
    assert set_codes - _error_codes() == set()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (".", "{root}"),
        ("../service", "{root}/../service"),
        ("/srv/git/hello.git", "/srv/git/hello.git"),
        ("https://git.example.net/hello.git", "https://git.example.net/hello.git"),
        ("ssh://git@git.example.net/hello.git", "ssh://git@git.example.net/hello.git"),
        ("git@git.example.net:shop/hello.git", "git@git.example.net:shop/hello.git"),
        ("file:///srv/git/hello.git", "file:///srv/git/hello.git"),
    ],
)
def test_git_source_path_relative_to_project(tmp_path, written, expected):
    inventory = tmp_path / "inventories" / "test.yaml"
    inventory.parent.mkdir()
    inventory.write_text(
        yaml.safe_dump(
            {
                "hosts": {"web1": {"address": "192.0.2.10"}},
                "fraises": {"app": {"deploy_to": "/srv/app", "source": {"git": written}}},
            }
        )
    )

    source = load_inventory(inventory).fraises["app"].source

    assert source is not None
    assert source.repo == expected.format(root=tmp_path.resolve())


def test_folder_revision_depends_on_content_only(tmp_path):
    from fraisier.inventory import Source
    from fraisier.sources import pack_directory

    source_dir = tmp_path / "app"
    source_dir.mkdir()
    (source_dir / "app.py").write_text("print('one')\n")
    source = Source(kind="path", path=str(source_dir))
    first_dir, second_dir = tmp_path / "w1", tmp_path / "w2"
    first_dir.mkdir()
    second_dir.mkdir()

    first = pack_directory(source, first_dir)
    second = pack_directory(source, second_dir)
    (source_dir / "app.py").write_text("print('two')\n")
    changed = pack_directory(source, first_dir)

    assert first.revision == second.revision
    assert changed.revision != first.revision
    assert first.archive.name != second.archive.name


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("/usr/local/bin/fraisier", "fraisier"),
        ("/srv/app/.venv/lib/python3.11/site-packages/fraisier/__main__.py", "fraisier"),
        ("/usr/local/bin/inv", "inv"),
        ("/usr/local/bin/invoke", "inv"),
    ],
)
def test_command_name_follows_program(monkeypatch, argv0, expected):
    from fraisier.command import command_name

    monkeypatch.setattr("sys.argv", [argv0, "deploy"])

    assert command_name() == expected


def test_source_folders_packed_in_order(tmp_path):
    import tarfile

    from fraisier.sources import pack_directory

    base, overlay = tmp_path / "base", tmp_path / "overlay"
    (base / "static").mkdir(parents=True)
    (base / "app.py").write_text("base app\n")
    (base / "static" / "a.css").write_text("a\n")
    (base / "__pycache__").mkdir()
    (base / "__pycache__" / "x.pyc").write_text("")
    (overlay / "static").mkdir(parents=True)
    (overlay / "app.py").write_text("overlay app\n")
    (overlay / "static" / "b.css").write_text("b\n")
    (overlay / "router.py").write_text("router\n")
    inventory = tmp_path / "inventories" / "test.yaml"
    inventory.parent.mkdir()
    inventory.write_text(
        yaml.safe_dump(
            {
                "hosts": {"web1": {"address": "192.0.2.10"}},
                "fraises": {
                    "app": {"deploy_to": "/srv/app", "source": {"path": ["base", "overlay"]}}
                },
            }
        )
    )
    source = load_inventory(inventory).fraises["app"].source
    assert source is not None
    work = tmp_path / "work"
    work.mkdir()

    artifact = pack_directory(source, work)

    with tarfile.open(artifact.archive) as tar:
        names = sorted(tar.getnames())
        app = tar.extractfile("app.py").read().decode()
    assert names == ["app.py", "router.py", "static", "static/a.css", "static/b.css"]
    assert app == "overlay app\n"
    assert source.paths == (str(tmp_path / "base"), str(tmp_path / "overlay"))


def test_source_folders_file_and_folder_clash(tmp_path):
    from fraisier.inventory import Source
    from fraisier.sources import pack_directory

    (tmp_path / "a" / "conf").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "conf").write_text("x\n")
    source = Source(kind="path", path=str(tmp_path / "a"), extra_paths=(str(tmp_path / "b"),))

    with pytest.raises(ConfigurationError, match="disagree on conf"):
        pack_directory(source, tmp_path)


def test_closed_stdout_exits_quietly():
    script = textwrap.dedent(
        """
        import sys, time
        from invoke.exceptions import Exit
        from fraisier.cli.output import quiet_on_closed_stdout

        @quiet_on_closed_stdout
        def print_many():
            time.sleep(0.5)  # the reader has closed the pipe by now
            for number in range(100000):
                print("line", number)

        try:
            print_many()
        except Exit as exc:
            sys.exit(exc.code)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 1
    assert "Traceback" not in stderr


@pytest.mark.parametrize("value", [-3, 0, 1001, "abc", True, 2.5])
def test_environment_keep_releases_checked(tmp_path, value):
    inventory = tmp_path / "inventories" / "test.yaml"
    inventory.parent.mkdir()
    inventory.write_text(
        yaml.safe_dump(
            {
                "vars": {"keep_releases": value},
                "hosts": {"web1": {"address": "192.0.2.10"}},
                "fraises": {"app": {"deploy_to": "/srv/app"}},
            }
        )
    )

    with pytest.raises(ConfigurationError, match=r"'vars\.keep_releases' must be a whole number"):
        load_inventory(inventory)


def test_environment_keep_releases_used(tmp_path):
    inventory = tmp_path / "inventories" / "test.yaml"
    inventory.parent.mkdir()
    inventory.write_text(
        yaml.safe_dump(
            {
                "vars": {"keep_releases": 7},
                "hosts": {"web1": {"address": "192.0.2.10"}},
                "fraises": {
                    "app": {"deploy_to": "/srv/app"},
                    "two": {"deploy_to": "/srv/two", "keep_releases": 2},
                },
            }
        )
    )

    loaded = load_inventory(inventory)

    assert loaded.fraises["app"].keep_releases == 7
    assert loaded.fraises["two"].keep_releases == 2

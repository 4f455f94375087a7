"""End-to-end tests of ``deploy`` on three real SSH hosts: releases, cleanup, health checks,
dry runs, deploy locks, host keys and unreachable hosts."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import TestProject, fetch_release, run_fraisier, wait_for_release
from support import SshHost

from fraisier.release import new_release_id

pytestmark = pytest.mark.ssh


def hosts_by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the host entries of one run of the ``--json`` summary, by host name."""
    return {entry["host"]: entry for entry in run["hosts"]}


def dead_pid() -> int:
    """Return the pid of a process of this machine that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(project: TestProject, host: SshHost, holder: dict[str, Any]) -> None:
    """Create the deploy lock of ``hello`` on ``host`` by hand, owned by the deploy user."""
    command = (
        "mkdir -p {root}/.fraisier/lock && printf '%s\\n' '{body}' > {root}/.fraisier/lock/holder.json"
    ).format(root=project.deploy_path(host), body=json.dumps(holder))
    done = subprocess.run(host.ssh_args(command), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_deploy_three_hosts(project: TestProject, testinfra_host: Any) -> None:
    first = project.deploy().json()

    assert len(first) == 1
    run = first[0]
    release = run["release"]
    assert run["status"] == "success"
    assert run["exit_code"] == 0
    for host in project.hosts:
        entry = hosts_by_name(run)[host.name]
        assert entry["status"] == "success"
        assert entry["previous_release"] is None
        assert entry["final_release"] == release

        remote = testinfra_host(host)
        root = f"{host.deploy_root}/hello"
        current = remote.file(f"{root}/current")
        assert current.is_symlink
        assert current.linked_to == f"{root}/releases/{release}"
        assert remote.run(f"readlink {root}/current").stdout.strip() == f"releases/{release}"
        assert remote.file(f"{root}/releases/{release}/app.py").is_file
        revision = remote.file(f"{root}/releases/{release}/REVISION")
        assert revision.is_file
        assert revision.content_string.strip().startswith("path:")
        assert remote.file(f"{root}/releases/{release}/.fraisier-state").content_string == (
            "healthy\n"
        )
        log_link = remote.file(f"{root}/releases/{release}/log")
        assert log_link.is_symlink
        assert log_link.linked_to == f"{root}/shared/log"
        assert remote.file(f"{root}/shared/log/app.log").is_file
        assert not remote.file(f"{root}/.fraisier/lock").exists
        assert fetch_release(host.address, project.port) == release

    second = project.deploy().json()[0]

    new_release = second["release"]
    assert new_release != release
    assert second["status"] == "success"
    for host in project.hosts:
        entry = hosts_by_name(second)[host.name]
        assert entry["previous_release"] == release
        assert entry["final_release"] == new_release
        assert project.releases_on(host) == sorted([release, new_release])
        assert project.current_on(host) == new_release
        assert wait_for_release(host.address, project.port, new_release) == new_release


def test_cleanup_keeps_two_releases(project: TestProject) -> None:
    project.update(lambda data: data["fraises"]["hello"].update(keep_releases=2))

    releases = [project.deployed_release() for _ in range(4)]

    assert len(set(releases)) == 4
    assert releases == sorted(releases), "release ids must sort in deploy order"
    for host in project.hosts:
        assert project.releases_on(host) == releases[-2:]
        assert project.current_on(host) == releases[-1]
        assert fetch_release(host.address, project.port) == releases[-1]


def test_release_ids_sort_within_one_second() -> None:
    earlier = dt.datetime(2030, 1, 1, 12, 0, 0, 100_000, tzinfo=dt.timezone.utc)
    later = earlier + dt.timedelta(milliseconds=300)

    first = new_release_id("ffffff" + "0" * 26, earlier)
    second = new_release_id("000000" + "f" * 26, later)

    assert first < second
    assert first == "20300101120000100-ffffff"


def test_health_failure_rolls_back(project: TestProject) -> None:
    good = project.deployed_release()
    project.use_source(project.source_copy("broken", marker="UNHEALTHY"))
    project.update(
        lambda data: data["fraises"]["hello"]["health_check"].update(retries=2, delay=0.2)
    )

    result = project.deploy(expect=1)

    run = result.json()[0]
    bad = run["release"]
    assert run["status"] == "rolled_back"
    assert "health check failed" in result.output
    for host in project.hosts:
        entry = hosts_by_name(run)[host.name]
        assert entry["status"] == "rolled_back"
        assert entry["previous_release"] == good
        assert entry["final_release"] == good
        assert "health check failed" in entry["error"]
        assert project.current_on(host) == good
        assert project.state_of(host, bad) == "failed"
        assert project.state_of(host, good) == "healthy"
        assert wait_for_release(host.address, project.port, good) == good


def test_first_deploy_unhealthy(project: TestProject) -> None:
    project.use_source(project.source_copy("broken", marker="UNHEALTHY"))
    project.update(
        lambda data: data["fraises"]["hello"]["health_check"].update(retries=1, delay=0.2)
    )

    result = project.deploy(expect=1)

    run = result.json()[0]
    assert run["status"] == "failed"
    for host in project.hosts:
        entry = hosts_by_name(run)[host.name]
        assert entry["status"] == "failed"
        assert entry["previous_release"] is None
        assert entry["error"].count("nothing to roll back to") == 1, entry["error"]
        assert "no release was current before this run" in entry["error"]
        assert project.state_of(host, run["release"]) == "failed"


def test_dry_run_changes_nothing(project: TestProject) -> None:
    release = project.deployed_release()

    result = project.fraisier("deploy", "--dry-run")

    assert result.returncode == 0, str(result)
    assert "Dry run: nothing was changed on any host." in result.stdout
    assert "fraise hello (api, recipe api.yaml) to 3 host(s) of test" in result.stdout
    assert "switch: [built-in switch]" in result.stdout
    for host in project.hosts:
        assert f"{host.name}: current release {release}, 1 release(s) on disk" in result.stdout
        assert project.releases_on(host) == [release]
        assert project.current_on(host) == release
        assert not (project.deploy_path(host) / ".fraisier" / "lock").exists()


def test_dry_run_json_plan(project: TestProject) -> None:
    result = project.fraisier("deploy", "--dry-run", "--json")

    assert result.returncode == 0, str(result)
    payload = result.json()
    assert payload["dry_run"] is True
    plan = "\n".join(payload["plan"][0])
    for host in project.hosts:
        assert f"{host.name}: current release none, 0 release(s) on disk" in plan
        assert not project.deploy_path(host).exists()


def test_dry_run_fails_on_unreadable_host(project: TestProject) -> None:
    down = project.hosts[1]
    down.stop()

    result = project.fraisier("deploy", "--dry-run")

    assert result.returncode == 1, str(result)
    assert f"{down.name}: cannot read the current release" in result.stdout
    assert f"1 host(s) could not be checked ({down.name})" in result.stdout
    for host in project.hosts:
        assert project.current_on(host) is None


def test_lock_held_by_other_run(project: TestProject) -> None:
    release = project.deployed_release()
    locked = project.hosts[1]
    holder = {
        "run_id": "feedfacefeedfacefeedfacefeedface",
        "user": "alice",
        "controller": "other-controller.example",
        "pid": 4242,
        "since": "2030-01-01T00:00:00+00:00",
        "environment": "test",
        "fraise": "hello",
    }
    write_lock(project, locked, holder)

    result = project.deploy(expect=4)

    assert f"deploy lock on {locked.name} is held by run {holder['run_id']}" in result.output
    assert "by alice on other-controller.example (pid 4242)" in result.output
    entry = hosts_by_name(result.json()[0])[locked.name]
    assert entry["final_release"] == release
    assert project.current_on(locked) == release
    lock_file = project.deploy_path(locked) / ".fraisier" / "lock" / "holder.json"
    assert json.loads(lock_file.read_text())["run_id"] == holder["run_id"]


def test_stale_lock_and_unlock(project: TestProject) -> None:
    release = project.deployed_release()
    locked = project.hosts[0]
    holder = {
        "run_id": "deaddeaddeaddeaddeaddeaddeaddead",
        "user": "bob",
        "controller": socket.gethostname(),
        "pid": dead_pid(),
        "since": "2030-01-01T00:00:00+00:00",
        "environment": "test",
        "fraise": "hello",
    }
    write_lock(project, locked, holder)

    result = project.deploy(expect=4)

    assert f"stale deploy lock on {locked.name}" in result.output
    assert f"its process {holder['pid']} no longer runs on this controller" in result.output
    assert f"fraisier unlock --env test --fraise hello --host {locked.name}" in result.output
    assert project.current_on(locked) == release

    unlocked = project.fraisier("unlock", "--fraise", "hello", "--host", locked.name)

    assert unlocked.returncode == 0, str(unlocked)
    assert f"{locked.name}: removed lock" in unlocked.stdout
    assert holder["run_id"] in unlocked.stdout
    assert not (project.deploy_path(locked) / ".fraisier" / "lock").exists()
    assert project.deployed_release() != release


def test_unknown_host_key_fails_host(project: TestProject) -> None:
    unknown = project.hosts[2]
    known = [h for h in project.hosts if h is not unknown]
    project.known_hosts.write_text("".join(f"{h.known_hosts_line}\n" for h in known))
    project.update(lambda data: data["settings"].update(max_fail_percentage=50))
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{unknown.workdir}/ssh_host_ed25519_key.pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]

    result = project.deploy(expect=1)

    run = result.json()[0]
    entry = hosts_by_name(run)[unknown.name]
    assert entry["status"] == "failed"
    assert entry["final_release"] is None
    assert f"host key of {unknown.name}" in entry["error"]
    assert f"ssh-ed25519 {fingerprint}" in result.output
    assert list((project.deploy_path(unknown).parent).iterdir()) == []
    for host in known:
        assert hosts_by_name(run)[host.name]["status"] == "success"
        assert project.current_on(host) == run["release"]


def test_accept_new_adds_host_key(project: TestProject) -> None:
    project.known_hosts.write_text("")
    project.update(lambda data: data["settings"].update(host_key_checking="accept-new"))

    release = project.deployed_release()

    lines = project.known_hosts.read_text().splitlines()
    assert len(lines) == 3
    for host in project.hosts:
        key = host.known_hosts_line.split()[1:]
        assert any(line.split()[1:] == key for line in lines), lines
        assert project.current_on(host) == release
    # The second run trusts the saved keys under strict checking.
    project.update(lambda data: data["settings"].update(host_key_checking="strict"))
    assert project.deployed_release() != release


def test_host_down_others_deployed(project: TestProject) -> None:
    down = project.hosts[1]
    project.update(lambda data: data["settings"].update(max_fail_percentage=50))
    down.stop()

    result = project.deploy(expect=1)

    run = result.json()[0]
    entry = hosts_by_name(run)[down.name]
    assert entry["status"] == "unreachable"
    assert down.address in entry["error"] or down.name in entry["error"]
    for host in project.hosts:
        if host is not down:
            assert hosts_by_name(run)[host.name]["status"] == "success"
            assert project.current_on(host) == run["release"]


def test_host_down_changes_no_host(project: TestProject) -> None:
    release = project.deployed_release()
    down = project.hosts[0]
    down.stop()

    result = project.deploy(expect=1)

    run = result.json()[0]
    assert hosts_by_name(run)[down.name]["status"] == "unreachable"
    for host in project.hosts:
        if host is down:
            continue
        entry = hosts_by_name(run)[host.name]
        assert entry["status"] == "skipped"
        assert project.current_on(host) == release
        assert not (project.deploy_path(host) / "releases" / run["release"]).exists()
        assert wait_for_release(host.address, project.port, release) == release


def test_variable_precedence_in_plan(project: TestProject) -> None:
    recipes = project.root / "recipes"
    recipes.mkdir()
    (recipes / "api.yaml").write_text(
        yaml.safe_dump(
            {
                "vars": {name: "recipe" for name in ("v1", "v2", "v3", "v4", "v5")},
                "steps": [
                    "fetch",
                    {"name": "show", "run": "echo {{ v1 }} {{ v2 }} {{ v3 }} {{ v4 }} {{ v5 }}"},
                    "switch",
                ],
            }
        )
    )
    first, second, third = project.hosts

    def change(data: dict[str, Any]) -> None:
        data["settings"]["recipes_dir"] = str(recipes)
        data["vars"].update(v2="env", v3="env", v4="env", v5="env")
        data["fraises"]["hello"]["vars"] = {"v3": "fraise", "v4": "fraise", "v5": "fraise"}
        data["groups"] = {
            "early": {"hosts": [first.name, second.name], "vars": {"v4": "early", "v5": "early"}},
            "web": data["groups"]["web"],
            "late": {"hosts": [first.name], "vars": {"v4": "late", "v5": "late"}},
        }
        data["hosts"][first.name]["vars"]["v5"] = "host"

    project.update(change)

    result = project.fraisier("deploy", "--dry-run")

    assert result.returncode == 0, str(result)
    commands = [line.strip() for line in result.stdout.splitlines() if "show: " in line]
    assert commands == [
        "show: echo recipe env fraise late host",
        "show: echo recipe env fraise early early",
        "show: echo recipe env fraise fraise fraise",
    ], f"hosts in order {first.name}, {second.name}, {third.name}:\n{result.stdout}"


def test_run_variable_cannot_be_overridden(project: TestProject) -> None:
    project.update(lambda data: data["fraises"]["hello"].update(vars={"release_id": "mine"}))

    result = project.fraisier("deploy")

    assert result.returncode == 2, str(result)
    assert "'fraises.hello.vars.release_id' is set by Fraisier for each run" in result.stderr
    assert "choose another variable name" in result.stderr


def test_relative_known_hosts_from_project(project: TestProject) -> None:
    project.update(lambda data: data["settings"].update(known_hosts="known_hosts"))
    elsewhere = project.root / "elsewhere"
    elsewhere.mkdir()

    result = run_fraisier(
        elsewhere,
        "deploy",
        "--json",
        "--env",
        "test",
        "--inventory",
        str(project.inventory),
    )

    assert result.returncode == 0, str(result)
    for host in project.hosts:
        assert project.current_on(host) == result.json()[0]["release"]
    assert not (elsewhere / "known_hosts").exists()


def write_ssh_config(project: TestProject, jump: SshHost, target: SshHost) -> dict[str, str]:
    """Write a ``~/.ssh/config`` that reaches ``target`` through ``jump``; return ``HOME``."""
    home = project.root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host {jump.address}\n"
        f"  User {jump.user}\n"
        f"  Port {jump.port}\n"
        f"  IdentityFile {jump.identity_file}\n"
        f"Host {target.address}\n"
        f"  ProxyJump {jump.user}@{jump.address}:{jump.port}\n"
    )
    return {"HOME": str(home)}


def test_proxy_jump_from_ssh_config(project: TestProject) -> None:
    jump, _, target = project.hosts
    env = write_ssh_config(project, jump, target)

    result = project.fraisier("deploy", "--json", "--limit", target.name, env=env)

    assert result.returncode == 0, str(result)
    assert project.current_on(target) == result.json()[0]["release"]
    assert project.current_on(jump) is None


def test_proxy_jump_checks_jump_key(project: TestProject) -> None:
    jump, _, target = project.hosts
    env = write_ssh_config(project, jump, target)
    project.known_hosts.write_text(f"{target.known_hosts_line}\n")

    result = project.fraisier("deploy", "--json", "--limit", target.name, env=env)

    assert result.returncode == 1, str(result)
    assert "host key" in result.json()[0]["hosts"][0]["error"]
    assert jump.address in result.json()[0]["hosts"][0]["error"]
    assert project.current_on(target) is None


def test_changed_host_key_rejected(project: TestProject) -> None:
    changed = project.hosts[0]
    others = project.hosts[1:]
    wrong_line = Path(changed.wrong_known_hosts()).read_text()
    project.known_hosts.write_text(wrong_line + "".join(f"{h.known_hosts_line}\n" for h in others))
    project.update(
        lambda data: data["settings"].update(host_key_checking="accept-new", max_fail_percentage=50)
    )

    result = project.deploy(expect=1)

    entry = hosts_by_name(result.json()[0])[changed.name]
    assert entry["status"] == "failed"
    assert "host key" in entry["error"]
    entry_name = f"[{changed.address}]:{changed.port}"
    assert f"ssh-keygen -f {project.known_hosts} -R '{entry_name}'" in entry["error"]
    assert project.known_hosts.read_text().startswith(wrong_line)
    assert list(project.deploy_path(changed).parent.iterdir()) == []


def test_lock_of_second_fraise_held(project: TestProject) -> None:
    import fcntl
    import os

    from fraisier.db.sqlite import SQLiteRunStore
    from fraisier.db.url import parse_database_url

    def add_second_fraise(data: dict[str, Any]) -> None:
        second = json.loads(json.dumps(data["fraises"]["hello"]))
        second["deploy_to"] = "{{ deploy_root }}/second"
        data["fraises"]["second"] = second

    project.update(add_second_fraise)
    url = project.data()["settings"]["database"]
    lock_path = SQLiteRunStore(parse_database_url(url)).lock_path("test", "second")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = project.deploy(expect=4)
    finally:
        os.close(fd)

    runs = {run["fraise"]: run for run in result.json()}
    assert runs["hello"]["status"] == "success"
    assert runs["second"]["status"] == "lock_held"
    assert runs["second"]["hosts"] == []
    assert "deploy lock of test/second is held" in result.stderr
    for host in project.hosts:
        assert project.current_on(host) == runs["hello"]["release"]
        assert not (Path(host.deploy_root) / "second" / "current").exists()


def test_host_without_sftp_named(tmp_path: Path, ssh_host_factory: Any) -> None:
    from support import REPO_ROOT, hello_fraise, write_inventory

    (host,) = ssh_host_factory(1)
    # An sshd without the SFTP subsystem, as on hardened hosts.
    config = Path(host.workdir) / "sshd_config"
    config.write_text(
        "".join(line + "\n" for line in config.read_text().splitlines() if "sftp" not in line)
    )
    host.restart()
    inventory = write_inventory(
        tmp_path,
        [host],
        fraises={"hello": hello_fraise(2, 0.2)},
        settings={"recipes_dir": str(REPO_ROOT / "tasks")},
        vars={"port": 8799},
    )

    dry_run = run_fraisier(
        tmp_path, "deploy", "--env", "test", "--inventory", str(inventory), "--dry-run"
    )
    result = run_fraisier(
        tmp_path, "deploy", "--env", "test", "--inventory", str(inventory), "--json"
    )

    assert dry_run.returncode == 1, str(dry_run)
    assert "rejected the SFTP subsystem request" in dry_run.stdout
    assert result.returncode == 1, str(result)
    entry = result.json()[0]["hosts"][0]
    assert entry["status"] == "failed"
    assert "SFTP subsystem" in entry["error"]
    assert "Subsystem sftp internal-sftp" in entry["error"]
    assert not (Path(host.deploy_root) / "hello" / "current").exists()


def test_restart_spares_process_of_stale_pid(project: TestProject) -> None:
    project.deployed_release()
    host = project.hosts[0]
    # After a crash the pid file may name another process of the deploy user.
    started = subprocess.run(
        host.ssh_args("nohup sleep 300 >/dev/null 2>&1 & echo $!"),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    other = int(started.stdout.strip())
    (project.deploy_path(host) / "shared" / "app.pid").write_text(f"{other}\n")

    release = project.deployed_release()

    assert Path(f"/proc/{other}").exists(), "the restart killed the process named by the pid file"
    assert "sleep" in Path(f"/proc/{other}/cmdline").read_text()
    assert wait_for_release(host.address, project.port, release) == release


def test_unusable_deploy_root_fails_dry_run(project: TestProject) -> None:
    import os

    blocked = project.hosts[2]
    os.chmod(blocked.deploy_root, 0)
    try:
        dry_run = project.fraisier("deploy", "--dry-run")
        releases = project.fraisier("releases", "--json")
    finally:
        os.chmod(blocked.deploy_root, 0o755)

    assert dry_run.returncode == 1, str(dry_run)
    assert f"{blocked.name}: cannot read the current release" in dry_run.stdout
    assert f"{blocked.deploy_root} cannot be read or written by the deploy user" in dry_run.stdout
    rows = {row["host"]: row for row in releases.json()}
    assert "cannot be read or written" in rows[blocked.name]["error"]
    assert rows[project.hosts[0].name].get("error") is None

"""The migration example deploys, migrates and reverts real SQLite databases on the test hosts.

Each test deploys ``examples/migration`` from a sandbox to two sshd test hosts, then reads each
host's database file (``DEPLOY_ROOT/hello/shared/data/app.db``) through the file system, which
the test hosts share with this machine.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from docs_helpers import Sandbox
from support import SshHost

pytestmark = [pytest.mark.ssh, pytest.mark.monitoring, pytest.mark.timeout(600)]

PROJECT = "examples/migration"


def _database(host: SshHost) -> Path:
    return Path(host.deploy_root) / "hello" / "shared" / "data" / "app.db"


def _query(host: SshHost, sql: str) -> list[tuple[Any, ...]]:
    # Read-only, so the test never creates or changes the file it checks.
    conn = sqlite3.connect(f"file:{_database(host)}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def schema_version(host: SshHost) -> int:
    """Return the schema version stored in the host's database."""
    return int(_query(host, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])


def table_names(host: SshHost) -> set[str]:
    return {row[0] for row in _query(host, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def column_names(host: SshHost, table: str) -> set[str]:
    return {row[1] for row in _query(host, f"PRAGMA table_info({table})")}


def releases(host: SshHost) -> list[str]:
    folder = Path(host.deploy_root) / "hello" / "releases"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def current_release(host: SshHost) -> str:
    return (Path(host.deploy_root) / "hello" / "current").resolve().name


def served_release(host: SshHost) -> str:
    """Return the release that the service on the host reports over HTTP."""
    with urllib.request.urlopen(f"http://{host.address}:8731/", timeout=5) as response:
        return json.load(response)["release"]


def deploy(sandbox: Sandbox) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Deploy the example with --json; return the process and the fraise's result."""
    done = sandbox.shell("fraisier deploy --env prod --json", cwd=PROJECT)
    try:
        results = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done, results[0]


def add_migrations(sandbox: Sandbox, *versions: str) -> None:
    """Copy the migrations ``versions`` (such as "0002") from next/ into the shipped app."""
    source = sandbox.root / PROJECT / "next"
    target = sandbox.root / PROJECT / "app" / "migrations"
    for version in versions:
        files = sorted(source.glob(f"{version}_*.sql"))
        assert len(files) == 2, files
        for path in files:
            shutil.copy2(path, target / path.name)


def host_statuses(result: dict[str, Any]) -> dict[str, str]:
    return {h["host"]: h["status"] for h in result["hosts"]}


@pytest.fixture
def hosts(ssh_hosts3: list[SshHost]) -> list[SshHost]:
    """Return web1 and web2 of the example inventory, in its order."""
    return ssh_hosts3[:2]


@pytest.fixture
def deployed(sandbox: Sandbox, hosts: list[SshHost]) -> Sandbox:
    """Return the sandbox after two good deploys: schema version 2 on both hosts."""
    first, result = deploy(sandbox)
    assert first.returncode == 0, first.stderr
    assert [schema_version(h) for h in hosts] == [1, 1]
    add_migrations(sandbox, "0002")
    second, result = deploy(sandbox)
    assert second.returncode == 0, second.stderr
    assert result["status"] == "success"
    return sandbox


def test_deploy_applies_new_migration(deployed: Sandbox, hosts: list[SshHost]) -> None:
    for host in hosts:
        assert schema_version(host) == 2
        assert "author" in column_names(host, "notes")
        assert len(releases(host)) == 2
        assert served_release(host) == current_release(host) == releases(host)[-1]


def test_health_failure_reverts_migration(deployed: Sandbox, hosts: list[SshHost]) -> None:
    web1, web2 = hosts
    good = current_release(web1)
    add_migrations(deployed, "0003")
    (deployed.root / PROJECT / "app" / "UNHEALTHY").touch()

    done, result = deploy(deployed)

    assert done.returncode == 1, done.stderr
    assert result["status"] == "rolled_back"
    # web1 is the canary batch: it migrated, switched, failed its check and was rolled back.
    # The run stopped there, so web2 never started a step.
    assert host_statuses(result) == {"web1": "rolled_back", "web2": "skipped"}
    for host in hosts:
        assert schema_version(host) == 2
        assert "tags" not in table_names(host)
        assert current_release(host) == good
        assert served_release(host) == good
    assert len(releases(web1)) == 3  # the failed release is kept for inspection
    assert len(releases(web2)) == 2


def test_failed_migration_changes_nothing(deployed: Sandbox, hosts: list[SshHost]) -> None:
    good = current_release(hosts[0])
    # 0003 is valid and 0004 fails halfway: both run in one transaction, so neither stays.
    add_migrations(deployed, "0003", "0004")

    done, result = deploy(deployed)

    assert done.returncode == 1, done.stderr
    assert result["status"] == "failed"
    assert host_statuses(result) == {"web1": "failed", "web2": "skipped"}
    assert "step 'migrate' exited 1" in result["hosts"][0]["error"]
    assert "no such column: pinned_at" in result["hosts"][0]["error"]
    for host in hosts:
        assert schema_version(host) == 2
        assert "tags" not in table_names(host)
        assert "pinned" not in column_names(host, "notes")
        assert current_release(host) == good
        assert served_release(host) == good


def test_run_migrations_off_skips_host(sandbox: Sandbox, hosts: list[SshHost]) -> None:
    web1, web2 = hosts
    inventory = sandbox.root / PROJECT / "inventories" / "prod.yaml"
    data = yaml.safe_load(inventory.read_text(encoding="utf-8"))
    data["hosts"]["web2"]["vars"]["run_migrations"] = False
    inventory.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    done, result = deploy(sandbox)

    assert done.returncode == 0, done.stderr
    assert host_statuses(result) == {"web1": "success", "web2": "success"}
    assert schema_version(web1) == 1
    assert not _database(web2).exists()
    history = sandbox.shell(f"fraisier show {result['run_id']} --env prod --json", cwd=PROJECT)
    assert history.returncode == 0, history.stderr
    assert "run_migrations is off on web2" in history.stdout

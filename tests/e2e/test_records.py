"""Deploys recorded in SQLite, PostgreSQL and MySQL, and secrets kept out of every output.

These runs use ``connection: local`` hosts and a recipe of plain commands, so they need no SSH
test host. The databases and the Pushgateway are real servers on loopback.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pymysql
import pytest
import yaml
from e2e_helpers import run_fraisier

SECRET = "s3cr3t-Token-" + secrets.token_hex(6)
DB_PASSWORD = "pw-" + secrets.token_hex(6)

RECIPE = {
    "description": "plain commands that print a secret and a fixed output",
    "steps": [
        {"name": "greet", "run": "echo hello {{ api_token }}; echo warn >&2"},
        {"name": "count", "run": "printf 'é漢🍓 %s\\n' 1 2 3"},
        {
            "name": "finish",
            "run": "test -z {{ fail }} || { echo failing {{ api_token }} >&2; exit 7; }",
        },
    ],
}


def _project(tmp_path: Path, environment: str, fail: bool) -> Path:
    root = tmp_path / environment
    (root / "inventories").mkdir(parents=True, exist_ok=True)
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "job.yaml").write_text(yaml.safe_dump(RECIPE))
    deploy_to = root / "deploy"
    inventory = (
        f"environment: {environment}\n"
        "hosts:\n  worker1:\n    connection: local\n  worker2:\n    connection: local\n"
        f"vars:\n  api_token: !secret {SECRET}\n  fail: '{'yes' if fail else ''}'\n"
        "fraises:\n"
        "  job:\n"
        "    type: etl\n"
        "    recipe: job\n"
        f'    deploy_to: "{deploy_to}/{{{{ host }}}}"\n'
    )
    (root / "inventories" / f"{environment}.yaml").write_text(inventory)
    return root


@pytest.fixture
def fresh_databases(postgres_url: str, mysql_url: str) -> Iterator[dict[str, str]]:
    """Create an empty database on the PostgreSQL and MariaDB servers, dropped afterwards."""
    name = "fraisier_rec_" + secrets.token_hex(4)
    pg = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    pg.autocommit = True
    my = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    with pg.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    with my.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield {
            "postgresql": f"postgresql://postgres@127.0.0.1:5432/{name}",
            "mysql": f"mysql://root@127.0.0.1:3306/{name}",
        }
    finally:
        with pg.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        with my.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        pg.close()
        my.close()


def _history(root: Path, environment: str, url: str) -> list[dict[str, Any]]:
    env = {"FRAISIER_DATABASE_URL": url}
    listing = run_fraisier(root, "history", "--env", environment, "--json", env=env)
    assert listing.returncode == 0, listing
    shaped = []
    for run in sorted(listing.json(), key=lambda r: r["started_at"]):
        shown = run_fraisier(root, "show", run["run_id"], "--json", env=env)
        assert shown.returncode == 0, shown
        detail = shown.json()
        shaped.append(
            {
                "status": run["status"],
                "exit_code": run["exit_code"],
                "error_code": run["error_code"],
                "hosts": sorted((h["host"], h["status"]) for h in detail["hosts"]),
                "steps": sorted(
                    (
                        s["host"],
                        s["name"],
                        s["status"],
                        s["exit_status"],
                        s["stdout_tail"],
                        s["stderr_tail"],
                    )
                    for s in detail["steps"]
                    if s["name"] not in ("connect",)
                ),
            }
        )
    return shaped


def test_same_history_on_three_databases(tmp_path: Path, fresh_databases: dict[str, str]) -> None:
    urls = {"sqlite": f"sqlite:///{tmp_path}/runs.db", **fresh_databases}
    histories = {}
    for kind, url in urls.items():
        environment = "rec" + kind[:2]
        env = {"FRAISIER_DATABASE_URL": url}
        ok = run_fraisier(
            _project(tmp_path, environment, fail=False), "deploy", "--env", environment, env=env
        )
        assert ok.returncode == 0, ok
        failed = run_fraisier(
            _project(tmp_path, environment, fail=True), "deploy", "--env", environment, env=env
        )
        assert failed.returncode == 1, failed
        histories[kind] = _history(tmp_path / environment, environment, url)

    assert [r["status"] for r in histories["sqlite"]] == ["success", "failed"]
    assert histories["sqlite"][1]["error_code"] == "command_failed"
    assert histories["postgresql"] == histories["sqlite"]
    assert histories["mysql"] == histories["sqlite"]

    steps = histories["sqlite"][0]["steps"]
    assert ("worker1", "count", "success", 0, "é漢🍓 1\né漢🍓 2\né漢🍓 3\n", "") in steps
    assert all(SECRET not in json.dumps(h, ensure_ascii=False) for h in histories.values())


def test_secret_stays_out_of_logs_rows_and_metrics(tmp_path: Path, pushgateway: Any) -> None:
    environment = "secrets"
    root = _project(tmp_path, environment, fail=True)
    database = tmp_path / "runs.db"
    log_file = tmp_path / "fraisier.jsonl"
    gateway = pushgateway.url.replace("http://", f"http://pusher:{DB_PASSWORD}@")
    env = {
        "FRAISIER_DATABASE_URL": f"sqlite:///{database}",
        "FRAISIER_PUSHGATEWAY_URL": gateway,
    }
    result = run_fraisier(
        root,
        "deploy",
        "--env",
        environment,
        "--log-format",
        "json",
        "--log-file",
        str(log_file),
        env=env,
    )
    assert result.returncode == 1, result

    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    assert DB_PASSWORD not in result.stderr
    log_text = log_file.read_text(encoding="utf-8")
    assert "step_end" in log_text
    assert SECRET not in log_text
    assert DB_PASSWORD not in log_text
    for line in log_text.splitlines():
        json.loads(line)

    with sqlite3.connect(database) as connection:
        tables = [
            r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        dump = "\n".join(connection.iterdump())
    assert {"runs", "run_hosts", "run_steps", "audit_events"} <= set(tables)
    assert "hello ***" in dump
    assert SECRET not in dump
    assert DB_PASSWORD not in dump

    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert f'environment="{environment}"' in metrics
    assert SECRET not in metrics
    assert DB_PASSWORD not in metrics


def test_config_change_is_audited_once(tmp_path: Path) -> None:
    environment = "audit"
    env = {"FRAISIER_DATABASE_URL": f"sqlite:///{tmp_path}/runs.db"}
    root = _project(tmp_path, environment, fail=False)
    kinds = []
    for change in (None, None, "renamed"):
        if change:
            recipe = dict(RECIPE, description=change)
            (root / "tasks" / "job.yaml").write_text(yaml.safe_dump(recipe))
        result = run_fraisier(root, "deploy", "--env", environment, "--json", env=env)
        assert result.returncode == 0, result
        run_id = result.json()[0]["run_id"]
        shown = run_fraisier(root, "show", run_id, "--json", env=env)
        assert shown.returncode == 0, shown
        events = shown.json()["events"]
        kinds.append([e["kind"] for e in events])
        if change:
            changed = next(e for e in events if e["kind"] == "config_changed")
            paths = [c["path"] for c in changed["detail"]["changes"]]
            assert paths == ["recipe.description"]
    assert "config_changed" in kinds[0]
    assert "config_changed" not in kinds[1]
    assert "config_changed" in kinds[2]
    assert all("run_started" in k and "run_ended" in k for k in kinds)

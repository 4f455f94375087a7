"""The history, status, show, db.migrate and db.sync tasks, run as the real ``fraisier`` program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from history_data import at, write_history
from support import free_port

from fraisier.db import database_identity, default_journal_path, open_store
from fraisier.db.recorder import Recorder
from fraisier.errors import ExitCode
from fraisier.records import RunRecord

pytestmark = pytest.mark.database

REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRAM = "import sys; from fraisier.cli import main; sys.argv[0] = 'fraisier'; main()"


def _project(tmp_path: Path, database: str | None) -> Path:
    root = tmp_path / "project"
    (root / "inventories").mkdir(parents=True)
    settings = {"database": database} if database else {}
    inventory = {"environment": "prod", "settings": settings, "hosts": {}}
    (root / "inventories" / "prod.yaml").write_text(yaml.safe_dump(inventory))
    return root


def _fraisier(root: Path, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_DATABASE")}
    environ.update(env or {}, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *args],
        cwd=root,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_history_status_show(databases, dialect, tmp_path):
    store = databases.store(dialect)
    write_history(store)
    # The shared test servers need no password, so the redacted URL is the whole URL.
    root = _project(tmp_path, store.url.redacted())
    env: dict[str, str] = {}

    table = _fraisier(root, "history", "--env", "prod", env=env)
    as_json = _fraisier(root, "history", "--env", "prod", "--limit", "2", "--json", env=env)
    status = _fraisier(root, "status", "--env", "prod", env=env)
    show = _fraisier(root, "show", "run-2", "--env", "prod", env=env)
    show_json = _fraisier(root, "show", "run-2", "--env", "prod", "--json", env=env)
    default_database = _fraisier(root, "show", "run-2", env=env)

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STARTED", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["run-5", "run-4", "run-3", "run-2", "run-1"]
    assert [r["run_id"] for r in json.loads(as_json.stdout)] == ["run-5", "run-4"]
    assert status.returncode == 0, status.stderr
    assert "api     web1  rel-1" in status.stdout
    assert "last run:" in status.stdout
    # Without --env the tasks read the project's default SQLite file, which no run has used
    # yet: it is created empty, so the run is not found there.
    assert default_database.returncode == ExitCode.CONFIGURATION
    assert "run 'run-2' not found" in default_database.stderr
    assert show.returncode == 0, show.stderr
    assert "run run-2: deploy of api to prod, rolled_back" in show.stdout
    assert "rollback reason: health_check" in show.stdout
    assert "health_check_failed" in show.stdout
    detail = json.loads(show_json.stdout)
    assert [s["name"] for s in detail["steps"]] == ["fetch", "build", "switch", "health_check"]
    assert detail["run"]["started_at"] == at(100).isoformat()


def test_show_unknown_run(tmp_path):
    root = _project(tmp_path, "sqlite:///var/runs.db")
    assert _fraisier(root, "db.migrate").returncode == 0

    result = _fraisier(root, "show", "nope")

    assert result.returncode == ExitCode.CONFIGURATION
    assert "run 'nope' not found" in result.stderr


def test_migrate_then_up_to_date(tmp_path):
    root = _project(tmp_path, None)

    first = _fraisier(root, "db.migrate")
    second = _fraisier(root, "db.migrate")

    assert first.returncode == 0, first.stderr
    assert "applied migration(s) 1, 2" in first.stdout
    assert (root / "var" / "fraisier.db").exists()
    assert "up to date at schema version 2" in second.stdout


def test_unreachable_database_exits_5(tmp_path):
    url = f"postgresql://deploy:Cli-Secret-9@127.0.0.1:{free_port()}/runs"
    root = _project(tmp_path, url)

    result = _fraisier(root, "history", "--env", "prod")

    assert result.returncode == ExitCode.DATABASE
    assert "Cli-Secret-9" not in result.stderr
    assert "deploy:***@127.0.0.1" in result.stderr


def test_invalid_url_exits_2(tmp_path):
    root = _project(tmp_path, "oracle://deploy@db/runs")

    result = _fraisier(root, "status", "--env", "prod")

    assert result.returncode == ExitCode.CONFIGURATION
    assert "unsupported database URL scheme 'oracle'" in result.stderr


def test_newer_schema_exits_5(tmp_path):
    root = _project(tmp_path, "sqlite:///var/runs.db")
    assert _fraisier(root, "db.migrate", "--env", "prod").returncode == 0
    store = open_store(f"sqlite:///{root / 'var' / 'runs.db'}")
    store._execute(
        lambda cur: store._run(
            cur, "INSERT INTO schema_version VALUES (?, ?)", (99, store._to_db_time(at(0)))
        ),
        write=True,
        what="test insert",
    )
    store.close()

    result = _fraisier(root, "db.migrate", "--env", "prod")

    assert result.returncode == ExitCode.DATABASE
    assert "upgrade Fraisier" in result.stderr


def test_sync_replays_journal(databases, dialect, tmp_path):
    url = databases.url(dialect)
    root = _project(tmp_path, None)
    down = f"mysql://root@127.0.0.1:{free_port()}/nothing"
    # The records were journaled for ``url`` while its server could not be reached.
    recorder = Recorder(lambda: open_store(down), default_journal_path(root, url))
    recorder.save_run(RunRecord("run-j", "prod", "api", "deploy", at(0), "success"))
    recorder.save_run(RunRecord("run-k", "prod", "api", "deploy", at(5), "failed"))
    other = f"sqlite:///{tmp_path}/other.db"

    offline = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": down})
    elsewhere = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": other})
    online = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": url})
    again = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": url})

    assert offline.returncode == ExitCode.DATABASE
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "nothing to replay" in elsewhere.stdout
    assert f"{default_journal_path(root, url)} holds 2 record(s)" in elsewhere.stdout
    assert online.returncode == 0, online.stderr
    assert "replayed 2 journaled record(s)" in online.stdout
    assert "replayed 2" not in again.stdout
    assert "holds" not in again.stdout
    store = open_store(url)
    assert [r.run_id for r in store.list_runs("prod")] == ["run-k", "run-j"]
    store.close()


def test_sync_same_database_other_spelling(tmp_path):
    root = _project(tmp_path, None)
    url = f"sqlite:///{tmp_path}/runs.db"
    spelled = f"sqlite:///{tmp_path}/runs.db?connect_timeout=9"
    recorder = Recorder(
        lambda: open_store(f"mysql://root@127.0.0.1:{free_port()}/x"),
        default_journal_path(root, url),
    )
    recorder.save_run(RunRecord("run-s", "prod", "api", "deploy", at(0), "success"))

    result = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": spelled})

    assert default_journal_path(root, url) == default_journal_path(root, spelled)
    assert result.returncode == 0, result.stderr
    assert "replayed 1 journaled record(s)" in result.stdout


def test_sync_named_journal_file(tmp_path):
    root = _project(tmp_path, None)
    misspelled = f"sqlite:///{tmp_path}/typo.db"
    url = f"sqlite:///{tmp_path}/runs.db"
    journal = default_journal_path(root, misspelled)
    recorder = Recorder(
        lambda: open_store(f"mysql://root@127.0.0.1:{free_port()}/x"),
        journal,
        database=database_identity(misspelled),
    )
    recorder.save_run(RunRecord("run-t", "prod", "api", "deploy", at(0), "success"))

    plain = _fraisier(root, "db.sync", env={"FRAISIER_DATABASE_URL": url})
    named = _fraisier(
        root, "db.sync", "--journal", str(journal), env={"FRAISIER_DATABASE_URL": url}
    )
    missing = _fraisier(
        root,
        "db.sync",
        "--journal",
        str(tmp_path / "nope.jsonl"),
        env={"FRAISIER_DATABASE_URL": url},
    )

    assert f"fraisier db.sync --journal {journal}" in plain.stdout
    assert f"journaled for sqlite:{tmp_path}/typo.db, not for sqlite:{tmp_path}/runs.db" in (
        plain.stdout
    )
    assert named.returncode == 0, named.stderr
    assert "replayed 1 journaled record(s)" in named.stdout
    store = open_store(url)
    assert [r.run_id for r in store.list_runs("prod")] == ["run-t"]
    store.close()
    assert missing.returncode == ExitCode.CONFIGURATION
    assert "not found" in missing.stderr


def test_history_error_as_json_line(tmp_path):
    import json

    root = _project(tmp_path, "oracle://nobody@127.0.0.1/x")

    result = _fraisier(root, "history", "--env", "prod", env={"FRAISIER_LOG_FORMAT": "json"})

    assert result.returncode == ExitCode.CONFIGURATION
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert [line["error_code"] for line in lines] == ["configuration_error"]
    assert "unsupported database URL scheme 'oracle'" in lines[0]["message"]

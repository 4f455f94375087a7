"""Database URL parsing, resolution and redaction; these tests need no database server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fraisier.db import default_journal_path, open_store, resolve_database_url
from fraisier.db.url import parse_database_url
from fraisier.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/runs.db", {"dialect": "sqlite", "path": Path("var/runs.db")}),
        ("sqlite:////srv/runs.db", {"dialect": "sqlite", "path": Path("/srv/runs.db")}),
        (
            "postgresql://deploy:p%40ss@db.internal:6432/fraisier",
            {"dialect": "postgresql", "host": "db.internal", "port": 6432, "user": "deploy",
             "password": "p@ss", "database": "fraisier"},
        ),
        (
            "postgres://deploy@127.0.0.1/runs?sslmode=require",
            {"dialect": "postgresql", "port": 5432, "password": None,
             "options": {"sslmode": "require"}},
        ),
        (
            "mysql://root@127.0.0.1/test?connect_timeout=2.5",
            {"dialect": "mysql", "port": 3306, "database": "test", "connect_timeout": 2.5},
        ),
    ],
)  # fmt: skip
def test_parse_valid_urls(url, expected, monkeypatch):
    monkeypatch.delenv("FRAISIER_DATABASE_PASSWORD", raising=False)

    parsed = parse_database_url(url)

    for name, value in expected.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("runs.db", "invalid database URL"),
        ("oracle://u:Pw-Secret-1@h/db", "unsupported database URL scheme 'oracle'"),
        ("postgresql://u:Pw-Secret-1@h", "needs a host and a database name"),
        ("mysql://u:Pw-Secret-1@h:99999/db", "invalid database URL"),
        ("mysql://u:Pw-Secret-1@h/db?sslmode=x", "unsupported query parameter(s) sslmode"),
        ("sqlite://host/runs.db", "three or four slashes"),
        ("sqlite:///", "path is empty"),
        ("postgresql://u:Pw-Secret-1@h/db?connect_timeout=-1", "invalid connect_timeout"),
    ],
)
def test_invalid_urls_raise_without_password(url, message):
    with pytest.raises(ConfigurationError) as caught:
        parse_database_url(url)

    assert message in str(caught.value)
    assert "Pw-Secret-1" not in str(caught.value)


def test_password_sources_in_order(tmp_path, monkeypatch):
    secret_file = tmp_path / "pw"
    secret_file.write_text("From-File-55\n")
    monkeypatch.setenv("FRAISIER_DATABASE_PASSWORD", "From-Env-66")
    base = "postgresql://deploy{}@127.0.0.1/runs"

    in_url = parse_database_url(base.format(":From-Url-44") + f"?password_file={secret_file}")
    from_file = parse_database_url(base.format("") + f"?password_file={secret_file}")
    from_env = parse_database_url(base.format(""))

    assert in_url.password == "From-Url-44"
    assert from_file.password == "From-File-55"
    assert from_env.password == "From-Env-66"
    assert "From-Url-44" not in repr(in_url)
    assert in_url.redacted() == "postgresql://deploy:***@127.0.0.1:5432/runs"


def test_missing_password_file_is_named(tmp_path):
    missing = tmp_path / "nope"

    with pytest.raises(
        ConfigurationError, match=f"cannot read the database password file {missing}"
    ):
        parse_database_url(f"mysql://root@127.0.0.1/test?password_file={missing}")


def test_resolve_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)

    assert resolve_database_url(None, tmp_path) == f"sqlite:///{tmp_path}/var/fraisier.db"
    assert resolve_database_url("sqlite:///data/runs.db", tmp_path) == (
        f"sqlite:///{tmp_path}/data/runs.db"
    )
    assert resolve_database_url("mysql://root@h/db", tmp_path) == "mysql://root@h/db"
    monkeypatch.setenv("FRAISIER_DATABASE_URL", "postgresql://env@h/db")
    assert resolve_database_url("mysql://root@h/db", tmp_path) == "postgresql://env@h/db"


def test_resolve_rejects_non_string(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)

    with pytest.raises(ConfigurationError, match=r"invalid settings\.database value 42"):
        resolve_database_url(42, tmp_path)


def test_default_journal_path(tmp_path):
    first = default_journal_path(tmp_path, "postgresql://u@127.0.0.1:5432/one")
    second = default_journal_path(tmp_path, "postgresql://u@127.0.0.1:5432/two")

    assert first.parent == tmp_path / "var"
    assert first.name.startswith("journal-")
    assert first.suffix == ".jsonl"
    assert first != second
    assert default_journal_path(tmp_path, "postgresql://u@127.0.0.1:5432/one") == first


def test_import_loads_no_server_driver():
    code = (
        "import sys, fraisier.db\n"
        "from fraisier.db import open_store\n"
        "open_store('sqlite:////tmp/fraisier-import-check.db')\n"
        "print(sorted(m for m in ('psycopg2', 'pymysql') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
    )

    assert result.stdout.strip() == "[]"


def test_open_store_chooses_driver():
    assert type(open_store("sqlite:////tmp/x.db")).__name__ == "SQLiteRunStore"
    assert type(open_store("postgres://u@h/db")).__name__ == "PostgresRunStore"
    assert type(open_store("mysql://u@h/db")).__name__ == "MySQLRunStore"


@pytest.mark.parametrize(
    "url", ["postgresql://deploy:Hunter2-secret@h/db", "mysql://deploy:Hunter2-secret@h/db"]
)
def test_store_repr_hides_password(url):
    store = open_store(url)

    assert "Hunter2-secret" not in repr(store)
    assert "deploy:***@h" in repr(store)

"""The run database: choosing a driver by URL, and finding the URL of a project.

The PostgreSQL and MySQL drivers are imported only when their URL is opened, so importing
this package loads neither psycopg2 nor PyMySQL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fraisier.db.base import HostRelease, RunDetail, RunStats, RunStore
from fraisier.db.url import DatabaseURL, parse_database_url
from fraisier.errors import ConfigurationError

__all__ = [
    "DATABASE_URL_ENV",
    "DatabaseURL",
    "HostRelease",
    "RunDetail",
    "RunStats",
    "RunStore",
    "database_identity",
    "default_journal_path",
    "open_store",
    "parse_database_url",
    "resolve_database_url",
]

DATABASE_URL_ENV = "FRAISIER_DATABASE_URL"


def open_store(url: str) -> RunStore:
    """Open the run store of a URL without connecting yet; the first query connects.

    Raises ConfigurationError for an invalid URL or a driver that is not installed.
    """
    parsed = parse_database_url(url)
    if parsed.dialect == "sqlite":
        from fraisier.db.sqlite import SQLiteRunStore

        return SQLiteRunStore(parsed)
    if parsed.dialect == "postgresql":
        try:
            from fraisier.db.postgres import PostgresRunStore
        except ImportError as exc:
            raise _missing_driver("psycopg2-binary", "postgres", exc) from None
        return PostgresRunStore(parsed)
    try:
        from fraisier.db.mysql import MySQLRunStore
    except ImportError as exc:
        raise _missing_driver("PyMySQL", "mysql", exc) from None
    return MySQLRunStore(parsed)


def _missing_driver(package: str, extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"the database driver {package} is not installed ({exc}); install it with "
        f"`pip install 'fraisier[{extra}]'`"
    )


def resolve_database_url(setting: str | None, project_root: Path) -> str:
    """Return the database URL: FRAISIER_DATABASE_URL, else the inventory setting, else SQLite.

    The default is ``sqlite:///<project_root>/var/fraisier.db``. A relative SQLite path is made
    absolute against ``project_root``, so the tasks find the same file from any directory.
    """
    url = os.environ.get(DATABASE_URL_ENV) or setting
    if url is not None and not isinstance(url, str):
        raise ConfigurationError(
            f"invalid settings.database value {url!r}: expected a URL string such as "
            "sqlite:///var/fraisier.db"
        )
    if not url:
        return f"sqlite:///{(Path(project_root) / 'var' / 'fraisier.db').absolute()}"
    parsed = parse_database_url(url)
    if parsed.dialect == "sqlite" and parsed.path is not None and not parsed.path.is_absolute():
        absolute = (Path(project_root) / parsed.path).absolute()
        query = url.partition("?")[2]
        return f"sqlite:///{absolute}" + (f"?{query}" if query else "")
    return url


def database_identity(url: str) -> str:
    """Return what names one database in a URL: dialect, host, port and database, or the file.

    User, password and options such as ``connect_timeout`` are left out, so two spellings of
    one database's URL give the same identity.
    """
    parsed = parse_database_url(url)
    if parsed.dialect == "sqlite" and parsed.path is not None:
        return f"sqlite:{parsed.path.absolute()}"
    host = (parsed.host or "").lower()
    return f"{parsed.dialect}://{host}:{parsed.port}/{parsed.database}"


def default_journal_path(project_root: Path, url: str) -> Path:
    """Return the journal of one database: ``<project_root>/var/journal-<digest>.jsonl``.

    Each database has its own journal, named by a digest of ``database_identity``, so records
    journaled for one database are never replayed into another.
    """
    digest = hashlib.sha256(database_identity(url).encode("utf-8")).hexdigest()[:12]
    return Path(project_root) / "var" / f"journal-{digest}.jsonl"

"""Parsing of run database URLs, with the password kept out of every repr and message."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from fraisier.errors import ConfigurationError
from fraisier.redact import redact, register_secret

PASSWORD_ENV = "FRAISIER_DATABASE_PASSWORD"
SCHEMES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
# Query parameters that the URL parser reads itself; PostgreSQL passes any other one to libpq.
_OWN_OPTIONS = {"password_file", "connect_timeout"}


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """A parsed run database URL; ``password`` is excluded from repr and ``redacted()``."""

    dialect: str  # sqlite, postgresql or mysql
    path: Path | None = None  # SQLite only
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    database: str | None = None
    connect_timeout: float = 5.0
    options: dict[str, str] = dataclasses.field(default_factory=dict)

    def redacted(self) -> str:
        """Format the URL with the password replaced by ``***``."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        credentials = self.user or ""
        if self.password:
            credentials += ":***"
        if credentials:
            credentials += "@"
        return f"{self.dialect}://{credentials}{self.host}:{self.port}/{self.database}"

    def __str__(self) -> str:
        return self.redacted()


def parse_database_url(url: str) -> DatabaseURL:
    """Parse a run database URL and load its password from the URL, a file or the environment.

    The password comes from the URL itself, else from the file named by the ``password_file``
    query parameter, else from the ``FRAISIER_DATABASE_PASSWORD`` environment variable. Every
    password found is registered with ``fraisier.redact`` so that later log lines mask it.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"invalid database URL {redact(url)!r}: expected sqlite:///PATH, "
            "postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid database URL {redact(url)!r}: {exc}") from None
    if parts.password:
        register_secret(unquote(parts.password))
    scheme = parts.scheme.lower()
    dialect = SCHEMES.get(scheme)
    if dialect is None:
        raise ConfigurationError(
            f"unsupported database URL scheme {scheme!r} in {redact(url)!r}: "
            f"use one of {', '.join(sorted(SCHEMES))}"
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    connect_timeout = _parse_timeout(options.get("connect_timeout"), url)
    if dialect == "sqlite":
        return _parse_sqlite(parts.netloc, parts.path, options, url)

    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database:
        raise ConfigurationError(
            f"invalid database URL {redact(url)!r}: a {dialect} URL needs a host and a "
            f"database name, as in {dialect}://USER@HOST:PORT/DATABASE"
        )
    password = unquote(parts.password) if parts.password else None
    if password is None and "password_file" in options:
        password = _read_password_file(options["password_file"])
    if password is None:
        password = os.environ.get(PASSWORD_ENV) or None
    register_secret(password)
    extra = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
    if dialect == "mysql" and extra:
        raise ConfigurationError(
            f"unsupported query parameter(s) {', '.join(sorted(extra))} in the MySQL URL "
            f"{redact(url)!r}: only password_file and connect_timeout are read"
        )
    return DatabaseURL(
        dialect=dialect,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[dialect],
        user=unquote(parts.username) if parts.username else None,
        password=password,
        database=database,
        connect_timeout=connect_timeout,
        options=extra,
    )


def _parse_sqlite(netloc: str, path: str, options: dict[str, str], url: str) -> DatabaseURL:
    if netloc:
        raise ConfigurationError(
            f"invalid SQLite URL {url!r}: use sqlite:///relative/path or "
            "sqlite:////absolute/path (three or four slashes)"
        )
    # sqlite:///rel -> path "/rel" and sqlite:////abs -> path "//abs".
    file_path = unquote(path[1:]) if path.startswith("/") else unquote(path)
    if not file_path:
        raise ConfigurationError(f"invalid SQLite URL {url!r}: the database file path is empty")
    extra = {k: v for k, v in options.items() if k != "connect_timeout"}
    if extra:
        raise ConfigurationError(
            f"unsupported query parameter(s) {', '.join(sorted(extra))} in the SQLite URL "
            f"{url!r}: only connect_timeout is read"
        )
    return DatabaseURL(
        dialect="sqlite",
        path=Path(file_path),
        connect_timeout=_parse_timeout(options.get("connect_timeout"), url),
    )


def _parse_timeout(value: str | None, url: str) -> float:
    if value is None:
        return 5.0
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if timeout <= 0:
        raise ConfigurationError(
            f"invalid connect_timeout {value!r} in the database URL {redact(url)!r}: "
            "use a positive number of seconds"
        )
    return timeout


def _read_password_file(name: str) -> str:
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the database password file {path}: {exc.strerror}; "
            "check the password_file parameter of the database URL"
        ) from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigurationError(f"the database password file {path} is empty")
    return password

"""Versioned schema migrations: one SQL file per version and dialect.

A file is named ``NNNN_description.DIALECT.sql``. Statements are separated by a semicolon at the
end of a line, and lines that start with ``--`` are comments.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).parent
DIALECTS = ("sqlite", "postgresql", "mysql")
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.(?P<dialect>[a-z]+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    """One schema version of one dialect, as the list of statements that create it."""

    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(text: str) -> tuple[str, ...]:
    """Split SQL text into statements at semicolons that end a line, dropping comment lines."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    statements = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";"))
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return tuple(s for s in statements if s)


@cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """Return the migrations of a dialect in version order."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}: expected one of {DIALECTS}")
    found = []
    for path in MIGRATIONS_DIR.glob(f"*.{dialect}.sql"):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path} does not match NNNN_name.{dialect}.sql")
        statements = split_statements(path.read_text(encoding="utf-8"))
        found.append(Migration(int(match["version"]), match["name"], statements))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"{dialect} migrations in {MIGRATIONS_DIR} skip a version: {versions}")
    return tuple(found)


def latest_version() -> int:
    """Return the schema version that this code writes and reads."""
    counts = {len(load_migrations(dialect)) for dialect in DIALECTS}
    if len(counts) != 1:
        raise ValueError(f"the dialects in {MIGRATIONS_DIR} have different numbers of migrations")
    return counts.pop()

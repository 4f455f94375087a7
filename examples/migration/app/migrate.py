"""Apply or revert the SQL migrations in migrations/ to the service's SQLite database.

Each migration is a pair of files, NNNN_name.up.sql and NNNN_name.down.sql, where NNNN is its
version. The table schema_migrations stores the applied versions, and the schema version is
the highest of them, or 0. Every command runs in one transaction. SQLite's DDL is
transactional, so a statement that fails leaves the database as it was before the command.

    python3 migrate.py up             apply every pending migration
    python3 migrate.py down --to N    revert the applied migrations above version N
    python3 migrate.py head           print the highest version this release ships
    python3 migrate.py version        print the database's schema version

The database is data/app.db next to this script (a link into the fraise's shared/ folder on a
host), or the file that --db or the environment variable APP_DATABASE names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sqlite3
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIGRATIONS = HERE / "migrations"
FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[a-z0-9_]+)\.(?P<direction>up|down)\.sql$")


@dataclasses.dataclass
class Migration:
    version: int
    name: str
    up: Path
    down: Path


class MigrationError(Exception):
    """A migration file is missing or invalid, or the database cannot be migrated."""


def load_migrations(folder: Path = MIGRATIONS) -> list[Migration]:
    """Read the migration pairs of ``folder`` in version order, each with its up and down file."""
    found: dict[int, dict[str, Path]] = {}
    names: dict[int, str] = {}
    for path in sorted(folder.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"invalid migration file name {path.name}: use NNNN_name.up.sql")
        version = int(match["version"])
        if names.setdefault(version, match["name"]) != match["name"]:
            raise MigrationError(f"two migrations have version {version} in {folder}")
        found.setdefault(version, {})[match["direction"]] = path
    migrations = []
    for version in sorted(found):
        pair = found[version]
        if "up" not in pair or "down" not in pair:
            missing = "down" if "up" in pair else "up"
            raise MigrationError(f"migration {version} in {folder} has no {missing}.sql file")
        migrations.append(Migration(version, names[version], pair["up"], pair["down"]))
    return migrations


def connect(path: Path) -> sqlite3.Connection:
    """Open the database in autocommit mode, so that this module controls each transaction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')))"
    )
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(row[0])


def applied_versions(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def run_in_transaction(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script`` between BEGIN IMMEDIATE and COMMIT, and roll it all back on any error.

    executescript() would commit an open transaction first, so the script carries its own
    BEGIN and COMMIT, and a failed statement stops it with the transaction still open.
    """
    try:
        conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _sql(path: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    return text if text.endswith(";") else text + ";"


def migrate_up(conn: sqlite3.Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply every migration not yet applied, in one transaction, and return those."""
    done = set(applied_versions(conn))
    pending = [m for m in migrations if m.version not in done]
    if not pending:
        return []
    script = "\n".join(
        f"{_sql(m.up)}\nINSERT INTO schema_migrations (version, name) VALUES ({m.version}, "
        f"'{m.name}');"
        for m in pending
    )
    run_in_transaction(conn, script)
    return pending


def migrate_down(conn: sqlite3.Connection, migrations: list[Migration], target: int) -> list[int]:
    """Revert the applied migrations above ``target``, newest first, in one transaction.

    Raises MigrationError when an applied version has no down file in this release, because
    only the release that added a migration ships the SQL that reverts it.
    """
    known = {m.version: m for m in migrations}
    doomed = [v for v in reversed(applied_versions(conn)) if v > target]
    unknown = [v for v in doomed if v not in known]
    if unknown:
        raise MigrationError(
            f"the database has migrations {unknown} that this release does not ship; run "
            "'migrate.py down' from the release that added them"
        )
    if not doomed:
        return []
    script = "\n".join(
        f"{_sql(known[v].down)}\nDELETE FROM schema_migrations WHERE version = {v};" for v in doomed
    )
    run_in_transaction(conn, script)
    return doomed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply or revert the service's SQL migrations.")
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get("APP_DATABASE", HERE / "data" / "app.db")),
        help="SQLite database file (default: $APP_DATABASE, else data/app.db next to this script)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="apply every pending migration")
    down = commands.add_parser("down", help="revert the applied migrations above a version")
    down.add_argument("--to", type=int, required=True, help="schema version to go back to")
    commands.add_parser("head", help="print the highest version this release ships")
    commands.add_parser("version", help="print the database's schema version")
    args = parser.parse_args(argv)

    try:
        migrations = load_migrations()
        if args.command == "head":
            print(migrations[-1].version if migrations else 0)
            return 0
        conn = connect(args.db)
        try:
            before = schema_version(conn)
            if args.command == "version":
                print(before)
                return 0
            if args.command == "up":
                changed = [f"{m.version:04d}_{m.name}" for m in migrate_up(conn, migrations)]
                verb = "applied"
            else:
                changed = [str(v) for v in migrate_down(conn, migrations, args.to)]
                verb = "reverted"
            after = schema_version(conn)
        finally:
            conn.close()
    except (MigrationError, sqlite3.Error, OSError) as exc:
        print(
            f"migrate.py {args.command} failed: {exc}; the database was not changed",
            file=sys.stderr,
        )
        return 1
    if changed:
        print(f"{verb} {', '.join(changed)}: schema version {before} -> {after} in {args.db}")
    else:
        print(f"nothing to do: schema version {after} in {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the cost of recording one step and one host result on each run database.

Usage: python bench/record_cost.py [--iterations N] [--postgres URL] [--mysql URL] [--only NAME]

For PostgreSQL and MySQL the script creates a database ``fraisier_bench_<random>`` on the
server of the URL and drops it at the end; SQLite uses a file in a temp dir. Each iteration
saves one new step and upserts one host record, as the engine does after each step, and the
script prints the median and 95th percentile of each call in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fraisier.db import open_store
from fraisier.records import HostRecord, RunRecord, StepRecord

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL = "mysql://root@127.0.0.1:3306/test"


@contextlib.contextmanager
def bench_database(url: str) -> Iterator[str]:
    """Create a scratch database on the server of ``url``, yield its URL, then drop it."""
    parts = urlsplit(url)
    name = f"fraisier_bench_{secrets.token_hex(4)}"
    if parts.scheme.startswith("postgres"):
        import psycopg2

        admin = psycopg2.connect(url, connect_timeout=5)
        admin.autocommit = True
        drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    else:
        import pymysql

        admin = pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            autocommit=True,
            connect_timeout=5,
        )
        drop = f"DROP DATABASE IF EXISTS {name}"
    try:
        admin.cursor().execute(f"CREATE DATABASE {name}")
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin.cursor().execute(drop)
        admin.close()


def measure(url: str, iterations: int) -> dict[str, list[float]]:
    """Return the microseconds of each save_step and save_host call."""
    store = open_store(url)
    store.migrate()
    start = dt.datetime.now(dt.timezone.utc)
    store.save_run(RunRecord("bench-run", "bench", "api", "deploy", start))
    timings: dict[str, list[float]] = {"save_step": [], "save_host": []}
    output = "line of build output\n" * 200
    for i in range(iterations):
        step = StepRecord(
            "bench-run",
            f"web{i % 10}",
            i,
            "build",
            "success",
            start,
            start + dt.timedelta(seconds=1),
            stdout_tail=output[-4096:],
        )
        host = HostRecord("bench-run", f"web{i % 10}", "running", "rel-0", "rel-1", None, start)
        began = time.perf_counter()
        store.save_step(step)
        middle = time.perf_counter()
        store.save_host(host)
        ended = time.perf_counter()
        timings["save_step"].append((middle - began) * 1e6)
        timings["save_host"].append((ended - middle) * 1e6)
    store.close()
    return timings


def percentile(values: list[float], fraction: float) -> float:
    """Return the value below which ``fraction`` of the sorted values lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    """Run the benchmark on each database and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000, help="records per database")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL server URL")
    parser.add_argument("--mysql", default=DEFAULT_MYSQL, help="MySQL or MariaDB server URL")
    parser.add_argument("--only", choices=("sqlite", "postgresql", "mysql"), action="append")
    args = parser.parse_args()
    chosen = args.only or ["sqlite", "postgresql", "mysql"]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in chosen:
            results["SQLite (WAL)"] = measure(f"sqlite:///{tmp}/bench.db", args.iterations)
        if "postgresql" in chosen:
            with bench_database(args.postgres) as url:
                results["PostgreSQL"] = measure(url, args.iterations)
        if "mysql" in chosen:
            with bench_database(args.mysql) as url:
                results["MySQL/MariaDB"] = measure(url, args.iterations)

    print(f"{args.iterations} iterations; microseconds per call")
    print(f"{'database':<16}{'call':<11}{'median':>9}{'p95':>9}")
    for name, timings in results.items():
        for call, values in timings.items():
            median = statistics.median(values)
            print(f"{name:<16}{call:<11}{median:>9.0f}{percentile(values, 0.95):>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

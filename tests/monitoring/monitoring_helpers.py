"""Helpers of the monitoring tests: a SQLite run store, recorded runs, sample lookups and
an HTTP server with a fixed response.

The test modules import this module by name, never ``conftest``, because every test folder
has its own ``conftest`` module and Python keeps only one module of that name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import itertools
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fraisier.db.base import RunStats, RunStore
from fraisier.db.sqlite import SQLiteRunStore
from fraisier.db.url import parse_database_url
from fraisier.records import HostRecord, RunRecord, StepRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING_DIR = REPO_ROOT / "monitoring"

# Steps of the test recipe, with their duration in seconds on the first host; the second host
# takes one second longer for each step.
RECIPE_STEPS = (("upload", 2.0), ("build", 5.0), ("switch", 0.5), ("health_check", 1.5))


@dataclasses.dataclass
class RecordedRun:
    """A run saved in the store, with the arguments push_run_metrics needs."""

    run: RunRecord
    hosts: list[HostRecord]
    steps: list[StepRecord]
    stats: RunStats


def open_test_store(path: Path) -> RunStore:
    """Open and migrate a SQLite run store at ``path``."""
    run_store = SQLiteRunStore(parse_database_url(f"sqlite:///{path}"))
    run_store.migrate()
    return run_store


class RunWriter:
    """Saves fabricated deploy runs in a store, as the deploy engine would at the end of a run.

    ``writer(status, environment="prod", fraise="api", ...)`` saves a run that ended with
    ``status`` on two hosts, ``web1`` and ``web2``, with the steps of ``RECIPE_STEPS``, and
    returns the records with ``store.run_stats`` read after the save. Without ``started_at``,
    each call starts one hour after the previous one, counted from 2026-01-05 08:00 UTC.
    """

    base = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc)

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._counter = itertools.count(1)

    def __call__(
        self,
        status: str,
        environment: str = "prod",
        fraise: str = "api",
        duration: float = 40.0,
        error_code: str | None = None,
        rollback_reason: str | None = None,
        task: str = "deploy",
        started_at: dt.datetime | None = None,
    ) -> RecordedRun:
        number = next(self._counter)
        started = started_at or self.base + dt.timedelta(hours=number)
        ended = started + dt.timedelta(seconds=duration)

        run_id = f"run-{environment}-{fraise}-{number}"
        run = RunRecord(
            run_id=run_id,
            environment=environment,
            fraise=fraise,
            task=task,
            started_at=started,
            status=status,
            release_id=f"r{number}",
            ended_at=ended,
            error_code=error_code,
            rollback_reason=rollback_reason,
        )
        second_host_status = {"success": "success", "rolled_back": "rolled_back"}.get(
            status, "failed"
        )
        hosts = [
            HostRecord(run_id, "web1", status="rolled_back" if status == "rolled_back" else
                       "success", started_at=started, ended_at=ended),
            HostRecord(run_id, "web2", status=second_host_status, started_at=started,
                       ended_at=ended, error_code=error_code),
        ]  # fmt: skip

        steps = []
        for index, host in enumerate(("web1", "web2")):
            at = started
            for position, (name, seconds) in enumerate(RECIPE_STEPS, start=1):
                end = at + dt.timedelta(seconds=seconds + index)
                steps.append(StepRecord(run_id, host, position, name, "success", at, end))
                at = end

        self.store.save_run(run)
        for host in hosts:
            self.store.save_host(host)
        for step in steps:
            self.store.save_step(step)
        stats = self.store.run_stats(environment, fraise)
        return RecordedRun(run, hosts, steps, stats)


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parse text-format metrics into (sample name, labels, value) tuples."""
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return samples


def sample_value(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float | None:
    """Return the value of the one sample named ``name`` whose labels include ``labels``."""
    found = [
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    ]
    if len(found) > 1:
        raise AssertionError(f"{len(found)} samples of {name} match {labels}; expected one")
    return found[0] if found else None


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    status = 400
    body = b"pushed metrics are invalid or inconsistent with existing metrics"
    requests: list[dict[str, str]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("Authorization", ""),
            }
        )
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_PUT = do_GET = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


@dataclasses.dataclass
class StatusServer:
    """A loopback HTTP server that returns one status and body for every request."""

    url: str
    requests: list[dict[str, str]]


def make_status_handler(
    status: int, body: bytes, requests: list[dict[str, str]]
) -> type[http.server.BaseHTTPRequestHandler]:
    """Make a request handler class that returns ``status`` and ``body`` and logs requests."""
    return type(
        "StatusHandler", (_StatusHandler,), {"status": status, "body": body, "requests": requests}
    )

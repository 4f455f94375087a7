"""Prometheus metrics of deploy runs: the pushed end-of-run group and the run-database exporter.

Every metric is defined once in ``METRICS``. A push sends one group per (environment, fraise)
with the grouping key ``job="fraisier"``, ``environment`` and ``fraise``, so pushed series carry
no ``environment`` or ``fraise`` label of their own: the Pushgateway adds them from the grouping
key. The exporter (``StoreCollector``) serves the same names with ``environment`` and ``fraise``
labels, so one PromQL selector such as ``{environment="prod"}`` matches both sources.

Cumulative totals (counters and histograms) are computed from the run database on every push,
because a counter created fresh in each deploy process would be pushed as 1 every time.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import pushadd_to_gateway
from prometheus_client.registry import Collector

from fraisier.errors import ConfigurationError, FraisierError
from fraisier.records import RUN_STATUSES, HostRecord, RunRecord, StepRecord, utc_now
from fraisier.redact import redact, register_secret

if TYPE_CHECKING:
    from fraisier.db.base import RunStats, RunStore

log = logging.getLogger("fraisier.metrics")

JOB = "fraisier"
PUSHGATEWAY_URL_ENV = "FRAISIER_PUSHGATEWAY_URL"
DEFAULT_TIMEOUT = 2.0
DEFAULT_RETRIES = 2
RETRY_BACKOFF_SECONDS = 0.25
# Label values longer than this are cut, so that a long free-text rollback reason cannot
# create an unbounded label value.
MAX_LABEL_VALUE_LENGTH = 120
# The gateway's error body is cut to this many characters in the returned error.
MAX_ERROR_BODY_LENGTH = 300

# Every run status but "running": the statuses a run can end with.
FINAL_RUN_STATUSES = tuple(status for status in RUN_STATUSES if status != "running")

SOURCE_DATABASE = "database"
SOURCE_RUN = "run"

# Host results counted by fraisier_last_run_hosts. "targeted" counts every host record.
HOST_RESULTS = ("targeted", "success", "failed", "rolled_back")
_HOST_STATUS_TO_RESULT = {
    "success": "success",
    "failed": "failed",
    "unreachable": "failed",
    "rolled_back": "rolled_back",
}

# Rollback reasons that the runner records (fraisier.hostrun.rollback_reason, plus "run_failed"
# and "manual"). Their counters are pushed as 0 before the first rollback, so that increase()
# counts the step from 0 to 1. A counter series that first appears with value 1 shows no increase.
ROLLBACK_REASONS = (
    "health_check",
    "interrupted",
    "manual",
    "run_failed",
    "step_failed",
    "timeout",
    "unreachable",
)

DEPLOY_DURATION_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
HEALTH_CHECK_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: its exposed name, type, help text, labels and where its value comes from."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...]
    source: str  # SOURCE_DATABASE or SOURCE_RUN
    buckets: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "fraisier_deployments_total",
        "counter",
        "Deploy runs recorded in the run database, by final status.",
        ("status",),
        SOURCE_DATABASE,
    ),
    MetricSpec(
        "fraisier_errors_total",
        "counter",
        "Errors recorded in the run database, by error code.",
        ("code",),
        SOURCE_DATABASE,
    ),
    MetricSpec(
        "fraisier_rollbacks_total",
        "counter",
        "Rollbacks recorded in the run database, by reason.",
        ("reason",),
        SOURCE_DATABASE,
    ),
    MetricSpec(
        "fraisier_deploy_duration_seconds",
        "histogram",
        "Duration of ended deploy runs recorded in the run database, in seconds.",
        (),
        SOURCE_DATABASE,
        DEPLOY_DURATION_BUCKETS,
    ),
    MetricSpec(
        "fraisier_health_check_duration_seconds",
        "histogram",
        "Duration of health_check steps recorded in the run database, in seconds.",
        (),
        SOURCE_DATABASE,
        HEALTH_CHECK_DURATION_BUCKETS,
    ),
    MetricSpec(
        "fraisier_last_success_timestamp_seconds",
        "gauge",
        "Unix time at which the newest successful deploy run ended.",
        (),
        SOURCE_DATABASE,
    ),
    MetricSpec(
        "fraisier_active_deployments",
        "gauge",
        "Runs in progress: 1 from the start of a run until its end-of-run push.",
        (),
        SOURCE_DATABASE,
    ),
    MetricSpec(
        "fraisier_last_run_timestamp_seconds",
        "gauge",
        "Unix time at which the last run ended.",
        (),
        SOURCE_RUN,
    ),
    MetricSpec(
        "fraisier_last_run_duration_seconds",
        "gauge",
        "Duration of the last run, in seconds.",
        (),
        SOURCE_RUN,
    ),
    MetricSpec(
        "fraisier_last_run_success",
        "gauge",
        "1 when the last run ended with status success, else 0.",
        (),
        SOURCE_RUN,
    ),
    MetricSpec(
        "fraisier_last_run_status",
        "gauge",
        "1 for the final status of the last run, 0 for every other run status.",
        ("status",),
        SOURCE_RUN,
    ),
    MetricSpec(
        "fraisier_last_run_hosts",
        "gauge",
        "Hosts of the last run by result: targeted, success, failed or rolled_back.",
        ("result",),
        SOURCE_RUN,
    ),
    MetricSpec(
        "fraisier_step_duration_seconds",
        "gauge",
        "Duration of each recipe step in the last run, in seconds, max over hosts.",
        ("step",),
        SOURCE_RUN,
    ),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def exposed_names() -> set[str]:
    """Return every series name that the metrics in ``METRICS`` produce in the text format."""
    names: set[str] = set()
    for spec in METRICS:
        if spec.kind == "histogram":
            names.update(f"{spec.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(spec.name)
    return names


# --- Values ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Histogram:
    buckets: list[tuple[str, float]]
    total: float


# Values per metric name: label values (in MetricSpec.labels order) -> value.
_Values = dict[str, dict[tuple[str, ...], float]]


def _label_value(value: object) -> str:
    text = str(redact(str(value)))
    return text[:MAX_LABEL_VALUE_LENGTH]


def _timestamp(moment: dt.datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def _histogram(durations: Iterable[float], bounds: Sequence[float]) -> _Histogram:
    values = [float(d) for d in durations]
    buckets = [
        (_bound_text(bound), float(sum(1 for v in values if v <= bound))) for bound in bounds
    ]
    buckets.append(("+Inf", float(len(values))))
    return _Histogram(buckets=buckets, total=sum(values))


def _bound_text(bound: float) -> str:
    return repr(float(bound))


# Codes that the engine sets on errors in place of their class's code.
INSTANCE_ERROR_CODES = (
    "channel_closed",
    "connect_timeout",
    "connection_refused",
    "database_unavailable",
    "dns_failure",
    "git_failed",
    "git_timeout",
    "host_key_changed",
    "host_key_unknown",
    "interrupted",
    "lock_failed",
    "lock_stale",
    "nothing_to_roll_back",
    "release_not_found",
    "release_not_good",
    "sftp_unavailable",
)


def _error_codes() -> set[str]:
    """Return every error code a run can record: class-level codes and instance codes."""
    codes: set[str] = set(INSTANCE_ERROR_CODES)
    pending: list[type[FraisierError]] = [FraisierError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return codes


def _counts(counts: dict[str, int], known: Iterable[str]) -> dict[tuple[str, ...], float]:
    """Map counts to label tuples, with 0 for every known key.

    Keys that are cut to the same label value are added up.
    """
    values = {(key,): 0.0 for key in known}
    for key, count in counts.items():
        label = (_label_value(key),)
        values[label] = values.get(label, 0.0) + float(count)
    return values


def _stats_values(stats: RunStats) -> tuple[_Values, dict[str, _Histogram]]:
    """Compute the database-derived counters and histograms of one (environment, fraise)."""
    deployments = dict.fromkeys(FINAL_RUN_STATUSES, 0.0)
    for status, count in stats.runs_by_status.items():
        if status != "running":
            deployments[status] = float(count)

    values: _Values = {
        "fraisier_deployments_total": {(status,): c for status, c in deployments.items()},
        # Known error codes and rollback reasons start at 0; see ROLLBACK_REASONS.
        "fraisier_errors_total": _counts(stats.errors_by_code, _error_codes()),
        "fraisier_rollbacks_total": _counts(stats.rollbacks_by_reason, ROLLBACK_REASONS),
    }
    if stats.last_success_at is not None:
        values["fraisier_last_success_timestamp_seconds"] = {(): _timestamp(stats.last_success_at)}

    histograms = {
        "fraisier_deploy_duration_seconds": _histogram(
            stats.run_durations, DEPLOY_DURATION_BUCKETS
        ),
        "fraisier_health_check_duration_seconds": _histogram(
            stats.health_check_durations, HEALTH_CHECK_DURATION_BUCKETS
        ),
    }
    return values, histograms


def _run_values(
    run: RunRecord, hosts: Sequence[HostRecord], steps: Sequence[StepRecord]
) -> _Values:
    """Compute the gauges that describe one run: its time, status, hosts and step durations."""
    ended_at = run.ended_at or utc_now()
    results = dict.fromkeys(HOST_RESULTS, 0.0)
    for host in hosts:
        results["targeted"] += 1
        result = _HOST_STATUS_TO_RESULT.get(host.status)
        if result is not None:
            results[result] += 1

    step_durations: dict[tuple[str, ...], float] = {}
    for step in steps:
        key = (_label_value(step.name),)
        step_durations[key] = max(step_durations.get(key, 0.0), max(step.duration, 0.0))

    return {
        "fraisier_last_run_timestamp_seconds": {(): _timestamp(ended_at)},
        "fraisier_last_run_duration_seconds": {
            (): max((ended_at - run.started_at).total_seconds(), 0.0)
        },
        "fraisier_last_run_success": {(): 1.0 if run.status == "success" else 0.0},
        "fraisier_last_run_status": {
            (status,): 1.0 if run.status == status else 0.0 for status in FINAL_RUN_STATUSES
        },
        "fraisier_last_run_hosts": {(result,): count for result, count in results.items()},
        "fraisier_step_duration_seconds": step_durations,
    }


def _families(
    values: _Values,
    histograms: dict[str, _Histogram],
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Metric]:
    """Build metric families from computed values, in ``METRICS`` order.

    ``extra_labels`` are prepended to every sample. The exporter passes environment and fraise.
    """
    extra_names = list(extra_labels or {})
    extra_values = list((extra_labels or {}).values())
    families: dict[str, Metric] = {}
    for spec in METRICS:
        labels = [*extra_names, *spec.labels]
        if spec.kind == "histogram":
            if spec.name not in histograms:
                continue
            family: Metric = HistogramMetricFamily(spec.name, spec.help, labels=labels)
            data = histograms[spec.name]
            family.add_metric(extra_values, data.buckets, data.total)
        else:
            if spec.name not in values:
                continue
            kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = kind(spec.name, spec.help, labels=labels)
            for label_values, value in sorted(values[spec.name].items()):
                family.add_metric([*extra_values, *label_values], value)
        families[spec.name] = family
    return families


class _StaticCollector(Collector):
    """A collector that yields a fixed list of metric families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def build_run_registry(
    run: RunRecord,
    hosts: Sequence[HostRecord],
    steps: Sequence[StepRecord],
    stats: RunStats | None,
) -> CollectorRegistry:
    """Build the registry pushed at the end of ``run``.

    With ``stats`` None (database unreachable) the database-derived metrics are left out, so a
    POST keeps their previous values on the gateway. The last-success timestamp is then taken
    from the run itself when the run succeeded.
    """
    values = _run_values(run, hosts, steps)
    histograms: dict[str, _Histogram] = {}
    if stats is not None:
        stats_values, histograms = _stats_values(stats)
        values.update(stats_values)
    if "fraisier_last_success_timestamp_seconds" not in values and run.status == "success":
        values["fraisier_last_success_timestamp_seconds"] = {
            (): _timestamp(run.ended_at or utc_now())
        }
    # The deploy lock allows one run per (environment, fraise), and this run has ended.
    values["fraisier_active_deployments"] = {(): 0.0}

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StaticCollector(_families(values, histograms).values()))
    return registry


def build_start_registry() -> CollectorRegistry:
    """Build the registry pushed when a run starts: fraisier_active_deployments = 1 only."""
    families = _families({"fraisier_active_deployments": {(): 1.0}}, {})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StaticCollector(families.values()))
    return registry


# --- Pushing --------------------------------------------------------------------------------


def resolve_pushgateway_url(setting: str | None) -> str | None:
    """Return the Pushgateway URL: FRAISIER_PUSHGATEWAY_URL, else the inventory setting, else None.

    Raises ConfigurationError when the chosen value is not an http(s) URL with a host. A
    password in the URL is registered as a secret so that logs and errors mask it.
    """
    from_env = os.environ.get(PUSHGATEWAY_URL_ENV, "").strip()
    value = from_env or (setting or "").strip()
    if not value:
        return None
    source = PUSHGATEWAY_URL_ENV if from_env else "inventory settings.pushgateway"

    parsed = urlsplit(value)
    if parsed.password:
        register_secret(parsed.password)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError(
            f"invalid Pushgateway URL {redact(value)!r} in {source}: "
            "use http://host:port or https://host:port, optionally with user:password@"
        )
    try:
        parsed.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid Pushgateway URL {redact(value)!r} in {source}: {exc}; "
            "use a port number between 1 and 65535"
        ) from exc
    return value


class PushRejectedError(Exception):
    """The Pushgateway rejected a push with an HTTP error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Split ``http://user:pw@host:port/path`` into the URL without user info and credentials."""
    parsed = urlsplit(url)
    if parsed.username is None:
        return url, None, None
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    clean = urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))
    return clean, parsed.username, parsed.password or ""


def _make_handler(username: str | None, password: str | None) -> Callable[..., Callable[[], None]]:
    """Make a prometheus_client push handler that reads the error body and sends basic auth."""
    authorization = None
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        authorization = f"Basic {token}"

    def handler(
        url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        def send() -> None:
            request = urllib.request.Request(url, data=data, method=method)
            for name, value in headers:
                request.add_header(name, value)
            if authorization is not None:
                request.add_header("Authorization", authorization)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    response.read()
            except urllib.error.HTTPError as exc:
                body = exc.read().decode("utf-8", "replace")
                raise PushRejectedError(exc.code, body) from None

        return send

    return handler


def _one_line(text: str, limit: int = MAX_ERROR_BODY_LENGTH) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _push(
    gateway_url: str,
    environment: str,
    fraise: str,
    registry: CollectorRegistry,
    timeout: float,
    retries: int,
    push_kind: str,
) -> str | None:
    """POST ``registry`` to the group (job, environment, fraise) and return None or an error.

    A 4xx response is not retried, because the gateway would reject the same body again.
    Connection errors, timeouts and 5xx responses are retried ``retries`` times with a
    doubling backoff.
    """
    url, username, password = _split_credentials(gateway_url)
    register_secret(password)
    shown_url = redact(url)
    grouping_key = {"environment": _label_value(environment), "fraise": _label_value(fraise)}
    handler = _make_handler(username, password)

    error = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.info(
                "retrying %s push to %s for %s/%s in %.2f s (attempt %d of %d) after: %s",
                push_kind, shown_url, environment, fraise, delay, attempt + 1, retries + 1, error,
            )  # fmt: skip
            time.sleep(delay)
        try:
            pushadd_to_gateway(
                url,
                job=JOB,
                registry=registry,
                grouping_key=grouping_key,
                timeout=timeout,
                handler=handler,
            )
        except PushRejectedError as exc:
            error = f"HTTP {exc.status}: {_one_line(exc.body)}"
            if 400 <= exc.status < 500:
                break
            continue
        except (OSError, ValueError) as exc:
            # urllib raises URLError (an OSError) for refused connections and timeouts.
            reason = getattr(exc, "reason", None) or exc
            error = f"{type(exc).__name__}: {_one_line(str(reason))}"
            continue
        log.debug("pushed %s metrics to %s for %s/%s", push_kind, shown_url, environment, fraise)
        return None

    message = str(
        redact(
            f"{push_kind} push to {shown_url} for {environment}/{fraise} failed after "
            f"{attempt + 1} attempt(s): {error}"
        )
    )
    log.warning("%s", message)
    return message


def push_run_start(
    gateway_url: str | None, environment: str, fraise: str, timeout: float = DEFAULT_TIMEOUT
) -> str | None:
    """Push fraisier_active_deployments = 1 for (environment, fraise) and return None or an error.

    Best effort: one attempt, no retry, and no exception reaches the caller.
    """
    if not gateway_url:
        return None
    try:
        return _push(gateway_url, environment, fraise, build_start_registry(), timeout, 0, "start")
    except Exception as exc:  # no exception may reach the deploy engine
        message = str(redact(f"start push for {environment}/{fraise} failed: {exc!r}"))
        log.warning("%s", message)
        return _one_line(message)


def push_run_metrics(
    gateway_url: str | None,
    run: RunRecord,
    hosts: list[HostRecord],
    steps: list[StepRecord],
    stats: RunStats | None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> str | None:
    """Push the end-of-run metrics of ``run`` with one POST and return None or a one-line error.

    ``stats`` comes from ``RunStore.run_stats`` after the run was saved, or is None when the
    database is unreachable. No exception reaches the caller: the engine stores the returned
    error in ``RunRecord.push_error``.
    """
    if not gateway_url:
        return None
    try:
        registry = build_run_registry(run, hosts, steps, stats)
        return _push(gateway_url, run.environment, run.fraise, registry, timeout, retries, "run")
    except Exception as exc:  # no exception may reach the deploy engine
        message = str(redact(f"run push for {run.environment}/{run.fraise} failed: {exc!r}"))
        log.warning("%s", message)
        return _one_line(message)


# --- Exporter -------------------------------------------------------------------------------


class StoreCollector(Collector):
    """A collector that computes every metric from the run database on each scrape.

    Samples carry ``environment`` and ``fraise`` labels, one set per pair in the database,
    optionally limited to one environment.
    """

    def __init__(self, store: RunStore, environment: str | None = None) -> None:
        self._store = store
        self._environment = environment

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for environment, fraise in self._store.list_pairs():
            if self._environment is not None and environment != self._environment:
                continue
            for name, family in self._pair_families(environment, fraise).items():
                if name in merged:
                    merged[name].samples.extend(family.samples)
                else:
                    merged[name] = family
        for spec in METRICS:
            if spec.name in merged:
                yield merged[spec.name]

    def _pair_families(self, environment: str, fraise: str) -> dict[str, Metric]:
        stats = self._store.run_stats(environment, fraise)
        values, histograms = _stats_values(stats)
        values["fraisier_active_deployments"] = {(): float(stats.active_runs)}
        last_run = self._newest_ended_run(environment, fraise, stats.last_run)
        if last_run is not None:
            detail = self._store.get_run(last_run.run_id)
            hosts = detail.hosts if detail is not None else []
            steps = detail.steps if detail is not None else []
            values.update(_run_values(last_run, hosts, steps))
        extra = {"environment": _label_value(environment), "fraise": _label_value(fraise)}
        return _families(values, histograms, extra)

    def _newest_ended_run(
        self, environment: str, fraise: str, newest: RunRecord | None
    ) -> RunRecord | None:
        """Return ``newest`` unless it is still running, else the newest ended run of the pair."""
        if newest is None or newest.status != "running":
            return newest
        for run in self._store.list_runs(environment, fraise, limit=20):
            if run.status != "running":
                return run
        # NOTE: with more than 20 running runs in a row the last-run gauges are left out.
        return None


def collect_from_store(store: RunStore, environment: str | None = None) -> CollectorRegistry:
    """Return a new registry whose only collector is a ``StoreCollector`` over ``store``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, environment))
    return registry

"""Every dashboard and alert expression, run by a real Prometheus over real pushed and served data.

Runs recorded in a real SQLite store are pushed with push_run_metrics to a real Pushgateway,
and the metrics.serve exporter serves the same store. Prometheus scrapes both every second
and evaluates monitoring/alerts.yml.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time

import pytest
from monitoring_helpers import MONITORING_DIR, RunWriter, open_test_store
from promql import alert_rules, dashboard_expressions, substitute_variables
from support import Prometheus, Pushgateway, free_port, http_request

from fraisier import metrics
from fraisier.cli.metrics import serve_metrics
from fraisier.records import utc_now

pytestmark = pytest.mark.monitoring

EXPORTER_JOB = "fraisier-exporter"
# Seconds between two pushes of one group, so that Prometheus (scraping every second) stores
# each pushed state.
SCRAPE_GAP = 1.6


class PrometheusWithExporter(Prometheus):
    """The shared Prometheus server, plus a scrape job for the metrics.serve exporter."""

    def __init__(self, pushgateway, exporter_port, rule_files=()):
        super().__init__(pushgateway, rule_files)
        self.exporter_port = exporter_port

    def _write_config(self) -> None:
        super()._write_config()
        config = json.loads(self.config_path.read_text())
        config["scrape_configs"].append(
            {
                "job_name": EXPORTER_JOB,
                "scrape_interval": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{self.exporter_port}"]}],
            }
        )
        self.config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Start a store, its exporter, a Pushgateway and Prometheus scraping both, once per module.

    Yields (store writer, Pushgateway, Prometheus).
    """
    store = open_test_store(tmp_path_factory.mktemp("e2e") / "runs.sqlite")
    port = free_port()
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_metrics,
        args=(f"sqlite:///{store.path}",),
        kwargs={"port": port, "stop": stop},
        daemon=True,
    )
    thread.start()
    try:
        with (
            Pushgateway() as pushgateway,
            PrometheusWithExporter(
                pushgateway, port, [MONITORING_DIR / "alerts.yml"]
            ) as prometheus,
        ):
            yield RunWriter(store), pushgateway, prometheus
    finally:
        stop.set()
        thread.join(10)
        store.close()


def _push(pushgateway, recorded):
    error = metrics.push_run_metrics(
        pushgateway.url, recorded.run, recorded.hosts, recorded.steps, recorded.stats
    )
    assert error is None
    time.sleep(SCRAPE_GAP)


def _pairs(result):
    return {(s["metric"].get("environment"), s["metric"].get("fraise")) for s in result}


def _values(result):
    return [float(s["value"][1]) for s in result]


def _by_label(result, label):
    return {s["metric"].get(label): float(s["value"][1]) for s in result}


@pytest.fixture(scope="module")
def deploy_history(servers):
    """Record and push a history of runs; return Prometheus once it has scraped all of it."""
    record_run, pushgateway, prometheus_all = servers
    # Prometheus starts scraping a few seconds after it is ready; pushes before that are lost.
    prometheus_all.wait_for("up == 1", lambda result: len(result) == 2, timeout=30)
    now = utc_now()
    minute = dt.timedelta(minutes=1)

    # prod/api: two successes, a failure, then a rollback after a failed health check.
    _push(pushgateway, record_run("success", started_at=now - 40 * minute, duration=30))
    _push(pushgateway, record_run("success", started_at=now - 30 * minute, duration=50))
    _push(
        pushgateway,
        record_run(
            "failed", started_at=now - 20 * minute, duration=20, error_code="command_failed"
        ),
    )
    _push(
        pushgateway,
        record_run(
            "rolled_back",
            started_at=now - 10 * minute,
            duration=90,
            error_code="health_check_failed",
            rollback_reason="health_check",
        ),
    )
    # prod/etl: a success, then a failure that timed out.
    _push(pushgateway, record_run("success", fraise="etl", started_at=now - 30 * minute))
    _push(
        pushgateway,
        record_run("failed", fraise="etl", started_at=now - 5 * minute, error_code="timeout"),
    )
    # staging/api: the only success ended 20 days ago, beyond the default 14-day window.
    _push(
        pushgateway,
        record_run("success", environment="staging", started_at=now - dt.timedelta(days=20)),
    )
    # qa/api: a success, then a push that the gateway rejects because its type differs from
    # the other groups' fraisier_last_run_success.
    _push(pushgateway, record_run("success", environment="qa", started_at=now - 3 * minute))
    status, _ = http_request(
        f"{pushgateway.url}/metrics/job/fraisier/environment/qa/fraise/api",
        method="POST",
        data=b"# TYPE fraisier_last_run_success counter\nfraisier_last_run_success 1\n",
    )
    assert status == 400
    # prod/worker: a pushed success, then a run in the database that never reached the gateway.
    # Its end time lies 20 minutes ahead, so it is newer than the push by more than 10 minutes.
    _push(pushgateway, record_run("success", fraise="worker", started_at=now - 2 * minute))
    record_run("failed", fraise="worker", started_at=now + 20 * minute)
    # prod/cron: a run that started and has not ended.
    assert metrics.push_run_start(pushgateway.url, "prod", "cron") is None

    prometheus_all.wait_for(
        'fraisier_last_run_timestamp_seconds{job="fraisier-exporter", fraise="worker"} > time()',
        timeout=20,
    )
    prometheus_all.wait_for('fraisier_active_deployments{fraise="cron"} == 1', timeout=20)
    return prometheus_all


def test_targets_are_up(deploy_history):
    health = {t["labels"]["job"]: t["health"] for t in deploy_history.targets()}

    assert health == {"pushgateway": "up", EXPORTER_JOB: "up"}


def test_every_dashboard_query_returns_series(deploy_history):
    for where, expr in dashboard_expressions():
        result = deploy_history.query(substitute_variables(expr))
        assert result, f"{where}: no series for {expr}"
        for value in _values(result):
            assert not math.isnan(value), f"{where}: NaN for {expr}"


def test_dashboard_values(deploy_history):
    queries = {where.split("'")[1] + " " + where.rsplit(" ", 1)[1]: expr
               for where, expr in dashboard_expressions()}  # fmt: skip

    def run(key):
        return deploy_history.query(substitute_variables(queries[key]))

    success_rate = _values(run("Deploy success rate A"))
    assert len(success_rate) == 1
    assert 0 < success_rate[0] < 1

    assert _values(run("Active deployments A")) == [1]

    since = {
        (s["metric"]["environment"], s["metric"]["fraise"]): float(s["value"][1])
        for s in run("Time since last successful deploy A")
    }
    assert since[("staging", "api")] > 19 * 86400
    assert since[("prod", "api")] < 3600
    assert ("prod", "cron") not in since

    by_status = _by_label(run("Deploys by status A"), "status")
    assert by_status["failed"] > 0
    assert by_status["rolled_back"] > 0

    errors = _by_label(run("Errors by code A"), "code")
    assert errors["timeout"] > 0
    assert errors["health_check_failed"] > 0
    assert errors["host_unreachable"] == 0

    rollbacks = _by_label(run("Rollbacks by reason A"), "reason")
    assert rollbacks["health_check"] > 0
    assert rollbacks["manual"] == 0

    median = _values(run("Deploy duration (median and p95) A"))
    p95 = _values(run("Deploy duration (median and p95) B"))
    assert len(median) == 1
    assert 0 < median[0] <= p95[0] <= 120

    failed_hosts = {
        (s["metric"]["environment"], s["metric"]["fraise"]): float(s["value"][1])
        for s in run("Hosts per result in the last run A")
    }
    assert failed_hosts[("prod", "etl")] == 1
    assert failed_hosts[("prod", "api")] == 0

    steps = {s["metric"]["step"] for s in run("Step durations of the last run A")}
    assert steps == {"upload", "build", "switch", "health_check"}

    assert _values(run("Groups with a failing push A")) == [1]


def _alert_expressions():
    return {rule["alert"]: rule["expr"] for rule in alert_rules() if "alert" in rule}


def test_alert_expressions_return_expected_pairs(deploy_history):
    expressions = _alert_expressions()
    expected = {
        "FraisierDeployFailed": {("prod", "etl"), ("prod", "worker")},
        "FraisierDeployRolledBack": {("prod", "api")},
        "FraisierNoRecentSuccess": {("staging", "api")},
        "FraisierDeployStuck": {("prod", "cron")},
        "FraisierPushStale": set(),
        "FraisierPushFailing": {("qa", "api")},
        "FraisierRunNotPushed": {("prod", "worker")},
        "FraisierPushgatewayDown": set(),
    }

    assert set(expressions) == set(expected)
    for alert, pairs in expected.items():
        result = deploy_history.query(expressions[alert])
        assert _pairs(result) == pairs, (alert, result)


def test_recorded_window_per_environment(deploy_history):
    result = deploy_history.wait_for(
        "fraisier:deploy_max_age_seconds", lambda r: len(r) == 3, timeout=20
    )

    windows = {s["metric"]["environment"]: float(s["value"][1]) for s in result}
    assert windows["prod"] == 7 * 86400
    assert windows["staging"] == 14 * 86400
    assert windows["qa"] == 14 * 86400


def test_alerts_fire_in_prometheus(deploy_history):
    expected = {
        ("FraisierDeployFailed", "prod", "etl"),
        ("FraisierDeployRolledBack", "prod", "api"),
        ("FraisierNoRecentSuccess", "staging", "api"),
        ("FraisierPushFailing", "qa", "api"),
        ("FraisierRunNotPushed", "prod", "worker"),
    }

    def firing(result):
        found = {
            (s["metric"]["alertname"], s["metric"].get("environment"), s["metric"].get("fraise"))
            for s in result
        }
        return expected <= found

    result = deploy_history.wait_for('ALERTS{alertstate="firing"}', firing, timeout=20)
    names = {s["metric"]["alertname"] for s in result}

    assert "FraisierPushStale" not in names
    assert "FraisierPushgatewayDown" not in names
    # FraisierDeployStuck waits 2 hours, so it is pending only.
    pending = deploy_history.wait_for('ALERTS{alertname="FraisierDeployStuck"}', timeout=20)
    assert {s["metric"]["alertstate"] for s in pending} == {"pending"}

"""Pushes to a real Pushgateway on loopback, and to servers that fail in known ways."""

from __future__ import annotations

import base64
import logging
import socket
import time

import pytest
from monitoring_helpers import (
    parse_samples,
    sample_value,
)
from support import free_port, http_request

from fraisier import metrics

pytestmark = pytest.mark.monitoring

GROUP = {"job": "fraisier", "environment": "prod", "fraise": "api"}


def _gateway_samples(pushgateway):
    return parse_samples(pushgateway.metrics_text())


def _push(pushgateway, recorded, stats="from-store"):
    return metrics.push_run_metrics(
        pushgateway.url,
        recorded.run,
        recorded.hosts,
        recorded.steps,
        recorded.stats if stats == "from-store" else stats,
    )


def test_push_after_three_outcomes(pushgateway, record_run):
    results = [
        _push(pushgateway, record_run("success")),
        _push(pushgateway, record_run("failed", error_code="command_failed")),
        _push(pushgateway, record_run("rolled_back", rollback_reason="health_check")),
    ]
    samples = _gateway_samples(pushgateway)

    assert results == [None, None, None]
    assert sample_value(samples, "fraisier_deployments_total", status="success", **GROUP) == 1
    assert sample_value(samples, "fraisier_deployments_total", status="failed", **GROUP) == 1
    assert sample_value(samples, "fraisier_deployments_total", status="rolled_back", **GROUP) == 1
    assert sample_value(samples, "fraisier_errors_total", code="command_failed", **GROUP) == 1
    assert sample_value(samples, "fraisier_rollbacks_total", reason="health_check", **GROUP) == 1
    assert sample_value(samples, "fraisier_last_run_success", **GROUP) == 0
    assert sample_value(samples, "fraisier_last_run_status", status="rolled_back", **GROUP) == 1
    assert sample_value(samples, "fraisier_last_run_hosts", result="rolled_back", **GROUP) == 2
    assert sample_value(samples, "fraisier_deploy_duration_seconds_count", **GROUP) == 3
    assert sample_value(samples, "fraisier_active_deployments", **GROUP) == 0


def test_pushed_series_carry_group_labels_only(pushgateway, record_run):
    _push(pushgateway, record_run("success"))
    samples = _gateway_samples(pushgateway)
    ours = [(n, labels) for n, labels, _ in samples if n in metrics.exposed_names()]

    assert ours
    for name, labels in ours:
        spec_name = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        spec = metrics.METRICS_BY_NAME.get(spec_name) or metrics.METRICS_BY_NAME[name]
        allowed = {"job", "environment", "fraise", "instance", *spec.labels}
        if name.endswith("_bucket"):
            allowed.add("le")
        assert set(labels) <= allowed, (name, labels)
        assert labels["job"] == "fraisier"
        assert labels.get("instance", "") == ""
        assert "host" not in labels


def test_totals_grow_across_runs(pushgateway, record_run):
    totals = []
    for _ in range(3):
        assert _push(pushgateway, record_run("success")) is None
        samples = _gateway_samples(pushgateway)
        totals.append(
            sample_value(samples, "fraisier_deployments_total", status="success", **GROUP)
        )

    assert totals == [1, 2, 3]


def test_failed_run_keeps_last_success(pushgateway, record_run):
    success = record_run("success")
    _push(pushgateway, success)
    before = sample_value(
        _gateway_samples(pushgateway), "fraisier_last_success_timestamp_seconds", **GROUP
    )

    _push(pushgateway, record_run("failed"))
    after_failed = sample_value(
        _gateway_samples(pushgateway), "fraisier_last_success_timestamp_seconds", **GROUP
    )
    # The database is unreachable for the next run: the timestamp is left out of the POST.
    _push(pushgateway, record_run("failed"), stats=None)
    samples = _gateway_samples(pushgateway)

    assert before == success.run.ended_at.timestamp()
    assert after_failed == before
    assert sample_value(samples, "fraisier_last_success_timestamp_seconds", **GROUP) == before
    assert sample_value(samples, "fraisier_last_run_success", **GROUP) == 0
    # Database totals keep the values of the previous push.
    assert sample_value(samples, "fraisier_deployments_total", status="failed", **GROUP) == 1


def test_start_ping_sets_active(pushgateway, record_run):
    assert metrics.push_run_start(pushgateway.url, "prod", "api") is None
    during = sample_value(_gateway_samples(pushgateway), "fraisier_active_deployments", **GROUP)
    _push(pushgateway, record_run("success"))
    after = sample_value(_gateway_samples(pushgateway), "fraisier_active_deployments", **GROUP)

    assert during == 1
    assert after == 0


def test_groups_per_environment_and_fraise(pushgateway, record_run):
    _push(pushgateway, record_run("success", environment="prod", fraise="api"))
    _push(pushgateway, record_run("failed", environment="staging", fraise="api"))
    _push(pushgateway, record_run("success", environment="prod", fraise="etl"))

    groups = {
        (group["labels"]["environment"], group["labels"]["fraise"])
        for group in pushgateway.groups()
    }

    assert groups == {("prod", "api"), ("staging", "api"), ("prod", "etl")}


def test_gateway_down_returns_error(record_run, caplog):
    recorded = record_run("success")
    url = f"http://127.0.0.1:{free_port()}"

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fraisier.metrics"):
        error = metrics.push_run_metrics(
            url, recorded.run, recorded.hosts, recorded.steps, recorded.stats
        )
    elapsed = time.monotonic() - started

    assert error is not None
    assert "refused" in error.lower()
    assert url in error
    assert "\n" not in error
    assert elapsed < 10
    assert any("failed" in record.getMessage() for record in caplog.records)


def test_gateway_400_returns_body(status_server, record_run):
    server = status_server(400, b"text format parsing error in line 3: invalid metric name")
    recorded = record_run("success")

    started = time.monotonic()
    error = metrics.push_run_metrics(
        server.url, recorded.run, recorded.hosts, recorded.steps, recorded.stats
    )
    elapsed = time.monotonic() - started

    assert error is not None
    assert "HTTP 400" in error
    assert "invalid metric name" in error
    assert elapsed < 10
    # A 4xx response is final: no retry.
    assert len(server.requests) == 1
    assert server.requests[0]["method"] == "POST"
    assert server.requests[0]["path"] == "/metrics/job/fraisier/environment/prod/fraise/api"


def test_gateway_503_is_retried(status_server, record_run):
    server = status_server(503, b"overloaded")
    recorded = record_run("success")

    error = metrics.push_run_metrics(
        server.url, recorded.run, recorded.hosts, recorded.steps, recorded.stats, retries=2
    )

    assert error is not None
    assert "HTTP 503: overloaded" in error
    assert len(server.requests) == 3


def test_gateway_hanging_times_out(record_run):
    recorded = record_run("success")
    # A listening socket that never accepts: connections complete in the backlog and hang.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        started = time.monotonic()
        error = metrics.push_run_metrics(
            url, recorded.run, recorded.hosts, recorded.steps, recorded.stats
        )
        elapsed = time.monotonic() - started

    assert error is not None
    assert "timed out" in error.lower()
    assert elapsed < 10


def test_basic_auth_sent_not_shown(status_server, record_run, caplog):
    server = status_server(401, b"Unauthorized")
    recorded = record_run("success")
    url = server.url.replace("http://", "http://pusher:pa55-w0rd-x@")

    with caplog.at_level(logging.DEBUG, logger="fraisier"):
        error = metrics.push_run_metrics(
            url, recorded.run, recorded.hosts, recorded.steps, recorded.stats
        )

    expected = "Basic " + base64.b64encode(b"pusher:pa55-w0rd-x").decode()
    assert server.requests[0]["authorization"] == expected
    assert error is not None
    assert "HTTP 401" in error
    assert "pa55-w0rd-x" not in error
    assert all("pa55-w0rd-x" not in record.getMessage() for record in caplog.records)


def test_inconsistent_type_sets_push_failure(pushgateway, record_run):
    # Another job owns fraisier_last_run_success as a counter, so the gateway rejects ours.
    status, body = http_request(
        f"{pushgateway.url}/metrics/job/other",
        method="PUT",
        data=b"# TYPE fraisier_last_run_success counter\nfraisier_last_run_success 1\n",
    )
    assert status == 200, body
    recorded = record_run("success")

    error = _push(pushgateway, recorded)
    samples = _gateway_samples(pushgateway)

    assert error is not None
    assert "HTTP 400" in error
    assert "fraisier_last_run_success" in error
    failure = sample_value(samples, "push_failure_time_seconds", **GROUP)
    success = sample_value(samples, "push_time_seconds", **GROUP)
    assert failure is not None
    assert failure > (success or 0)

"""The metrics.serve exporter, scraped over HTTP on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from monitoring_helpers import (
    REPO_ROOT,
    parse_samples,
    sample_value,
)
from support import free_port, http_request

from fraisier import metrics
from fraisier.cli.metrics import serve_metrics
from fraisier.errors import ConfigurationError


def _database_url(store) -> str:
    return f"sqlite:///{store.path}"


def _scrape(url: str, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http_request(url, timeout=2.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        assert status == 200, body[:500]
        return parse_samples(body.decode())


@pytest.fixture
def exporter(store):
    """Start serve_metrics in a thread; yield ``start(environment=None) -> base URL``."""
    threads = []

    def start(environment=None):
        stop = threading.Event()
        port = free_port()
        thread = threading.Thread(
            target=serve_metrics,
            args=(_database_url(store),),
            kwargs={"port": port, "environment": environment, "stop": stop},
            daemon=True,
        )
        thread.start()
        threads.append((stop, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for stop, thread in threads:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "serve_metrics did not stop"


def test_exporter_serves_pairs_with_labels(exporter, record_run):
    record_run("success", environment="prod", fraise="api")
    record_run("failed", environment="prod", fraise="api", error_code="timeout")
    record_run("rolled_back", environment="staging", fraise="etl", rollback_reason="timeout")
    url = exporter()

    samples = _scrape(f"{url}/metrics")
    prod = {"environment": "prod", "fraise": "api"}
    staging = {"environment": "staging", "fraise": "etl"}

    names = {name for name, _, _ in samples if name.startswith("fraisier_")}
    assert names == metrics.exposed_names()
    assert sample_value(samples, "fraisier_deployments_total", status="success", **prod) == 1
    assert sample_value(samples, "fraisier_deployments_total", status="failed", **prod) == 1
    assert sample_value(samples, "fraisier_errors_total", code="timeout", **prod) == 1
    assert sample_value(samples, "fraisier_last_run_success", **prod) == 0
    assert sample_value(samples, "fraisier_last_run_status", status="rolled_back", **staging) == 1
    assert sample_value(samples, "fraisier_rollbacks_total", reason="timeout", **staging) == 1
    assert sample_value(samples, "fraisier_last_success_timestamp_seconds", **staging) is None
    assert sample_value(samples, "fraisier_step_duration_seconds", step="build", **prod) == 6
    assert sample_value(samples, "fraisier_active_deployments", **prod) == 0


def test_exporter_sees_new_runs(exporter, record_run):
    record_run("success")
    url = exporter()
    first = sample_value(
        _scrape(f"{url}/metrics"), "fraisier_deployments_total", status="success", fraise="api"
    )

    record_run("success")
    second = sample_value(
        _scrape(f"{url}/metrics"), "fraisier_deployments_total", status="success", fraise="api"
    )

    assert first == 1
    assert second == 2


def test_exporter_running_run_is_active(exporter, record_run, store):
    recorded = record_run("success")
    running = record_run("running")
    running.run.ended_at = None
    store.save_run(running.run)
    url = exporter()

    samples = _scrape(f"{url}/metrics")

    assert sample_value(samples, "fraisier_active_deployments", fraise="api") == 1
    # The last-run gauges describe the newest ended run, not the one in progress.
    assert sample_value(samples, "fraisier_last_run_success", fraise="api") == 1
    assert (
        sample_value(samples, "fraisier_last_run_timestamp_seconds", fraise="api")
        == recorded.run.ended_at.timestamp()
    )


def test_exporter_environment_filter(exporter, record_run):
    record_run("success", environment="prod")
    record_run("success", environment="staging")
    url = exporter(environment="staging")

    samples = _scrape(f"{url}/metrics")
    environments = {labels["environment"] for _, labels, _ in samples if "environment" in labels}

    assert environments == {"staging"}


def test_serve_rejects_invalid_port(store):
    with pytest.raises(ConfigurationError) as caught:
        serve_metrics(_database_url(store), port=70000, stop=threading.Event())

    assert "70000" in str(caught.value)


def test_serve_task_stops_on_sigterm(store, record_run):
    record_run("success")
    port = free_port()
    command = [
        sys.executable, "-m", "invoke", "metrics.serve",
        "--port", str(port), "--database", _database_url(store),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        samples = _scrape(f"http://127.0.0.1:{port}/metrics", timeout=20.0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)

    assert sample_value(samples, "fraisier_deployments_total", status="success") == 1
    assert process.returncode == 0, output.decode()
    assert b"stopped" in output

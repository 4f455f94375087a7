"""Deploys over SSH that push to a real Pushgateway, checked through a real Prometheus.

``python -m fraisier deploy`` runs as a subprocess against the three sshd test hosts, with
FRAISIER_PUSHGATEWAY_URL set. A success, a rollback after a failed health check and a failed
build are pushed, and every dashboard and alert expression runs through Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monitoring_helpers import MONITORING_DIR, REPO_ROOT, parse_samples, sample_value
from promql import alert_rules, dashboard_expressions, substitute_variables
from support import (
    Prometheus,
    bind_hosts_to_addresses,
    free_port,
    hello_fraise,
    write_inventory,
)

pytestmark = [pytest.mark.ssh, pytest.mark.monitoring]

GROUP = {"job": "fraisier", "environment": "test", "fraise": "hello"}
CLI_TIMEOUT = 180


@pytest.fixture
def alerting_prometheus(pushgateway):
    """Start a Prometheus that scrapes the ``pushgateway`` fixture and loads alerts.yml."""
    with Prometheus(pushgateway, [MONITORING_DIR / "alerts.yml"]) as server:
        server.wait_for("up == 1", timeout=30)
        yield server


class MetricsProject:
    """A project that deploys the example service ``hello`` to the SSH test hosts."""

    def __init__(self, root: Path, hosts, gateway_url: str) -> None:
        self.root = root
        self.gateway_url = gateway_url
        port = free_port(hosts[0].address)
        self.inventory = write_inventory(
            root,
            hosts,
            fraises={"hello": hello_fraise(2, 0.2, shared=["log"])},
            settings={"recipes_dir": str(REPO_ROOT / "tasks"), "connect_timeout": 5},
            vars={"port": port},
        )
        self.data = bind_hosts_to_addresses(self.inventory, hosts)

    def write(self) -> None:
        """Write ``data`` to the inventory file."""
        self.inventory.write_text(yaml.safe_dump(self.data, sort_keys=False))

    def use_source(self, name: str, marker: str | None = None) -> None:
        """Deploy from a copy of examples/hello named ``name``, with an empty file ``marker``."""
        target = self.root / name
        shutil.copytree(REPO_ROOT / "examples" / "hello", target)
        if marker:
            (target / marker).write_text("")
        self.data["fraises"]["hello"]["source"] = {"path": str(target)}
        self.write()

    def deploy(self, expected_exit: int) -> dict:
        """Run ``deploy --json`` with the gateway URL set and return the run of ``hello``."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_")}
        environment["PYTHONPATH"] = str(REPO_ROOT)
        environment["FRAISIER_PUSHGATEWAY_URL"] = self.gateway_url
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            environment.pop(name, None)
        command = [
            sys.executable, "-m", "fraisier", "deploy", "--json", "--log-format", "console",
            "--env", "test", "--inventory", str(self.inventory),
        ]  # fmt: skip
        completed = subprocess.run(
            command,
            cwd=self.root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        output = f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        assert completed.returncode == expected_exit, output
        runs = json.loads(completed.stdout)
        assert len(runs) == 1, output
        return runs[0]


def test_deploys_feed_dashboard_and_alerts(tmp_path, ssh_hosts3, pushgateway, alerting_prometheus):
    project = MetricsProject(tmp_path, ssh_hosts3, pushgateway.url)

    success = project.deploy(expected_exit=0)
    alerting_prometheus.wait_for(
        'fraisier_deployments_total{status="success", fraise="hello"} == 1', timeout=20
    )
    project.use_source("unhealthy", marker="UNHEALTHY")
    rolled_back = project.deploy(expected_exit=1)
    alerting_prometheus.wait_for(
        'fraisier_deployments_total{status="rolled_back", fraise="hello"} == 1', timeout=20
    )
    project.use_source("broken-build")
    # The build step runs "{{ python }} -m compileall", so it fails on every host before the
    # switch, and the run ends "failed" with nothing to roll back.
    project.data["vars"]["python"] = "false"
    project.write()
    failed = project.deploy(expected_exit=1)
    alerting_prometheus.wait_for(
        'fraisier_deployments_total{status="failed", fraise="hello"} == 1', timeout=20
    )

    assert success["status"] == "success"
    assert rolled_back["status"] == "rolled_back"
    assert failed["status"] == "failed"

    samples = parse_samples(pushgateway.metrics_text())
    assert sample_value(samples, "fraisier_deployments_total", status="success", **GROUP) == 1
    assert sample_value(samples, "fraisier_last_run_success", **GROUP) == 0
    assert sample_value(samples, "fraisier_last_run_status", status="failed", **GROUP) == 1
    assert sample_value(samples, "fraisier_last_run_hosts", result="targeted", **GROUP) == 3
    assert sample_value(samples, "fraisier_active_deployments", **GROUP) == 0
    assert sample_value(samples, "fraisier_rollbacks_total", reason="health_check", **GROUP) == 1
    assert sample_value(samples, "fraisier_health_check_duration_seconds_count", **GROUP) >= 6
    assert sample_value(samples, "fraisier_step_duration_seconds", step="build", **GROUP) >= 0
    assert sample_value(samples, "push_failure_time_seconds", **GROUP) == 0

    for where, expr in dashboard_expressions():
        result = alerting_prometheus.query(substitute_variables(expr))
        assert result, f"{where}: no series for {expr}"
        for series in result:
            assert not math.isnan(float(series["value"][1])), f"{where}: NaN for {expr}"

    expected_alerts = {
        "FraisierDeployFailed": {("test", "hello")},
        "FraisierDeployRolledBack": {("test", "hello")},
        "FraisierNoRecentSuccess": set(),
        "FraisierDeployStuck": set(),
        "FraisierPushStale": set(),
        "FraisierPushFailing": set(),
        # Prometheus here scrapes no exporter, so the rule has no database series to compare.
        "FraisierRunNotPushed": set(),
        "FraisierPushgatewayDown": set(),
    }
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules() if "alert" in rule}
    assert set(rules) == set(expected_alerts)
    for alert, pairs in expected_alerts.items():
        result = alerting_prometheus.query(rules[alert])
        found = {(s["metric"].get("environment"), s["metric"].get("fraise")) for s in result}
        assert found == pairs, (alert, result)

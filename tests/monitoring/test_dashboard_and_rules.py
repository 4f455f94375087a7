"""Static checks of the Grafana board, the alert rules and the Prometheus configuration."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from monitoring_helpers import MONITORING_DIR, REPO_ROOT
from promql import (
    EXTERNAL_METRICS,
    alert_rules,
    dashboard,
    dashboard_expressions,
    metric_names,
    recorded_names,
    substitute_variables,
    variable_selectors,
)

from fraisier import metrics

PANEL_TYPES = {"stat", "timeseries", "gauge", "bargauge", "table", "text", "row"}
REQUIRED_PANELS = {
    "Deploy success rate",
    "Deploy duration (median and p95)",
    "Errors by code",
    "Rollbacks by reason",
    "Active deployments",
    "Hosts per result in the last run",
    "Health-check duration (median and p95)",
    "Time since last successful deploy",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is needed for this test; install the Debian package prometheus")
    return path


def _known_names() -> set[str]:
    return metrics.exposed_names() | EXTERNAL_METRICS | recorded_names()


def test_metric_names_parser():
    expr = (
        'sum by (le) (increase(foo_bucket{job="a", x=~"b|c"}[5m])) / on (env) group_left () '
        'bar:ratio > 1e3 and time() - baz offset 5m or vector(0) unless label_replace(q, "a", '
        '"b", "", "")'
    )

    assert metric_names(expr) == {"foo_bucket", "bar:ratio", "baz", "q"}


def test_dashboard_json_is_generated():
    result = subprocess.run(
        [sys.executable, str(MONITORING_DIR / "dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def test_dashboard_check_detects_drift(tmp_path):
    stale = tmp_path / "dashboard.json"
    stale.write_text("{}\n")

    result = subprocess.run(
        [sys.executable, str(MONITORING_DIR / "dashboard.py"), "--check", "--output", str(stale)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "differs" in result.stderr


def test_dashboard_model():
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]

    assert board["uid"] == "fraisier-deploys"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    assert len(ids) == len(set(ids))
    assert {panel["title"] for panel in panels} >= REQUIRED_PANELS
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["refId"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_grid_has_no_overlap():
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["id"], cells.get((x, y)))
                cells[(x, y)] = panel["id"]


def test_dashboard_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("environment", "fraise"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"
    assert variables["window"]["type"] == "interval"


def test_dashboard_queries_use_filters():
    for where, expr in dashboard_expressions():
        assert 'environment=~"$environment"' in expr, where
        assert 'fraise=~"$fraise"' in expr, where


def test_dashboard_names_exist_in_metric_table():
    known = _known_names()
    for where, expr in [*dashboard_expressions(), *variable_selectors()]:
        names = metric_names(expr)
        assert names, where
        assert names <= known, (where, names - known)


def test_rule_names_exist_in_metric_table():
    known = _known_names()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= known, (rule.get("alert") or rule.get("record"), names - known)


def test_dashboard_queries_parse(tmp_path):
    rules = [
        {"record": f"dashboard:query_{index}", "expr": substitute_variables(expr)}
        for index, (_, expr) in enumerate([*dashboard_expressions(), *variable_selectors()])
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_alert_rules_check():
    result = subprocess.run(
        [_promtool(), "check", "rules", str(MONITORING_DIR / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests():
    result = subprocess.run(
        [_promtool(), "test", "rules", "alerts-test.yml"],
        capture_output=True,
        text=True,
        cwd=MONITORING_DIR,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_tests_cover_firing_and_silent():
    tests = yaml.safe_load((MONITORING_DIR / "alerts-test.yml").read_text())["tests"]
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            expected = check.get("exp_alerts") or []
            if expected:
                firing.add(check["alertname"])
            else:
                silent.add(check["alertname"])
            # Input series for more pairs than the alerts expected are a silent case too.
            pairs = {
                (series["series"].split('environment="')[1].split('"')[0])
                + "/"
                + series["series"].split('fraise="')[1].split('"')[0]
                for series in case["input_series"]
                if 'fraise="' in series["series"]
            }
            fired = {
                f"{alert['exp_labels'].get('environment')}/{alert['exp_labels'].get('fraise')}"
                for alert in expected
            }
            if pairs - fired:
                silent.add(check["alertname"])

    assert firing == alerts
    assert silent == alerts


def test_prometheus_config():
    config_path = MONITORING_DIR / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    result = subprocess.run(
        [_promtool(), "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert jobs["pushgateway"]["honor_labels"] is True
    assert "honor_labels" not in jobs["fraisier-exporter"]
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_provisioning_files():
    provisioning = MONITORING_DIR / "grafana-provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "fraisier.yml").read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "fraisier.yml").read_text())

    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    assert datasources["datasources"][0]["url"].startswith("http://")
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]

"""PromQL helpers of the monitoring tests: dashboard and rule expressions, metric names in them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD_JSON = MONITORING_DIR / "grafana-dashboard.json"
ALERTS_YML = MONITORING_DIR / "alerts.yml"

# Values that stand in for Grafana's variables when an expression is checked outside Grafana.
GRAFANA_VARIABLES = {
    "$environment": ".*",
    "$fraise": ".*",
    "$window": "1h",
    "$__range": "1h",
    "$__rate_interval": "1m",
    "$__interval": "1m",
}
# Series that the Pushgateway and Prometheus expose themselves.
EXTERNAL_METRICS = {"push_time_seconds", "push_failure_time_seconds", "up"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "by", "without"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


def substitute_variables(expr: str) -> str:
    """Replace Grafana variables with plain values; longer names first."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression selects.

    Strings, label matchers, ranges and grouping clauses are removed first. The identifiers
    left that are not followed by "(" and are not operators are metric names.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue
        if match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def dashboard() -> dict[str, Any]:
    """Load the committed dashboard JSON."""
    return json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))


def dashboard_expressions() -> list[tuple[str, str]]:
    """Return (where, expression) for every panel query of the committed dashboard."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            )
    return found


def variable_selectors() -> list[tuple[str, str]]:
    """Return (variable name, series selector) of each label_values() variable query."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, str) and query.startswith("label_values("):
            selector = query[len("label_values(") :].rsplit(",", 1)[0]
            found.append((variable["name"], selector))
    return found


def alert_rules() -> list[dict[str, Any]]:
    """Return every rule of monitoring/alerts.yml, alerting and recording."""
    data = yaml.safe_load(ALERTS_YML.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    """Return the names that the recording rules of alerts.yml define."""
    return {rule["record"] for rule in alert_rules() if "record" in rule}

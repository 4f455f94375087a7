"""Generate the Grafana dashboard of Fraisier deploys into monitoring/grafana-dashboard.json.

Run ``python monitoring/dashboard.py`` to write the JSON, or ``--check`` to exit 1 when the
committed JSON differs from what this script generates.

Every query selects series with ``environment=~"$environment", fraise=~"$fraise"`` and first
aggregates with ``max by (environment, fraise, ...)``. Pushed series get ``environment`` and
``fraise`` from the Pushgateway grouping key, and the ``metrics.serve`` exporter sets them as
labels. When Prometheus scrapes both sources, the same value arrives twice under different
``job`` and ``instance`` labels, and the ``max`` keeps one copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

OUTPUT = Path(__file__).with_name("grafana-dashboard.json")
UID = "fraisier-deploys"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Series selector shared by every panel query.
SELECTOR = 'environment=~"$environment", fraise=~"$fraise"'
# The pushed group name of Fraisier on the Pushgateway (the "job" grouping label).
PUSH_JOB = 'job="fraisier"'


def _query(
    expr: str, legend: str, ref_id: str = "A", instant: bool = False
) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )
    return query.instant() if instant else query.range()


def _counter_increase(metric: str, by: str, window: str, extra: str = "") -> str:
    matchers = f"{SELECTOR}, {extra}" if extra else SELECTOR
    return f"max by (environment, fraise, {by}) (increase({metric}{{{matchers}}}[{window}]))"


def _quantile(quantile: float, histogram: str) -> str:
    buckets = _counter_increase(f"{histogram}_bucket", "le", "$window")
    return f"histogram_quantile({quantile}, sum by (le) ({buckets}))"


def _timeseries(title: str, description: str, unit: str, width: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(common_model.LegendDisplayMode.LIST)
            .placement(common_model.LegendPlacement.BOTTOM)
        )
    )


def _stat(title: str, description: str, unit: str, width: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(5)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def _variables() -> list[object]:
    datasource = dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    environment = (
        dashboard.QueryVariable("environment")
        .label("Environment")
        .datasource(DATASOURCE)
        .query("label_values(fraisier_last_run_timestamp_seconds, environment)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    fraise = (
        dashboard.QueryVariable("fraise")
        .label("Fraise")
        .datasource(DATASOURCE)
        .query(
            'label_values(fraisier_last_run_timestamp_seconds{environment=~"$environment"}, fraise)'
        )
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    window = (
        dashboard.IntervalVariable("window")
        .label("Window")
        .description("Range of the increase() in trend panels; deploys are rare, so use hours.")
        .values("1h,6h,1d,7d,30d")
        .current(model.VariableOption(selected=True, text="1d", value="1d"))
    )
    return [datasource, environment, fraise, window]


def _panels() -> list[object]:
    success = _counter_increase(
        "fraisier_deployments_total", "status", "$__range", 'status="success"'
    )
    ended = _counter_increase("fraisier_deployments_total", "status", "$__range")
    success_rate = (
        _stat(
            "Deploy success rate",
            "Successful deploy runs divided by all ended deploy runs in the time range.",
            "percentunit",
        )
        .with_target(_query(f"sum({success}) / sum({ended})", "success rate", instant=True))
        .min(0)
        .max(1)
    )

    active = _stat(
        "Active deployments",
        "Runs in progress now, summed over the selected environments and fraises.",
        "none",
    ).with_target(
        _query(
            f"sum(max by (environment, fraise) (fraisier_active_deployments{{{SELECTOR}}}))",
            "active",
            instant=True,
        )
    )

    since_success = _stat(
        "Time since last successful deploy",
        "Age of the newest successful deploy run, per environment and fraise.",
        "s",
        width=12,
    ).with_target(
        _query(
            "time() - max by (environment, fraise) "
            f"(fraisier_last_success_timestamp_seconds{{{SELECTOR}}})",
            "{{environment}}/{{fraise}}",
            instant=True,
        )
    )

    by_status = _timeseries(
        "Deploys by status",
        "Deploy runs that ended in each window, by final status.",
        "short",
    ).with_target(
        _query(
            "sum by (status) "
            f"({_counter_increase('fraisier_deployments_total', 'status', '$window')})",
            "{{status}}",
        )
    )

    duration = (
        _timeseries(
            "Deploy duration (median and p95)",
            "Quantiles of deploy run durations over each window, from the run database.",
            "s",
        )
        .with_target(_query(_quantile(0.5, "fraisier_deploy_duration_seconds"), "median", "A"))
        .with_target(_query(_quantile(0.95, "fraisier_deploy_duration_seconds"), "p95", "B"))
        .with_target(
            _query(
                f"max by (environment, fraise) (fraisier_last_run_duration_seconds{{{SELECTOR}}})",
                "last run {{environment}}/{{fraise}}",
                "C",
            )
        )
    )

    errors = _timeseries(
        "Errors by code",
        "Errors recorded in each window, by error code.",
        "short",
    ).with_target(
        _query(
            f"sum by (code) ({_counter_increase('fraisier_errors_total', 'code', '$window')})",
            "{{code}}",
        )
    )

    rollbacks = _timeseries(
        "Rollbacks by reason",
        "Rollbacks recorded in each window, by reason.",
        "short",
    ).with_target(
        _query(
            "sum by (reason) "
            f"({_counter_increase('fraisier_rollbacks_total', 'reason', '$window')})",
            "{{reason}}",
        )
    )

    hosts = (
        _timeseries(
            "Hosts per result in the last run",
            "Hosts of the last run that failed or were rolled back, with the hosts targeted.",
            "short",
        )
        .with_target(
            _query(
                "max by (environment, fraise) "
                f'(fraisier_last_run_hosts{{{SELECTOR}, result="failed"}})',
                "failed {{environment}}/{{fraise}}",
                "A",
            )
        )
        .with_target(
            _query(
                "max by (environment, fraise) "
                f'(fraisier_last_run_hosts{{{SELECTOR}, result="rolled_back"}})',
                "rolled back {{environment}}/{{fraise}}",
                "B",
            )
        )
        .with_target(
            _query(
                "max by (environment, fraise) "
                f'(fraisier_last_run_hosts{{{SELECTOR}, result="targeted"}})',
                "targeted {{environment}}/{{fraise}}",
                "C",
            )
        )
    )

    health = (
        _timeseries(
            "Health-check duration (median and p95)",
            "Quantiles of health_check step durations over each window.",
            "s",
        )
        .with_target(
            _query(_quantile(0.5, "fraisier_health_check_duration_seconds"), "median", "A")
        )
        .with_target(_query(_quantile(0.95, "fraisier_health_check_duration_seconds"), "p95", "B"))
    )

    steps = _timeseries(
        "Step durations of the last run",
        "Duration of each recipe step in the last run, max over hosts.",
        "s",
    ).with_target(
        _query(
            f"max by (environment, fraise, step) (fraisier_step_duration_seconds{{{SELECTOR}}})",
            "{{step}} {{environment}}/{{fraise}}",
        )
    )

    push_age = _stat(
        "Time since last push",
        "Age of the newest successful push to the Pushgateway, per environment and fraise.",
        "s",
        width=12,
    ).with_target(
        _query(
            f"time() - max by (environment, fraise) (push_time_seconds{{{PUSH_JOB}, {SELECTOR}}})",
            "{{environment}}/{{fraise}}",
            instant=True,
        )
    )

    push_failing = _stat(
        "Groups with a failing push",
        "Groups whose newest push failed after their newest successful push.",
        "none",
        width=12,
    ).with_target(
        _query(
            "count("
            f"max by (environment, fraise) (push_failure_time_seconds{{{PUSH_JOB}, {SELECTOR}}})"
            " > max by (environment, fraise) "
            f"(push_time_seconds{{{PUSH_JOB}, {SELECTOR}}})"
            ") or vector(0)",
            "failing",
            instant=True,
        )
    )

    return [
        success_rate,
        active,
        since_success,
        by_status,
        duration,
        errors,
        rollbacks,
        hosts,
        health,
        steps,
        push_age,
        push_failing,
    ]


def build() -> dict[str, object]:
    """Build the dashboard and return it as a JSON-ready dict with panel ids 1, 2, ..."""
    builder = (
        dashboard.Dashboard("Fraisier deploys")
        .uid(UID)
        .tags(["fraisier", "deploy"])
        .description("Deploy runs of Fraisier: outcomes, durations, errors, rollbacks and pushes.")
        .time("now-7d", "now")
        .refresh("1m")
        .editable()
    )
    for variable in _variables():
        builder = builder.with_variable(variable)
    for panel_id, panel in enumerate(_panels(), start=1):
        builder = builder.with_panel(panel.id(panel_id))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render() -> str:
    """Render the dashboard as the exact text written to grafana-dashboard.json."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write grafana-dashboard.json, or with --check compare it and return 1 on a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the committed JSON differs from the generated one, write nothing",
    )
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help=f"file to write or compare (default {OUTPUT})"
    )
    args = parser.parse_args(argv)

    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} differs from the generated dashboard; "
                "run 'python monitoring/dashboard.py' and commit the result",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

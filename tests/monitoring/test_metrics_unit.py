"""Tests of fraisier.metrics without a server: the metric table, registries and URL settings."""

from __future__ import annotations

import dataclasses

import pytest
from monitoring_helpers import (
    RECIPE_STEPS,
    parse_samples,
    sample_value,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fraisier import metrics
from fraisier.errors import ConfigurationError
from fraisier.redact import register_secret


def _families(registry) -> dict[str, tuple[str, str]]:
    text = generate_latest(registry).decode()
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def _exposed(registry) -> set[str]:
    return {name for name, _, _ in parse_samples(generate_latest(registry).decode())}


def test_metric_table_is_consistent():
    names = [spec.name for spec in metrics.METRICS]
    assert len(names) == len(set(names))
    for spec in metrics.METRICS:
        assert spec.name.startswith("fraisier_"), spec.name
        assert spec.kind in ("counter", "gauge", "histogram"), spec
        assert spec.source in (metrics.SOURCE_DATABASE, metrics.SOURCE_RUN), spec
        assert spec.help.endswith("."), spec
        assert "environment" not in spec.labels, spec
        assert "fraise" not in spec.labels, spec
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec
        if spec.kind == "histogram":
            assert spec.buckets == tuple(sorted(spec.buckets)), spec
            assert spec.buckets, spec


def test_run_registry_emits_every_metric(record_run):
    record_run("success")
    recorded = record_run("failed", error_code="command_failed")

    registry = metrics.build_run_registry(
        recorded.run, recorded.hosts, recorded.steps, recorded.stats
    )

    assert _exposed(registry) == metrics.exposed_names()


def test_store_collector_emits_every_metric(store, record_run):
    record_run("success")
    record_run("rolled_back", rollback_reason="health_check_failed", fraise="etl")

    registry = metrics.collect_from_store(store)
    samples = parse_samples(generate_latest(registry).decode())

    assert {name for name, _, _ in samples} == metrics.exposed_names()
    for name, labels, _ in samples:
        assert labels.get("environment") == "prod", (name, labels)
        assert labels.get("fraise") in ("api", "etl"), (name, labels)


def test_type_and_help_stable_across_registries(store, record_run):
    first = record_run("success")
    second = record_run("failed", error_code="timeout")
    without_database = metrics.build_run_registry(second.run, second.hosts, second.steps, None)

    registries = [
        metrics.build_run_registry(first.run, first.hosts, first.steps, first.stats),
        metrics.build_run_registry(second.run, second.hosts, second.steps, second.stats),
        without_database,
        metrics.build_start_registry(),
        metrics.collect_from_store(store),
    ]
    seen: dict[str, tuple[str, str]] = {}
    for registry in registries:
        for name, type_and_help in _families(registry).items():
            seen.setdefault(name, type_and_help)
            assert seen[name] == type_and_help, name
    for spec in metrics.METRICS:
        family = spec.name.removesuffix("_total")
        assert seen[family] == (spec.kind, spec.help), spec.name


def test_run_values_from_records(record_run):
    record_run("success")
    recorded = record_run("failed", error_code="command_failed", duration=75.0)

    registry = metrics.build_run_registry(
        recorded.run, recorded.hosts, recorded.steps, recorded.stats
    )
    samples = parse_samples(generate_latest(registry).decode())

    assert sample_value(samples, "fraisier_deployments_total", status="success") == 1
    assert sample_value(samples, "fraisier_deployments_total", status="failed") == 1
    assert sample_value(samples, "fraisier_deployments_total", status="rolled_back") == 0
    assert sample_value(samples, "fraisier_errors_total", code="command_failed") == 1
    # Known codes and reasons are pushed as 0 before they first happen.
    assert sample_value(samples, "fraisier_errors_total", code="health_check_failed") == 0
    assert sample_value(samples, "fraisier_rollbacks_total", reason="health_check") == 0
    assert sample_value(samples, "fraisier_last_run_success") == 0
    assert sample_value(samples, "fraisier_last_run_status", status="failed") == 1
    assert sample_value(samples, "fraisier_last_run_status", status="success") == 0
    assert sample_value(samples, "fraisier_last_run_duration_seconds") == 75
    assert sample_value(samples, "fraisier_last_run_hosts", result="targeted") == 2
    assert sample_value(samples, "fraisier_last_run_hosts", result="success") == 1
    assert sample_value(samples, "fraisier_last_run_hosts", result="failed") == 1
    assert sample_value(samples, "fraisier_last_run_hosts", result="rolled_back") == 0
    assert sample_value(samples, "fraisier_active_deployments") == 0
    assert sample_value(samples, "fraisier_deploy_duration_seconds_count") == 2
    assert sample_value(samples, "fraisier_deploy_duration_seconds_sum") == 40 + 75
    assert sample_value(samples, "fraisier_deploy_duration_seconds_bucket", le="60.0") == 1
    assert sample_value(samples, "fraisier_deploy_duration_seconds_bucket", le="120.0") == 2
    assert sample_value(samples, "fraisier_health_check_duration_seconds_count") == 4
    # The second host takes one second longer per step, and the gauge keeps the max.
    for name, seconds in RECIPE_STEPS:
        assert sample_value(samples, "fraisier_step_duration_seconds", step=name) == seconds + 1
    # The newest success is the first run, not this failed one.
    assert (
        sample_value(samples, "fraisier_last_success_timestamp_seconds")
        == recorded.stats.last_success_at.timestamp()
    )
    assert recorded.stats.last_success_at < recorded.run.ended_at


def test_run_registry_without_database(record_run):
    failed = record_run("failed")
    success = record_run("success", duration=30.0)

    failed_names = _exposed(
        metrics.build_run_registry(failed.run, failed.hosts, failed.steps, None)
    )
    success_samples = parse_samples(
        generate_latest(
            metrics.build_run_registry(success.run, success.hosts, success.steps, None)
        ).decode()
    )

    database_names = {
        name
        for spec in metrics.METRICS
        if spec.source == metrics.SOURCE_DATABASE
        for name in (spec.name, f"{spec.name}_count")
    }
    # A POST leaves the metrics it omits untouched on the gateway.
    assert not failed_names & (database_names - {"fraisier_active_deployments"})
    assert "fraisier_last_success_timestamp_seconds" not in failed_names
    assert "fraisier_last_run_timestamp_seconds" in failed_names
    assert (
        sample_value(success_samples, "fraisier_last_success_timestamp_seconds")
        == success.run.ended_at.timestamp()
    )


def test_label_values_are_redacted_and_cut(record_run):
    register_secret("hunter2-secret")
    recorded = record_run("failed")
    steps = [dataclasses.replace(recorded.steps[0], name="deploy token=hunter2-secret")]
    long_reason = "x" * 500
    stats = dataclasses.replace(recorded.stats, rollbacks_by_reason={long_reason: 2})

    text = generate_latest(
        metrics.build_run_registry(recorded.run, recorded.hosts, steps, stats)
    ).decode()
    samples = parse_samples(text)

    assert "hunter2-secret" not in text
    step_labels = [labels["step"] for name, labels, _ in samples if "step" in labels]
    assert step_labels == ["deploy token=***"]
    reasons = {labels["reason"]: value for name, labels, value in samples if "reason" in labels}
    assert reasons["x" * metrics.MAX_LABEL_VALUE_LENGTH] == 2
    assert set(reasons) == {*metrics.ROLLBACK_REASONS, "x" * metrics.MAX_LABEL_VALUE_LENGTH}


def test_start_registry_holds_active_only():
    samples = parse_samples(generate_latest(metrics.build_start_registry()).decode())

    assert samples == [("fraisier_active_deployments", {}, 1.0)]


def test_exposed_names_cover_histogram_series():
    names = metrics.exposed_names()

    assert "fraisier_deploy_duration_seconds_bucket" in names
    assert "fraisier_deploy_duration_seconds_count" in names
    assert "fraisier_deploy_duration_seconds" not in names
    assert "fraisier_deployments_total" in names


@pytest.mark.parametrize(
    ("environment", "setting", "expected"),
    [
        (None, None, None),
        (None, "", None),
        (None, "http://127.0.0.1:9091", "http://127.0.0.1:9091"),
        ("http://127.0.0.1:9092", "http://127.0.0.1:9091", "http://127.0.0.1:9092"),
        ("  ", "https://127.0.0.1:9091/prefix", "https://127.0.0.1:9091/prefix"),
    ],
)
def test_resolve_url_environment_wins(monkeypatch, environment, setting, expected):
    if environment is None:
        monkeypatch.delenv(metrics.PUSHGATEWAY_URL_ENV, raising=False)
    else:
        monkeypatch.setenv(metrics.PUSHGATEWAY_URL_ENV, environment)

    assert metrics.resolve_pushgateway_url(setting) == expected


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:9091", "ftp://127.0.0.1:9091", "http://", "http://127.0.0.1:99999"],
)
def test_resolve_url_rejects_invalid(monkeypatch, value):
    monkeypatch.delenv(metrics.PUSHGATEWAY_URL_ENV, raising=False)

    with pytest.raises(ConfigurationError) as caught:
        metrics.resolve_pushgateway_url(value)

    assert "settings.pushgateway" in str(caught.value)


def test_resolve_url_masks_password(monkeypatch):
    monkeypatch.setenv(metrics.PUSHGATEWAY_URL_ENV, "ftp://pusher:s3cr3t-pw@127.0.0.1:9091")

    with pytest.raises(ConfigurationError) as caught:
        metrics.resolve_pushgateway_url(None)

    assert "s3cr3t-pw" not in str(caught.value)
    assert metrics.PUSHGATEWAY_URL_ENV in str(caught.value)


def test_push_without_url_does_nothing(record_run):
    recorded = record_run("success")

    assert metrics.push_run_metrics(None, recorded.run, [], [], None) is None
    assert metrics.push_run_start(None, "prod", "api") is None

"""Batch faults: a failing canary and max_fail_percentage with on_failure rollback or leave."""

from __future__ import annotations

from typing import Any

import pytest
from faultlab import Lab

from fraisier.errors import ExitCode


def fail_on(host_name: str) -> list[dict[str, Any]]:
    """Return a step that fails on ``host_name`` only."""
    return [
        {
            "name": "preflight",
            "run": (
                f"if [ {{{{ host }}}} = {host_name} ]; then "
                "echo 'preflight failed: disk full' >&2; exit 1; fi"
            ),
        }
    ]


def test_failed_canary_skips_later_batches(lab: Lab) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe(before_switch=fail_on(h1.name))
    lab.write_inventory(settings={"serial": [1, "100%"]})

    outcome = lab.deploy()

    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.run["status"] == "failed"
    assert outcome.host(h1.name)["status"] == "failed"
    assert "disk full" in outcome.host(h1.name)["error"]
    for host in (h2, h3):
        entry = outcome.host(host.name)
        assert entry["status"] == "skipped"
        assert "not started" in entry["error"]
    for host in lab.hosts:
        assert lab.current(host) == release_a
    detail = lab.run_detail(outcome.run_id)
    assert detail.run.status == "failed"
    statuses = {h.host: h.status for h in detail.hosts}
    assert statuses == {h1.name: "failed", h2.name: "skipped", h3.name: "skipped"}
    # Skipped hosts were only connected to and locked before the canary ran, so their one
    # step record is that connection.
    assert {(s.host, s.name) for s in detail.steps if s.host != h1.name} == {
        (h2.name, "connect"),
        (h3.name, "connect"),
    }


@pytest.mark.parametrize("on_failure", ["rollback", "leave"])
def test_threshold_stops_run(lab: Lab, on_failure: str) -> None:
    release_a = lab.deploy_ok()
    h1, h2, h3 = lab.hosts
    lab.write_recipe(before_switch=fail_on(h2.name))
    lab.write_inventory(settings={"serial": 1, "max_fail_percentage": 0, "on_failure": on_failure})

    outcome = lab.deploy()

    release_b = outcome.run["release"]
    assert outcome.code == ExitCode.DEPLOY_FAILED
    assert outcome.host(h2.name)["status"] == "failed"
    assert outcome.host(h2.name)["final_release"] == release_a
    assert outcome.host(h3.name)["status"] == "skipped"
    assert lab.current(h2) == release_a
    assert lab.current(h3) == release_a
    detail = lab.run_detail(outcome.run_id)
    recorded = {h.host: h for h in detail.hosts}
    if on_failure == "rollback":
        assert outcome.run["status"] == "rolled_back"
        assert outcome.host(h1.name)["status"] == "rolled_back"
        assert outcome.host(h1.name)["final_release"] == release_a
        assert lab.current(h1) == release_a
        assert lab.release_state(h1, release_b) == "failed"
        assert detail.run.status == "rolled_back"
        # h1 itself was healthy: it was rolled back because the run failed on h2.
        assert detail.run.rollback_reason == "run_failed"
        assert recorded[h1.name].final_release == release_a
    else:
        assert outcome.run["status"] == "failed"
        assert outcome.host(h1.name)["status"] == "success"
        assert outcome.host(h1.name)["final_release"] == release_b
        assert lab.current(h1) == release_b
        assert detail.run.status == "failed"
        assert detail.run.rollback_reason is None
        assert recorded[h1.name].final_release == release_b
    for host in lab.hosts:
        assert not lab.lock_exists(host)

"""End-to-end tests of the ``rollback`` and ``releases`` tasks on three real SSH hosts."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_helpers import TestProject, wait_for_release

pytestmark = pytest.mark.ssh


def rollback(project: TestProject, *args: str) -> Any:
    """Run ``rollback --json`` and return the result."""
    return project.fraisier("rollback", "--json", "--log-format", "console", *args)


def assert_everywhere(project: TestProject, release: str) -> None:
    """Check that every host's ``current`` and running service are on ``release``."""
    for host in project.hosts:
        assert project.current_on(host) == release, host.name
        assert wait_for_release(host.address, project.port, release) == release, host.name


@pytest.fixture
def two_releases(project: TestProject) -> tuple[str, str]:
    """Deploy twice and return the two release ids, oldest first."""
    return project.deployed_release(), project.deployed_release()


def test_rollback_steps_back_once(project: TestProject, two_releases: tuple[str, str]) -> None:
    first, second = two_releases

    result = rollback(project)

    assert result.returncode == 0, str(result)
    run = result.json()[0]
    assert run["task"] == "rollback"
    assert run["status"] == "success"
    for entry in run["hosts"]:
        assert entry["status"] == "success"
        assert entry["previous_release"] == second
        assert entry["final_release"] == first
    assert_everywhere(project, first)

    rows = project.fraisier("releases", "--json").json()

    for row in rows:
        assert row["current"] == first
        assert [r["id"] for r in row["releases"]] == [first, second]

    again = rollback(project)

    assert again.returncode == 2, str(again)
    assert "no earlier good release to roll back to" in again.output
    assert f"(current: {first})" in again.output
    assert_everywhere(project, first)


def test_rollback_to_release(project: TestProject, two_releases: tuple[str, str]) -> None:
    first, second = two_releases
    assert rollback(project, "--to", first).returncode == 0
    assert_everywhere(project, first)

    result = rollback(project, "--to", second)

    assert result.returncode == 0, str(result)
    for entry in result.json()[0]["hosts"]:
        assert entry["previous_release"] == first
        assert entry["final_release"] == second
    assert_everywhere(project, second)


def test_rollback_to_failed_release(project: TestProject) -> None:
    good = project.deployed_release()
    project.use_source(project.source_copy("broken", marker="UNHEALTHY"))
    project.update(
        lambda data: data["fraises"]["hello"]["health_check"].update(retries=1, delay=0.2)
    )
    bad = project.deploy(expect=1).json()[0]["release"]

    result = rollback(project, "--to", bad)

    assert result.returncode == 2, str(result)
    assert f"release {bad} on {project.hosts[0].name} is marked failed" in result.output
    assert "choose a release marked ready, healthy or rolled_back" in result.output
    assert_everywhere(project, good)


def test_rollback_to_unknown_release(project: TestProject) -> None:
    good = project.deployed_release()

    result = rollback(project, "--to", "20200101000000000-abcdef")

    assert result.returncode == 2, str(result)
    assert "release 20200101000000000-abcdef not found on" in result.output
    assert f"releases there: {good}" in result.output
    assert_everywhere(project, good)


def test_releases_lists_current(project: TestProject, two_releases: tuple[str, str]) -> None:
    first, second = two_releases

    listed = project.fraisier("releases", "--json")

    assert listed.returncode == 0, str(listed)
    rows = {row["host"]: row for row in listed.json()}
    assert sorted(rows) == sorted(host.name for host in project.hosts)
    for row in rows.values():
        assert row["fraise"] == "hello"
        assert row["current"] == second
        assert row["releases"] == [
            {"id": first, "state": "healthy"},
            {"id": second, "state": "healthy"},
        ]

    text = project.fraisier("releases")

    assert text.returncode == 0, str(text)
    for host in project.hosts:
        assert f"hello {host.name}: current {second}" in text.stdout
    assert f"  * {second}  healthy" in text.stdout
    assert f"    {first}  healthy" in text.stdout


def test_rollback_restart_fails(project: TestProject, two_releases: tuple[str, str]) -> None:
    first, _ = two_releases
    host = project.hosts[0]
    # The first release no longer starts on this host.
    app = project.deploy_path(host) / "releases" / first / "app.py"
    app.write_text('raise SystemExit("cannot start")\n')

    result = rollback(project, "--to", first)

    assert result.returncode == 3, str(result)
    entry = {e["host"]: e for e in result.json()[0]["hosts"]}[host.name]
    assert entry["status"] == "failed"
    assert project.current_on(host) == first
    assert entry["final_release"] == first
    assert f"current points at {first}" in entry["error"]


def test_rollback_to_release_missing_on_one_host(
    project: TestProject, two_releases: tuple[str, str]
) -> None:
    import shutil

    first, second = two_releases
    missing_on = project.hosts[1]
    shutil.rmtree(project.deploy_path(missing_on) / "releases" / first)

    result = rollback(project, "--to", first)

    assert result.returncode == 2, str(result)
    entries = {e["host"]: e for e in result.json()[0]["hosts"]}
    assert entries[missing_on.name]["status"] == "failed"
    assert f"release {first} not found on {missing_on.name}" in entries[missing_on.name]["error"]
    for host in project.hosts:
        assert project.current_on(host) == second, host.name
        if host is not missing_on:
            assert entries[host.name]["status"] == "skipped"
            assert f"cannot be used on {missing_on.name}" in entries[host.name]["error"]

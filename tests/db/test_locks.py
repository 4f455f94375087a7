"""Cross-controller deploy locks between real processes on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from history_data import at

from fraisier.db import open_store
from fraisier.errors import ExitCode, LockHeldError
from fraisier.records import LockHolder

pytestmark = pytest.mark.database


def _holder(run_id: str) -> LockHolder:
    return LockHolder(run_id, "parent", "test-controller", at(0), os.getpid())


def test_two_processes_race_one_wins(databases, dialect, lock_holder):
    url = databases.url(dialect)
    open_store(url).migrate()

    first = lock_holder(url, "run-a", hold=4)
    second = lock_holder(url, "run-b", hold=4)
    events = [json.loads(first.read_line()), json.loads(second.read_line())]

    winners = [e for e in events if e["event"] == "locked"]
    losers = [e for e in events if e["event"] == "held"]
    assert len(winners) == 1
    assert len(losers) == 1
    winner = winners[0]["run_id"]
    assert losers[0]["holder"]["run_id"] == winner
    assert losers[0]["holder"]["user"] == "tester"
    assert f"run {winner} by tester on " in losers[0]["message"]
    assert " since " in losers[0]["message"]
    codes = sorted(p.finish()[0] for p in (first, second))
    assert codes == [0, int(ExitCode.LOCK_HELD)]


def test_wait_seconds_waits_for_release(databases, dialect, lock_holder):
    url = databases.url(dialect)
    store = open_store(url)
    databases.stores.append(store)
    store.migrate()
    child = lock_holder(url, "run-child", hold=1.5)
    assert json.loads(child.read_line())["event"] == "locked"

    started = time.monotonic()
    with store.lock("prod", "api", _holder("run-parent"), wait_seconds=20):
        waited = time.monotonic() - started
        assert store.read_holder("prod", "api").run_id == "run-parent"

    assert waited >= 0.5
    assert child.finish()[0] == 0


def test_short_wait_raises_naming_holder(databases, dialect, lock_holder):
    url = databases.url(dialect)
    store = open_store(url)
    databases.stores.append(store)
    store.migrate()
    child = lock_holder(url, "run-child", hold=10)
    assert json.loads(child.read_line())["event"] == "locked"

    started = time.monotonic()
    with (
        pytest.raises(LockHeldError) as caught,
        store.lock("prod", "api", _holder("run-parent"), wait_seconds=0.6),
    ):
        pytest.fail("the lock was taken while another process holds it")

    assert time.monotonic() - started >= 0.6
    assert "after waiting 0.6 s" in str(caught.value)
    assert caught.value.holder["run_id"] == "run-child"
    assert caught.value.holder["pid"] == child.process.pid
    assert caught.value.exit_code == ExitCode.LOCK_HELD
    assert caught.value.context == {"environment": "prod", "fraise": "api"}


def test_sigkilled_holder_releases_lock(databases, dialect, lock_holder):
    url = databases.url(dialect)
    store = open_store(url)
    databases.stores.append(store)
    store.migrate()
    child = lock_holder(url, "run-dead", hold=120)
    assert json.loads(child.read_line())["event"] == "locked"

    os.kill(child.process.pid, signal.SIGKILL)
    child.process.wait(timeout=10)
    stale = store.read_holder("prod", "api")

    with store.lock("prod", "api", _holder("run-next"), wait_seconds=15):
        current = store.read_holder("prod", "api")

    assert stale is not None
    assert stale.run_id == "run-dead"
    assert current.run_id == "run-next"
    assert current.user == "parent"
    assert store.read_holder("prod", "api") is None


def test_lock_excludes_within_one_process(store):
    with store.lock("prod", "api", _holder("run-1")):
        with (
            pytest.raises(LockHeldError, match="held by run run-1 by parent"),
            store.lock("prod", "api", _holder("run-2")),
        ):
            pytest.fail("a second session took a held lock")
        with store.lock("prod", "web", _holder("run-3")):
            assert store.read_holder("prod", "web").run_id == "run-3"
        with store.lock("staging", "api", _holder("run-4")):
            assert store.read_holder("staging", "api").run_id == "run-4"

    with store.lock("prod", "api", _holder("run-2")):
        assert store.read_holder("prod", "api").run_id == "run-2"


def test_lock_released_when_block_raises(store):
    with (
        pytest.raises(RuntimeError, match="deploy failed"),
        store.lock("prod", "api", _holder("run-1")),
    ):
        raise RuntimeError("deploy failed")

    assert store.read_holder("prod", "api") is None
    with store.lock("prod", "api", _holder("run-2")):
        assert store.read_holder("prod", "api").run_id == "run-2"


def test_negative_wait_is_rejected(store):
    with (
        pytest.raises(ValueError, match="wait_seconds"),
        store.lock("prod", "api", _holder("run-1"), wait_seconds=-1),
    ):
        pytest.fail("a negative wait was accepted")

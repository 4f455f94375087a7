"""Fixtures of the monitoring tests; the helpers behind them are in monitoring_helpers.py.

The Pushgateway and Prometheus fixtures come from tests/conftest.py.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from monitoring_helpers import RunWriter, StatusServer, make_status_handler, open_test_store

from fraisier.db.base import RunStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    """Open a migrated SQLite run store in ``tmp_path``; close it at teardown."""
    run_store = open_test_store(tmp_path / "runs.sqlite")
    yield run_store
    run_store.close()


@pytest.fixture
def record_run(store: RunStore) -> RunWriter:
    """Return a RunWriter over the ``store`` fixture."""
    return RunWriter(store)


@pytest.fixture
def status_server() -> Iterator[Callable[[int, bytes], StatusServer]]:
    """Provide ``start(status, body)``, which starts a StatusServer on 127.0.0.1."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(status: int, body: bytes) -> StatusServer:
        requests: list[dict[str, str]] = []
        handler = make_status_handler(status, body, requests)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return StatusServer(f"http://127.0.0.1:{server.server_address[1]}", requests)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()

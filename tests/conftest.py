"""Shared fixtures: real sshd test hosts, inventories, Pushgateway, Prometheus and databases.

The classes behind these fixtures live in ``tests/support``, and docs/testing.md describes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    Prometheus,
    Pushgateway,
    SshHost,
    check_database,
    testinfra_host_for,
    write_inventory,
)

POSTGRES_URL = os.environ.get(
    "FRAISIER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("FRAISIER_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")


# SSH test hosts


@pytest.fixture
def ssh_host_factory() -> Iterator[Callable[[int], list[SshHost]]]:
    """Provide ``factory(count)`` that starts ``count`` new hosts, all closed at teardown."""
    started: list[SshHost] = []

    def factory(count: int = 1) -> list[SshHost]:
        if count < 1:
            raise ValueError(f"ssh_host_factory needs a count of at least 1; got {count}")
        hosts = []
        for _ in range(count):
            host = SshHost()
            started.append(host)
            host.start()
            hosts.append(host)
        return hosts

    yield factory
    errors = []
    for host in started:
        try:
            host.close()
        except Exception as exc:
            errors.append(f"{host!r}: {exc}")
    if errors:
        pytest.fail("closing test hosts failed: " + "; ".join(errors))


@pytest.fixture(scope="session")
def ssh_hosts3_session() -> Iterator[list[SshHost]]:
    """Start three hosts once per test session. Tests use ``ssh_hosts3``, which resets them."""
    hosts: list[SshHost] = []
    try:
        for _ in range(3):
            host = SshHost()
            hosts.append(host)
            host.start()
        yield hosts
    finally:
        for host in hosts:
            host.close()


@pytest.fixture
def ssh_hosts3(ssh_hosts3_session: list[SshHost]) -> list[SshHost]:
    """Return the three session hosts: started, thawed, no sessions, empty deploy roots."""
    for host in ssh_hosts3_session:
        host.reset()
    return ssh_hosts3_session


@pytest.fixture
def ssh_host(ssh_hosts3: list[SshHost]) -> SshHost:
    """Return the first of the three reset session hosts."""
    return ssh_hosts3[0]


@pytest.fixture
def inventory_for(tmp_path: Path) -> Callable[..., Path]:
    """Provide ``inventory_for(hosts, fraises=None, settings=None, vars=None, path=None)``.

    It writes ``tmp_path/inventories/test.yaml`` (or ``path``), a known_hosts file with every
    host's key and a SQLite database URL in ``tmp_path``, and returns the inventory path.
    """

    def inventory_for(
        hosts: list[SshHost],
        fraises: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        vars: dict[str, Any] | None = None,
        path: str | Path | None = None,
    ) -> Path:
        return write_inventory(tmp_path, hosts, fraises, settings, vars, path)

    return inventory_for


@pytest.fixture
def testinfra_host() -> Iterator[Callable[[SshHost], Any]]:
    """Provide ``testinfra_host(ssh_host)``: a testinfra host that checks the host key."""
    opened: list[Any] = []

    def connect(ssh_host: SshHost) -> Any:
        host = testinfra_host_for(ssh_host)
        opened.append(host)
        return host

    yield connect
    for host in opened:
        client = host.backend.__dict__.pop("client", None)
        if client is not None:
            client.close()


# Monitoring servers


@pytest.fixture
def pushgateway() -> Iterator[Pushgateway]:
    """Start a Pushgateway on 127.0.0.1 with in-memory storage; stop it at teardown."""
    with Pushgateway() as server:
        yield server


@pytest.fixture
def prometheus(pushgateway: Pushgateway) -> Iterator[Prometheus]:
    """Start a Prometheus that scrapes the ``pushgateway`` fixture every second."""
    with Prometheus(pushgateway) as server:
        yield server


# Databases


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Return the URL of the test PostgreSQL database, or fail if the server is unreachable."""
    try:
        check_database(POSTGRES_URL)
    except RuntimeError as exc:
        pytest.fail(f"PostgreSQL is needed for this test: {exc}", pytrace=False)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """Return the URL of the test MySQL/MariaDB database, or fail if it is unreachable."""
    try:
        check_database(MYSQL_URL)
    except RuntimeError as exc:
        pytest.fail(f"MySQL/MariaDB is needed for this test: {exc}", pytrace=False)
    return MYSQL_URL

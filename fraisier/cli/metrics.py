"""The ``metrics.serve`` task: a Prometheus exporter computed from the run database."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from fraisier.errors import ConfigurationError, FraisierError

log = logging.getLogger("fraisier.cli.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001


def _database_url(database: str | None, env: str | None, inventory: str | None) -> str:
    """Return --database, else FRAISIER_DATABASE_URL, else the inventory setting or default."""
    from fraisier.app import find_project_root, load
    from fraisier.db import resolve_database_url

    if database:
        return database
    if env or inventory:
        loaded = load(env or "", inventory)
        return resolve_database_url(loaded.settings.database, loaded.project_root)
    return resolve_database_url(None, find_project_root())


def serve_metrics(
    database_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    environment: str | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve /metrics from the run database at ``database_url`` until ``stop`` is set.

    Without ``stop`` the function installs SIGINT and SIGTERM handlers that set its own event.
    """
    from prometheus_client import start_http_server

    from fraisier.db import open_store
    from fraisier.metrics import collect_from_store

    if not 0 < port < 65536:
        raise ConfigurationError(f"invalid --port {port}: use a TCP port between 1 and 65535")
    store = open_store(database_url)
    store.check_schema()
    registry = collect_from_store(store, environment)

    if stop is None:
        stop = threading.Event()

        def request_stop(signal_number: int, frame: FrameType | None) -> None:
            log.info("received signal %d, stopping the metrics exporter", signal_number)
            stop.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        store.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "choose a free port with --port or another address with --host"
        ) from None
    shown_host = f"[{host}]" if ":" in host else host
    log.info(
        "serving run database metrics on http://%s:%d/metrics (environment %s)",
        shown_host,
        port,
        environment or "all",
    )
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        store.close()
        log.info("metrics exporter on %s:%d stopped", shown_host, port)


@task(
    auto_shortflags=False,
    help={
        "port": f"TCP port to listen on (default {DEFAULT_PORT})",
        "host": f"address to listen on (default {DEFAULT_HOST}); 0.0.0.0 exposes it to the network",
        "env": "serve only this environment; its inventory's settings.database is used",
        "inventory": "inventory file to read settings.database from",
        "database": "run database URL (default: FRAISIER_DATABASE_URL, the inventory, var/)",
        "log-level": "log level: debug, info, warning or error (default: info)",
    },
)
def serve(
    c: Context,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    env: str | None = None,
    inventory: str | None = None,
    database: str | None = None,
    log_level: str | None = None,
) -> None:
    """Serve Prometheus metrics computed from the run database until SIGINT or SIGTERM."""
    from fraisier.logging import configure_logging

    configure_logging(level=log_level, fmt="auto")
    try:
        url = _database_url(database, env, inventory)
        serve_metrics(url, host=host, port=port, environment=env)
    except FraisierError as exc:
        raise Exit(f"error: {exc}", code=int(exc.exit_code)) from None


def metrics_collection() -> Collection:
    """Return the ``metrics`` task collection."""
    return Collection("metrics", serve)

"""Real Prometheus Pushgateway and Prometheus servers on 127.0.0.1 for monitoring tests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fraisier.tests.services")

PUSHGATEWAY_BINARY = "/usr/bin/prometheus-pushgateway"
PROMETHEUS_BINARY = "/usr/bin/prometheus"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# The proxy settings of the environment must never apply: every request here goes to a server
# that the tests started on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(address: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``address`` now, found by binding port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def http_request(
    url: str, method: str = "GET", data: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """Send one HTTP request without any proxy and return the status and body."""
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class _Server:
    """A server binary run as a child process on 127.0.0.1 with its own temporary directory."""

    binary = ""
    label = ""

    def __init__(self) -> None:
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fraisier-{self.label}-"))
        self.log_path = self.workdir / f"{self.label}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def _arguments(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until ``/-/ready`` returns 200. A restart keeps the port."""
        if self.running:
            return
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(
                f"{self.binary} is missing or not executable; install the Debian package "
                f"that provides it (.ci/run does)"
            )
        if not self.port:
            self.port = free_port()
        command = [self.binary, *self._arguments()]
        log.info("starting %s on port %s: %s", self.label, self.port, command)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no answer"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(
                    f"{self.label} exited during start on port {self.port}; "
                    f"its output:\n{self.log_tail()}"
                )
            try:
                status, _ = http_request(f"{self.url}/-/ready", timeout=1.0)
            except OSError as exc:
                last_error = str(exc)
            else:
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.label} on port {self.port} was not ready after {START_TIMEOUT:.0f} s "
            f"({last_error}); its output:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server with SIGTERM, then SIGKILL after a timeout, unless it is stopped."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; sending SIGKILL", self.label)
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._process = None

    def restart(self) -> None:
        """Stop and start the server on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, limit: int = 4000) -> str:
        """Return the last ``limit`` characters of the server's output."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pushgateway(_Server):
    """A Prometheus Pushgateway on 127.0.0.1 with the admin API enabled.

    Without ``persistence`` the metrics live in memory, so a restart loses them. With it the
    server saves them every second to a file in its temporary directory.
    """

    binary = PUSHGATEWAY_BINARY
    label = "pushgateway"

    def __init__(self, persistence: bool = False) -> None:
        super().__init__()
        self.persistence_file = self.workdir / "pushgateway.db" if persistence else None

    def _arguments(self) -> list[str]:
        arguments = [f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-admin-api"]
        if self.persistence_file is None:
            # Debian's build defaults to /var/lib/prometheus/pushgateway.data, a file that
            # every Pushgateway on the machine would share; an empty value turns it off.
            arguments.append("--persistence.file=")
        else:
            arguments += [
                f"--persistence.file={self.persistence_file}",
                "--persistence.interval=1s",
            ]
        return arguments

    def metrics_text(self) -> str:
        """Fetch ``/metrics`` in the Prometheus text format."""
        status, body = http_request(f"{self.url}/metrics")
        if status != 200:
            raise RuntimeError(f"GET {self.url}/metrics returned HTTP {status}: {body[:500]!r}")
        return body.decode()

    def groups(self) -> list[dict[str, Any]]:
        """Fetch the pushed groups from ``/api/v1/metrics``, each with its labels and metrics."""
        status, body = http_request(f"{self.url}/api/v1/metrics")
        if status != 200:
            raise RuntimeError(f"GET {self.url}/api/v1/metrics returned HTTP {status}")
        return list(json.loads(body)["data"])

    def wipe(self, timeout: float = 5.0) -> None:
        """Delete every pushed group through the admin API and wait until none is listed."""
        status, body = http_request(f"{self.url}/api/v1/admin/wipe", method="PUT")
        if status != 202:
            raise RuntimeError(f"PUT {self.url}/api/v1/admin/wipe returned HTTP {status}: {body!r}")
        # The Pushgateway accepts the wipe (HTTP 202) and deletes the groups afterwards.
        deadline = time.monotonic() + timeout
        while self.groups():
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the Pushgateway at {self.url} still listed groups {timeout} s after a wipe"
                )
            time.sleep(0.05)


class Prometheus(_Server):
    """A Prometheus server that scrapes one Pushgateway every second with ``honor_labels``.

    ``rule_files`` are copied into the configuration so alerting and recording rules are
    evaluated every second too.
    """

    binary = PROMETHEUS_BINARY
    label = "prometheus"

    def __init__(self, pushgateway: Pushgateway, rule_files: Sequence[str | Path] = ()) -> None:
        super().__init__()
        self.pushgateway = pushgateway
        self.rule_files = [str(Path(path).resolve()) for path in rule_files]
        self.config_path = self.workdir / "prometheus.yml"
        self.storage_path = self.workdir / "data"

    def _arguments(self) -> list[str]:
        self._write_config()
        return [
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.storage_path}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]

    def _write_config(self) -> None:
        # JSON is valid YAML, so the configuration needs no YAML writer here.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "scrape_interval": "1s",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.pushgateway.port}"]}],
                }
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_request(url)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise RuntimeError(
                f"GET {url} returned HTTP {status} and no JSON: {body[:500]!r}"
            ) from exc
        if status != 200 or payload.get("status") != "success":
            raise RuntimeError(f"GET {url} failed with HTTP {status}: {payload}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant PromQL query and return the ``result`` list of the vector."""
        data = self._api("/api/v1/query", {"query": expr})
        return list(data["result"])

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 15.0,
    ) -> list[dict[str, Any]]:
        """Repeat ``query(expr)`` until ``predicate`` accepts the result, and return it.

        Raises TimeoutError with the last result when ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"PromQL {expr!r} did not satisfy the predicate within {timeout} s; "
                    f"last result: {result}"
                )
            time.sleep(0.25)

    def targets(self) -> list[dict[str, Any]]:
        """Return the active scrape targets with their health and last error."""
        return list(self._api("/api/v1/targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """Return the pending and firing alerts."""
        return list(self._api("/api/v1/alerts")["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        """Return the loaded rule groups with the health of each rule."""
        return list(self._api("/api/v1/rules")["groups"])

    def reload(self) -> None:
        """Rewrite the configuration and ask the server to reload it through ``/-/reload``."""
        self._write_config()
        status, body = http_request(f"{self.url}/-/reload", method="POST", timeout=30.0)
        if status != 200:
            raise RuntimeError(f"POST {self.url}/-/reload returned HTTP {status}: {body!r}")


def check_database(url: str) -> None:
    """Open and close a connection to ``url``, or raise RuntimeError that names the server."""
    parsed = urllib.parse.urlsplit(url)
    try:
        if parsed.scheme in ("postgresql", "postgres"):
            import psycopg2

            with contextlib.closing(psycopg2.connect(url, connect_timeout=5)):
                pass
        elif parsed.scheme in ("mysql", "mysql+pymysql"):
            import pymysql

            connection = pymysql.connect(
                host=parsed.hostname or "127.0.0.1",
                port=parsed.port or 3306,
                user=urllib.parse.unquote(parsed.username or "root"),
                password=urllib.parse.unquote(parsed.password or ""),
                database=parsed.path.lstrip("/") or None,
                connect_timeout=5,
            )
            connection.close()
        else:
            raise ValueError(
                f"unsupported database URL scheme {parsed.scheme!r}; use postgresql:// or mysql://"
            )
    except ImportError as exc:
        raise RuntimeError(f"the driver for {parsed.scheme} is not installed: {exc}") from exc
    except ValueError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"cannot connect to {parsed.scheme} at {parsed.hostname}:{parsed.port} "
            f"database {parsed.path.lstrip('/')!r}: {type(exc).__name__}: {exc}. "
            f"Start the server (.ci/run does) or set the URL variable in docs/testing.md"
        ) from exc

"""Tests for fraisier.tracing: span tree, redaction, errors, OTLP/HTTP export and no-op mode."""

from __future__ import annotations

import http.server
import io
import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from fraisier import tracing
from fraisier.errors import HealthCheckError
from fraisier.logging import configure_logging, context_submit, reset_logging
from fraisier.redact import default_redactor, register_secret

PLANTED_SECRET = "planted-Trace-5093"


@pytest.fixture(autouse=True)
def clean_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(tracing.ENV_ENDPOINT, raising=False)
    monkeypatch.delenv(tracing.ENV_TRACES_ENDPOINT, raising=False)
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=memory) is True
    return memory


def spans_by_name(memory: InMemorySpanExporter) -> dict[str, list]:
    found: dict[str, list] = {}
    for finished in memory.get_finished_spans():
        found.setdefault(finished.name, []).append(finished)
    return found


def test_span_tree_and_attributes(exporter: InMemorySpanExporter) -> None:
    with (
        tracing.run_span("r-1", "prod", "api", **{"fraisier.release_id": "rel-1"}),
        tracing.host_span("web1"),
        tracing.step_span("build", attempt=2),
    ):
        pass

    spans = spans_by_name(exporter)
    (run,) = spans["fraisier.run"]
    (host,) = spans["fraisier.host"]
    (step,) = spans["fraisier.step"]
    assert run.parent is None
    assert host.parent.span_id == run.context.span_id
    assert step.parent.span_id == host.context.span_id
    assert step.context.trace_id == run.context.trace_id
    assert dict(run.attributes) == {
        "fraisier.run_id": "r-1",
        "fraisier.environment": "prod",
        "fraisier.fraise": "api",
        "fraisier.release_id": "rel-1",
    }
    assert dict(host.attributes) == {"fraisier.host": "web1"}
    assert dict(step.attributes) == {"fraisier.step": "build", "fraisier.attempt": 2}
    assert run.status.status_code == StatusCode.UNSET
    assert run.resource.attributes["service.name"] == "fraisier"


def test_host_spans_in_threads(exporter: InMemorySpanExporter) -> None:
    def deploy_host(host: str) -> None:
        with tracing.host_span(host), tracing.step_span("fetch"):
            pass

    with tracing.run_span("r-2", "prod", "api"), ThreadPoolExecutor(3) as pool:
        futures = [context_submit(pool, deploy_host, h) for h in ("web1", "web2", "web3")]
        for future in futures:
            future.result()

    spans = spans_by_name(exporter)
    (run,) = spans["fraisier.run"]
    hosts = spans["fraisier.host"]
    assert sorted(span.attributes["fraisier.host"] for span in hosts) == ["web1", "web2", "web3"]
    assert all(span.parent.span_id == run.context.span_id for span in hosts)
    host_ids = {span.context.span_id for span in hosts}
    assert {span.parent.span_id for span in spans["fraisier.step"]} == host_ids


def test_error_recorded_and_redacted(exporter: InMemorySpanExporter) -> None:
    register_secret(PLANTED_SECRET)
    try:
        with (
            pytest.raises(HealthCheckError),
            tracing.run_span("r-3", "prod", "api"),
            tracing.step_span("health_check"),
        ):
            raise HealthCheckError(f"GET returned 500 with token={PLANTED_SECRET}")
    finally:
        default_redactor.clear()

    spans = spans_by_name(exporter)
    (step,) = spans["fraisier.step"]
    assert step.status.status_code == StatusCode.ERROR
    assert step.status.description == "HealthCheckError: GET returned 500 with token=***"
    assert step.attributes["error.type"] == "fraisier.errors.HealthCheckError"
    assert step.attributes["fraisier.error_code"] == "health_check_failed"
    (event,) = step.events
    assert event.name == "exception"
    assert event.attributes["exception.message"] == "GET returned 500 with token=***"
    assert "Traceback" in event.attributes["exception.stacktrace"]
    for finished in exporter.get_finished_spans():
        assert PLANTED_SECRET not in str(finished.to_json())
    (run,) = spans["fraisier.run"]
    assert run.status.status_code == StatusCode.ERROR


def test_attributes_redacted(exporter: InMemorySpanExporter) -> None:
    with tracing.run_span("r-4", "prod", "api", **{"db.url": "mysql://u:hunter22@h/db"}) as run:
        run.set_attribute("command", "deploy --password hunter22")
        run.set_attributes({"note": None, "git": "https://u:hunter22@git.example.test/r.git"})
        run.add_event("retry", {"reason": "PGPASSWORD=hunter22"})

    (run_span,) = exporter.get_finished_spans()
    assert run_span.attributes["db.url"] == "mysql://u:***@h/db"
    assert run_span.attributes["command"] == "deploy --password ***"
    assert run_span.attributes["git"] == "https://u:***@git.example.test/r.git"
    assert "note" not in run_span.attributes
    assert run_span.events[0].attributes["reason"] == "PGPASSWORD=***"
    assert "hunter22" not in run_span.to_json()


def test_current_trace_ids(exporter: InMemorySpanExporter) -> None:
    assert tracing.current_trace_ids() == {}
    with tracing.run_span("r-5", "prod", "api") as run:
        ids = tracing.current_trace_ids()
        expected_trace = f"{run.get_span_context().trace_id:032x}"
    assert ids["trace_id"] == expected_trace
    assert len(ids["span_id"]) == 16


# No-op mode -------------------------------------------------------------------------------


def test_noop_without_endpoint() -> None:
    assert tracing.configure_tracing() is False
    assert isinstance(tracing.tracer(), tracing.NoopTracer)
    assert tracing.tracing_enabled() is False
    with tracing.run_span("r-6", "prod", "api") as run, tracing.host_span("web1") as host:
        run.set_attribute("x", 1)
        host.add_event("e")
        assert host.is_recording() is False
    assert tracing.current_trace_ids() == {}


def test_noop_errors_still_raised() -> None:
    tracing.configure_tracing()
    with pytest.raises(ValueError, match="bad"), tracing.step_span("build"):
        raise ValueError("bad")


NOOP_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    sys.modules["opentelemetry"] = None
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    from fraisier import tracing
    enabled = tracing.configure_tracing("http://127.0.0.1:9")
    try:
        with tracing.run_span("r-7", "prod", "api") as run, tracing.step_span("build"):
            run.set_attribute("k", "v")
            raise RuntimeError("step failed")
    except RuntimeError as exc:
        print("raised", exc)
    print("enabled", enabled, type(tracing.tracer()).__name__)
    print("loaded", sorted(m for m in sys.modules if m.startswith("opentelemetry.")))
    """
)


def test_noop_without_opentelemetry() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NOOP_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "raised step failed" in result.stdout
    assert "enabled False NoopTracer" in result.stdout
    assert "loaded []" in result.stdout
    assert "tracing is off: the OpenTelemetry SDK is missing" in result.stderr
    assert "fraisier[tracing]" in result.stderr


# OTLP/HTTP export to a receiver on loopback -----------------------------------------------


class OTLPReceiver(http.server.BaseHTTPRequestHandler):
    """Minimal OTLP/HTTP traces endpoint that keeps every request it receives."""

    requests: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        type(self).requests.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The exporter uses requests, which would send loopback traffic to a configured proxy.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    OTLPReceiver.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OTLPReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def exported_span_names() -> list[str]:
    names = []
    for _, _, body in OTLPReceiver.requests:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    return sorted(names)


def test_otlp_export_from_argument(receiver: str) -> None:
    assert tracing.configure_tracing(receiver, service_name="fraisier-test") is True

    with tracing.run_span("r-8", "prod", "api"), tracing.host_span("web1"):
        pass
    tracing.shutdown_tracing()

    assert OTLPReceiver.requests, "no OTLP request reached the receiver"
    path, content_type, _ = OTLPReceiver.requests[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert exported_span_names() == ["fraisier.host", "fraisier.run"]


def test_otlp_export_from_environment(receiver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.ENV_ENDPOINT, receiver + "/")

    assert tracing.tracing_enabled() is True
    with tracing.run_span("r-9", "prod", "api"):
        pass
    tracing.shutdown_tracing()

    assert [path for path, _, _ in OTLPReceiver.requests] == ["/v1/traces"]
    assert exported_span_names() == ["fraisier.run"]


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
    ],
)
def test_traces_url(endpoint: str, expected: str) -> None:
    assert tracing.traces_url(endpoint) == expected


def test_traces_url_signal_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.ENV_TRACES_ENDPOINT, "http://127.0.0.1:4318/custom")
    assert tracing.traces_url("http://127.0.0.1:1") == "http://127.0.0.1:4318/custom"


def test_log_lines_carry_trace_ids(exporter: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    configure_logging("INFO", fmt="json", stream=stream)
    try:
        logger = logging.getLogger("fraisier.engine.trace")
        logger.info("before any span")
        with tracing.run_span("r-10", "prod", "api") as run:
            logger.info("inside the run span")
            expected = run.get_span_context()
    finally:
        reset_logging()

    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "trace_id" not in outside
    assert inside["trace_id"] == f"{expected.trace_id:032x}"
    assert inside["span_id"] == f"{expected.span_id:016x}"

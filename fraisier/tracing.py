"""OpenTelemetry spans for runs, hosts and steps, or a no-op tracer when tracing is off.

Tracing is on only when an OTLP endpoint is configured: the ``endpoint`` argument of
``configure_tracing`` (the ``otlp_endpoint`` setting) or ``OTEL_EXPORTER_OTLP_ENDPOINT``.
The OpenTelemetry SDK is an optional extra (``pip install 'fraisier[tracing]'``) and is
imported inside functions, so this module works without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from fraisier.redact import redact

log = logging.getLogger("fraisier.tracing")

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
TRACER_NAME = "fraisier"
INSTALL_HINT = "install it with pip install 'fraisier[tracing]'"


class NoopSpan:
    """Span that records nothing; it has the methods of an OpenTelemetry span."""

    def set_attribute(self, key: str, value: Any) -> None:
        """Ignore the attribute."""

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Ignore the attributes."""

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Ignore the event."""

    def record_exception(self, exception: BaseException, **kwargs: Any) -> None:
        """Ignore the exception."""

    def set_status(self, status: Any, description: str | None = None) -> None:
        """Ignore the status."""

    def update_name(self, name: str) -> None:
        """Ignore the new name."""

    def is_recording(self) -> bool:
        """Return False: this span records nothing."""
        return False

    def end(self, end_time: int | None = None) -> None:
        """Do nothing: there is nothing to end."""


class NoopTracer:
    """Tracer with the ``start_as_current_span`` API of OpenTelemetry that records nothing."""

    @contextlib.contextmanager
    def start_as_current_span(
        self, name: str, attributes: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Iterator[NoopSpan]:
        """Yield a span that records nothing."""
        yield NoopSpan()

    def start_span(
        self, name: str, attributes: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> NoopSpan:
        """Return a span that records nothing."""
        return NoopSpan()


class RedactingSpan:
    """Wrapper of a span that masks secrets in attributes, events and status descriptions."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def set_attribute(self, key: str, value: Any) -> None:
        """Set one attribute, redacted; None values are skipped."""
        if value is not None:
            self.span.set_attribute(key, redact(value))

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Set several attributes, redacted; None values are skipped."""
        self.span.set_attributes(_clean_attributes(attributes))

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Add an event with redacted attributes."""
        self.span.add_event(name, _clean_attributes(attributes or {}))

    def record_error(self, exc: BaseException) -> None:
        """Record ``exc`` as a redacted exception event and set the status to ERROR."""
        _record_error(self.span, exc)

    def is_recording(self) -> bool:
        """Return whether the wrapped span records data."""
        return bool(self.span.is_recording())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.span, name)


_lock = threading.Lock()
_tracer: Any = None
_provider: Any = None


def configure_tracing(
    endpoint: str | None = None,
    service_name: str = "fraisier",
    exporter: Any = None,
) -> bool:
    """Set up the tracer and return whether spans are exported.

    ``endpoint`` is the OTLP/HTTP base URL (``/v1/traces`` is appended) and falls back to
    ``OTEL_EXPORTER_OTLP_ENDPOINT``. ``exporter`` replaces the OTLP exporter; tests pass
    an ``InMemorySpanExporter``, which is exported synchronously. Without an endpoint or
    exporter, or without the OpenTelemetry SDK, the tracer is a no-op. A second call
    shuts down the tracer of the first.
    """
    global _tracer, _provider

    shutdown_tracing()
    endpoint = endpoint or os.environ.get(ENV_ENDPOINT) or None
    if exporter is None and not endpoint:
        with _lock:
            _tracer = NoopTracer()
        return False

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        log.warning("tracing is off: the OpenTelemetry SDK is missing (%s); %s", exc, INSTALL_HINT)
        with _lock:
            _tracer = NoopTracer()
        return False

    if exporter is not None:
        processor: Any = SimpleSpanProcessor(exporter)
        target = type(exporter).__name__
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            log.warning(
                "tracing is off: the OTLP/HTTP exporter is missing (%s); %s", exc, INSTALL_HINT
            )
            with _lock:
                _tracer = NoopTracer()
            return False
        target = traces_url(endpoint or "")
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=target))

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(processor)
    with _lock:
        _provider = provider
        _tracer = provider.get_tracer(TRACER_NAME)
    log.info("tracing on: spans of service %s go to %s", service_name, redact(target))
    return True


def traces_url(endpoint: str) -> str:
    """Return the OTLP/HTTP traces URL for a base endpoint.

    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, when set, is used unchanged, because that
    variable names the full traces URL.
    """
    specific = os.environ.get(ENV_TRACES_ENDPOINT)
    if specific:
        return specific
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def shutdown_tracing() -> None:
    """Export the spans still buffered and turn tracing off until the next configuration.

    NOTE: with an unreachable endpoint this waits for the export timeout of the OTLP
    exporter (10 s per request in opentelemetry-exporter-otlp-proto-http 1.45, set by
    ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT``).
    """
    global _tracer, _provider

    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracer() -> Any:
    """Return the current tracer, configuring it from the environment on first use."""
    with _lock:
        current = _tracer
    if current is None:
        configure_tracing()
        with _lock:
            current = _tracer
    return current


def tracing_enabled() -> bool:
    """Return whether spans are exported."""
    return not isinstance(tracer(), NoopTracer)


# Spans ------------------------------------------------------------------------------------


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[RedactingSpan]:
    """Open a span that is current for the block, with redacted attributes.

    An exception that leaves the block is recorded on the span, redacted, with status
    ERROR, and raised again.
    """
    with tracer().start_as_current_span(
        name,
        attributes=_clean_attributes(attributes),
        # The SDK would record the exception text unredacted, so _record_error does it.
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield RedactingSpan(current)
        except GeneratorExit:
            raise
        except BaseException as exc:
            _record_error(current, exc)
            raise


def run_span(
    run_id: str, environment: str, fraise: str, **attributes: Any
) -> contextlib.AbstractContextManager[RedactingSpan]:
    """Open the span of one run; host spans opened inside it become its children."""
    return span(
        "fraisier.run",
        **{
            "fraisier.run_id": run_id,
            "fraisier.environment": environment,
            "fraisier.fraise": fraise,
            **attributes,
        },
    )


def host_span(host: str, **attributes: Any) -> contextlib.AbstractContextManager[RedactingSpan]:
    """Open the span of one host inside the current run span."""
    return span("fraisier.host", **{"fraisier.host": host, **attributes})


def step_span(
    name: str, attempt: int = 1, **attributes: Any
) -> contextlib.AbstractContextManager[RedactingSpan]:
    """Open the span of one attempt of a step inside the current host span."""
    return span(
        "fraisier.step", **{"fraisier.step": name, "fraisier.attempt": attempt, **attributes}
    )


def current_trace_ids() -> dict[str, str]:
    """Return the hex ``trace_id`` and ``span_id`` of the current span, or {} without one."""
    with _lock:
        if _provider is None:
            return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _clean_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None values, which OpenTelemetry rejects, and redact the rest."""
    return {key: redact(value) for key, value in attributes.items() if value is not None}


def _record_error(current: Any, exc: BaseException) -> None:
    if not current.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    exc_type = type(exc)
    module = exc_type.__module__
    type_name = (
        exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"
    )
    message = redact(str(exc))
    stacktrace = "".join(traceback.format_exception(exc_type, exc, exc.__traceback__))
    current.add_event(
        "exception",
        {
            "exception.type": type_name,
            "exception.message": message,
            "exception.stacktrace": redact(stacktrace),
        },
    )
    current.set_attribute("error.type", type_name)
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        current.set_attribute("fraisier.error_code", code)
    current.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {message}"))

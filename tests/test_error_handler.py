"""Tests of the error handler: decisions, log lines, counters and circuit breakers."""

from __future__ import annotations

import json
import logging
import random
import socket

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from fraisier.error_handler import Decision, ErrorHandler, default_handler
from fraisier.errors import (
    AuthenticationError,
    CommandFailedError,
    ConfigurationError,
    ConnectionLostError,
    DeploymentError,
    DeploymentTimeoutError,
    FraisierError,
    HealthCheckError,
    HostKeyError,
    HostUnreachableError,
    LockHeldError,
    ProviderError,
    ProviderUnavailableError,
    ValidationError,
)
from fraisier.recovery import (
    CircuitBreakerBoard,
    FailStrategy,
    FallbackStrategy,
    RetryStrategy,
    RollbackRecoveryStrategy,
)
from fraisier.redact import register_secret


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _count(registry: CollectorRegistry, error_code: str, action: str) -> float:
    value = registry.get_sample_value(
        "fraisier_error_decisions_total", {"error_code": error_code, "action": action}
    )
    return 0.0 if value is None else value


def _decision_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "error_decision"]


SETTINGS = {"retries": 2, "retry_delay": 1.0, "retry_jitter": 0, "retry_max_elapsed": 100}


# --- Decision ---


def test_decision_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match="invalid action 'skip'"):
        Decision("skip", 0.0, None, FraisierError("x"))
    with pytest.raises(ValueError, match="invalid delay"):
        Decision("retry", -1.0, None, FraisierError("x"))


# --- default_handler decisions ---


def test_default_retries_then_rolls_back_timeout() -> None:
    handler = default_handler(SETTINGS)
    error = DeploymentTimeoutError("build timed out")

    first = handler.handle_error(error, attempt=1)
    second = handler.handle_error(error, attempt=2)
    third = handler.handle_error(error, attempt=3)

    assert (first.action, first.delay, first.reason) == ("retry", 1.0, None)
    assert (second.action, second.delay) == ("retry", 2.0)
    assert (third.action, third.reason) == ("rollback", "timeout")
    assert third.error is error
    assert error.context["attempt"] == 3


def test_default_retry_cut_by_elapsed() -> None:
    handler = default_handler(SETTINGS)

    decision = handler.handle_error(ProviderUnavailableError("mirror down"), elapsed=99.5)

    assert decision.action == "rollback"
    assert decision.reason == "step_failed"


@pytest.mark.parametrize(
    ("error", "action", "reason"),
    [
        (HealthCheckError("503 from /healthz"), "rollback", "health_check"),
        (CommandFailedError("make exited 2"), "rollback", "step_failed"),
        (ConfigurationError("invalid inventory"), "fail", "not_recoverable"),
        (ValidationError("invalid release id"), "fail", "not_recoverable"),
        (AuthenticationError("denied"), "fail", "not_recoverable"),
        (HostKeyError("changed"), "fail", "not_recoverable"),
        (LockHeldError("held by run 12"), "fail", "not_recoverable"),
        (ProviderUnavailableError("mirror down"), "retry", None),
        (HostUnreachableError("refused"), "retry", None),
        (ConnectionLostError("channel closed"), "retry", None),
        (DeploymentError("unexpected"), "fail", "no_strategy"),
        (ProviderError("git says no"), "fail", "no_strategy"),
    ],
)
def test_default_decisions(error: FraisierError, action: str, reason: str | None) -> None:
    handler = default_handler(SETTINGS)

    decision = handler.handle_error(error)

    assert decision.action == action
    assert decision.reason == reason
    assert decision.error is error


def test_default_retry_uses_settings_jitter() -> None:
    handler = default_handler(
        {"retries": 5, "retry_delay": 4, "retry_jitter": 0.5}, rng=random.Random(3)
    )

    delays = [
        handler.handle_error(HostUnreachableError("down"), attempt=1).delay for _ in range(50)
    ]

    assert all(2.0 <= delay <= 4.0 for delay in delays)
    assert len(set(delays)) > 1


def test_default_rollback_disabled_by_settings() -> None:
    handler = default_handler({**SETTINGS, "rollback_on_health_check": False})

    decision = handler.handle_error(HealthCheckError("503"))

    assert decision.action == "fail"
    assert decision.reason == "not_recoverable"


def test_default_retries_exhausted_without_rollback() -> None:
    handler = default_handler({**SETTINGS, "rollback_on_timeout": False})

    decision = handler.handle_error(DeploymentTimeoutError("slow"), attempt=3)

    assert decision.action == "fail"
    assert decision.reason == "retries_exhausted"


def test_default_invalid_settings_raise() -> None:
    with pytest.raises(ConfigurationError, match="retries=-2"):
        default_handler({"retries": -2})


# --- translation of raw exceptions ---


def test_handle_raw_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as caught:
        socket.create_connection(("127.0.0.1", port), timeout=2)
    handler = default_handler(SETTINGS)

    decision = handler.handle_error(caught.value, context={"host": "web1", "step": "connect"})

    assert isinstance(decision.error, HostUnreachableError)
    assert decision.error.code == "connection_refused"
    assert decision.error.context == {"host": "web1", "step": "connect", "attempt": 1}
    assert decision.action == "retry"


def test_handle_unknown_exception_fails() -> None:
    handler = default_handler(SETTINGS)

    decision = handler.handle_error(RuntimeError("bug"))

    assert type(decision.error) is DeploymentError
    assert decision.action == "fail"


# --- registration ---


def test_most_specific_type_wins() -> None:
    handler = ErrorHandler()
    handler.register(ProviderError, FailStrategy("provider_policy"))
    handler.register(HostUnreachableError, RetryStrategy(jitter=0))

    assert handler.handle_error(HostUnreachableError("down")).action == "retry"
    # ConnectionLostError is not a HostUnreachableError, so the ProviderError entry applies.
    assert handler.handle_error(ConnectionLostError("lost")).reason == "provider_policy"
    assert handler.handle_error(AuthenticationError("denied")).reason == "provider_policy"


def test_strategies_run_in_registration_order() -> None:
    handler = ErrorHandler()
    handler.register(HealthCheckError, RollbackRecoveryStrategy(on_health_check=False))
    handler.register(HealthCheckError, RollbackRecoveryStrategy())
    handler.register(CommandFailedError, RollbackRecoveryStrategy())
    handler.register(CommandFailedError, RetryStrategy())

    health = handler.handle_error(HealthCheckError("503"))
    command = handler.handle_error(CommandFailedError("exit 1", recoverable=True))

    assert (health.action, health.reason) == ("rollback", "health_check")
    assert (command.action, command.reason) == ("rollback", "step_failed")
    assert len(handler.strategies_for(HealthCheckError)) == 2


def test_fallback_strategy_decision() -> None:
    handler = ErrorHandler()
    handler.register(ProviderError, FallbackStrategy(["mirror-a", "mirror-b"]))

    decision = handler.handle_error(AuthenticationError("401 from mirror-a"))

    assert decision.action == "fallback"
    assert decision.delay == 0.0


def test_register_rejects_wrong_types() -> None:
    handler = ErrorHandler()

    with pytest.raises(TypeError, match="FraisierError subclass"):
        handler.register(OSError, RetryStrategy())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strategy must be"):
        handler.register(FraisierError, "retry")  # type: ignore[arg-type]


def test_should_retry_has_no_side_effects(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    handler = default_handler({**SETTINGS, "breaker_failure_threshold": 1}, registry=registry)
    error = HostUnreachableError("down", context={"host": "web1"})
    caplog.set_level(logging.DEBUG, logger="fraisier.errors")

    assert handler.should_retry(error, 1, 0.0) is True
    assert handler.should_retry(error, 3, 0.0) is False
    assert handler.should_retry(AuthenticationError("denied"), 1, 0.0) is False
    assert handler.should_retry(ConnectionRefusedError(), 1, 0.0) is True

    assert _decision_records(caplog) == []
    assert _count(registry, "host_unreachable", "retry") == 0.0
    assert handler.breakers.for_host("web1").state == "closed"


# --- log lines and counters ---


def test_decision_log_line_and_counter(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    handler = default_handler(SETTINGS, registry=registry)
    caplog.set_level(logging.DEBUG, logger="fraisier.errors")

    handler.handle_error(
        HealthCheckError("503 from /healthz"),
        context={"run_id": "r-1", "environment": "prod", "host": "web1", "step": "health"},
    )
    handler.handle_error(HostUnreachableError("refused"), attempt=1, context={"host": "web2"})
    handler.handle_error(HostUnreachableError("refused"), attempt=2, context={"host": "web2"})

    records = _decision_records(caplog)
    assert len(records) == 3
    first = records[0]
    assert first.name == "fraisier.errors"
    assert first.levelno == logging.WARNING
    assert first.error_code == "health_check_failed"
    assert first.action == "rollback"
    assert first.reason == "health_check"
    assert first.run_id == "r-1"
    assert first.environment == "prod"
    assert first.host == "web1"
    assert first.step == "health"
    assert first.attempt == 1
    assert "503 from /healthz" in first.getMessage()
    assert "rollback" in first.getMessage()
    assert records[1].action == "retry"
    assert records[1].delay == 1.0

    assert _count(registry, "health_check_failed", "rollback") == 1.0
    assert _count(registry, "host_unreachable", "retry") == 2.0
    assert _count(registry, "host_unreachable", "fail") == 0.0


def test_fail_decision_logs_error_level(caplog: pytest.LogCaptureFixture) -> None:
    handler = default_handler(SETTINGS)
    caplog.set_level(logging.DEBUG, logger="fraisier.errors")

    handler.handle_error(AuthenticationError("denied"), context={"host": "web1"})

    records = _decision_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert records[0].action == "fail"


def test_log_context_cannot_clobber_record(caplog: pytest.LogCaptureFixture) -> None:
    handler = default_handler(SETTINGS)
    caplog.set_level(logging.DEBUG, logger="fraisier.errors")

    handler.handle_error(
        HealthCheckError("503"), context={"name": "api", "message": "m", "host": "web1"}
    )

    record = _decision_records(caplog)[0]
    assert record.name == "fraisier.errors"
    assert record.ctx_name == "api"
    assert record.ctx_message == "m"


def test_log_line_redacts_secrets(caplog: pytest.LogCaptureFixture) -> None:
    secret = "hunter2-deploy-token-9f8e"
    register_secret(secret)
    handler = default_handler(SETTINGS)
    caplog.set_level(logging.DEBUG, logger="fraisier.errors")

    handler.handle_error(
        CommandFailedError(f"curl -H 'token: {secret}' failed"),
        context={"host": "web1", "source": f"https://ci:{secret}@git.example/app.git"},
    )

    record = _decision_records(caplog)[0]
    assert secret not in record.getMessage()
    assert secret not in record.source
    assert secret not in caplog.text


def test_logger_and_registry_injected(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    logger = logging.getLogger("fraisier.tests.injected")
    handler = ErrorHandler(logger=logger, registry=registry)
    caplog.set_level(logging.DEBUG, logger="fraisier.tests.injected")

    handler.handle_error(ConfigurationError("bad"))

    assert [r.name for r in _decision_records(caplog)] == ["fraisier.tests.injected"]
    assert _count(registry, "configuration_error", "fail") == 1.0


def test_default_registry_is_private() -> None:
    first = ErrorHandler()
    second = ErrorHandler()

    first.handle_error(ConfigurationError("bad"))

    assert _count(first.registry, "configuration_error", "fail") == 1.0
    assert _count(second.registry, "configuration_error", "fail") == 0.0
    assert first.registry is not REGISTRY
    assert (
        REGISTRY.get_sample_value(
            "fraisier_error_decisions_total",
            {"error_code": "configuration_error", "action": "fail"},
        )
        is None
    )


def test_decision_error_json_round_trip() -> None:
    handler = default_handler(SETTINGS)

    decision = handler.handle_error(
        CommandFailedError("make exited 2", command="make", exit_status=2),
        attempt=2,
        context={"host": "web1", "step": "build"},
    )

    data = json.loads(decision.error.to_json())
    assert data["code"] == "command_failed"
    assert data["exit_status"] == 2
    assert data["context"] == {"host": "web1", "step": "build", "attempt": 2}


# --- circuit breakers ---


def test_breaker_opens_and_fails_host() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    handler = default_handler(
        {**SETTINGS, "retries": 10, "breaker_failure_threshold": 3, "breaker_reset_timeout": 60},
        registry=registry,
        clock=clock,
    )

    actions = [
        handler.handle_error(
            HostUnreachableError("refused"), attempt=attempt, context={"host": "web1"}
        ).action
        for attempt in (1, 2, 3)
    ]
    blocked = handler.handle_error(CommandFailedError("exit 1"), context={"host": "web1"})
    other_host = handler.handle_error(HostUnreachableError("refused"), context={"host": "web2"})

    assert actions == ["retry", "retry", "fail"]
    assert handler.breakers.open_hosts() == ["web1"]
    assert (blocked.action, blocked.reason) == ("fail", "circuit_open")
    assert other_host.action == "retry"
    assert _count(registry, "host_unreachable", "fail") == 1.0
    assert _count(registry, "command_failed", "fail") == 1.0

    clock.now += 60
    assert handler.breakers.open_hosts() == []
    assert handler.breakers.for_host("web1").allow() is True
    handler.breakers.for_host("web1").record_success()
    after = handler.handle_error(CommandFailedError("exit 1"), context={"host": "web1"})
    assert after.action == "rollback"


def test_breaker_ignores_non_host_failures() -> None:
    handler = ErrorHandler(breakers=CircuitBreakerBoard(failure_threshold=1))
    handler.register(CommandFailedError, RollbackRecoveryStrategy())

    for _ in range(3):
        handler.handle_error(CommandFailedError("exit 1"), context={"host": "web1"})
    handler.handle_error(AuthenticationError("denied"), context={"host": "web1"})

    assert handler.breakers.for_host("web1").state == "closed"


def test_breaker_needs_host_in_context() -> None:
    handler = ErrorHandler(breakers=CircuitBreakerBoard(failure_threshold=1))
    handler.register(HostUnreachableError, RetryStrategy(jitter=0))

    decision = handler.handle_error(HostUnreachableError("pushgateway refused"))

    assert decision.action == "retry"
    assert handler.breakers.open_hosts() == []

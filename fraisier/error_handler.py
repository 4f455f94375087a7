"""The error handler: turns a failure into a decision (retry, fallback, rollback or fail).

The engine calls ``handle_error`` each time a step fails and acts on the returned
``Decision``. Every decision is logged once and counted in
``fraisier_error_decisions_total{error_code, action}``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from fraisier.errors import (
    AuthenticationError,
    CommandFailedError,
    ConfigurationError,
    ConnectionLostError,
    DeploymentTimeoutError,
    FraisierError,
    HealthCheckError,
    HostKeyError,
    HostUnreachableError,
    LockHeldError,
    ProviderError,
    ProviderUnavailableError,
    translate_exception,
)
from fraisier.recovery import (
    CircuitBreakerBoard,
    FailStrategy,
    FallbackStrategy,
    RetryStrategy,
    RollbackRecoveryStrategy,
)
from fraisier.redact import redact

ACTIONS = ("retry", "fallback", "rollback", "fail")

# Reasons of a "fail" decision; with ROLLBACK_REASONS they are the values of Decision.reason.
FAIL_REASONS = ("circuit_open", "retries_exhausted", "not_recoverable", "no_strategy")

Strategy = RetryStrategy | FallbackStrategy | RollbackRecoveryStrategy | FailStrategy
STRATEGY_TYPES = (RetryStrategy, FallbackStrategy, RollbackRecoveryStrategy, FailStrategy)

# Errors that count against a host's circuit breaker: the host itself could not be reached.
HOST_FAILURES = (HostUnreachableError, ConnectionLostError)

# LogRecord attributes that an ``extra`` key must not overwrite, because logging raises KeyError.
_RESERVED_LOG_KEYS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


@dataclasses.dataclass(frozen=True)
class Decision:
    """Action the engine takes after a failure, with the wait before a retry in seconds."""

    action: str
    delay: float
    reason: str | None
    error: FraisierError

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"invalid action {self.action!r}: expected one of {ACTIONS}")
        if self.delay < 0:
            raise ValueError(f"invalid delay {self.delay!r}: expected 0 or more seconds")


class ErrorHandler:
    """Dispatcher that picks a recovery strategy by error type and reports each decision."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        registry: CollectorRegistry | None = None,
        breakers: CircuitBreakerBoard | None = None,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger("fraisier.errors")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.breakers = breakers if breakers is not None else CircuitBreakerBoard()
        self.decisions = Counter(
            "fraisier_error_decisions",
            "Decisions of the error handler, by error code and action.",
            ["error_code", "action"],
            registry=self.registry,
        )
        self._strategies: dict[type[FraisierError], list[Strategy]] = {}

    def register(self, error_type: type[FraisierError], strategy: Strategy) -> None:
        """Add ``strategy`` for ``error_type`` and its subclasses, after earlier ones."""
        if not (isinstance(error_type, type) and issubclass(error_type, FraisierError)):
            raise TypeError(f"error_type must be a FraisierError subclass, got {error_type!r}")
        if not isinstance(strategy, STRATEGY_TYPES):
            raise TypeError(
                f"strategy must be a RetryStrategy, FallbackStrategy, RollbackRecoveryStrategy "
                f"or FailStrategy, got {strategy!r}"
            )
        self._strategies.setdefault(error_type, []).append(strategy)

    def strategies_for(self, error_type: type[BaseException]) -> list[Strategy]:
        """Return the strategies of the most specific registered type in the MRO of
        ``error_type``, in registration order, or an empty list."""
        for klass in error_type.__mro__:
            strategies = self._strategies.get(klass)  # type: ignore[arg-type]
            if strategies:
                return list(strategies)
        return []

    def handle_error(
        self,
        error: BaseException,
        *,
        attempt: int = 1,
        elapsed: float = 0.0,
        context: dict[str, Any] | None = None,
        retry: RetryStrategy | None = None,
    ) -> Decision:
        """Decide what to do about ``error`` after failed ``attempt``, then log and count it.

        ``retry`` is a step's own retry strategy: it is tried before the registered strategies
        of the error's type, unless those make the error fail at once.

        Non-Fraisier exceptions go through ``translate_exception`` first. The ``context`` keys
        are added to the error where it does not set them. A host failure counts against the
        host's circuit breaker, and a host whose breaker is open gets ``fail`` with reason
        ``circuit_open``.
        """
        context = dict(context or {})
        fraisier_error = translate_exception(error, **context)
        # The caller's attempt number is authoritative, even over one the error already has.
        fraisier_error.context["attempt"] = attempt

        host = fraisier_error.context.get("host")
        if host is not None and isinstance(fraisier_error, HOST_FAILURES):
            self.breakers.for_host(str(host)).record_failure()

        decision = self._decide(fraisier_error, attempt, elapsed, retry)
        self._report(decision, context)
        return decision

    def should_retry(self, error: BaseException, attempt: int, elapsed: float) -> bool:
        """Return whether ``handle_error`` would retry, without logging, counting or
        recording a breaker failure."""
        fraisier_error = translate_exception(error)
        return self._decide(fraisier_error, attempt, elapsed).action == "retry"

    def _decide(
        self,
        error: FraisierError,
        attempt: int,
        elapsed: float,
        retry: RetryStrategy | None = None,
    ) -> Decision:
        host = error.context.get("host")
        if host is not None and self.breakers.for_host(str(host)).state == "open":
            return Decision("fail", 0.0, "circuit_open", error)

        strategies = self.strategies_for(type(error))
        if retry is not None and not (strategies and isinstance(strategies[0], FailStrategy)):
            strategies = [retry, *strategies]
        if not strategies:
            return Decision("fail", 0.0, "no_strategy", error)

        retry_declined = False
        for strategy in strategies:
            if isinstance(strategy, FailStrategy):
                return Decision("fail", 0.0, strategy.reason, error)
            if isinstance(strategy, RetryStrategy):
                if strategy.should_retry(error, attempt, elapsed):
                    return Decision("retry", strategy.delay(attempt), None, error)
                retry_declined = True
            elif isinstance(strategy, FallbackStrategy):
                if isinstance(error, ProviderError):
                    return Decision("fallback", 0.0, None, error)
            elif isinstance(strategy, RollbackRecoveryStrategy):
                reason = strategy.reason_for(error)
                if reason is not None:
                    return Decision("rollback", 0.0, reason, error)

        if retry_declined and error.recoverable:
            return Decision("fail", 0.0, "retries_exhausted", error)
        return Decision("fail", 0.0, "not_recoverable", error)

    def _report(self, decision: Decision, context: Mapping[str, Any]) -> None:
        error = decision.error
        self.decisions.labels(error_code=error.code, action=decision.action).inc()

        fields: dict[str, Any] = {}
        for key, value in {**error.context, **context}.items():
            safe_key = f"ctx_{key}" if key in _RESERVED_LOG_KEYS else key
            fields[safe_key] = redact(value)
        fields.update(
            event="error_decision",
            error_code=error.code,
            action=decision.action,
            reason=decision.reason,
            delay=decision.delay,
        )
        level = logging.ERROR if decision.action == "fail" else logging.WARNING
        self.logger.log(
            level,
            "%s on %s: %s; decision %s (reason %s, delay %.2fs)",
            error.code,
            error.context.get("host", "the controller"),
            redact(str(error)),
            decision.action,
            decision.reason,
            decision.delay,
            extra=fields,
        )


def default_handler(
    settings: Mapping[str, Any],
    *,
    logger: logging.Logger | None = None,
    registry: CollectorRegistry | None = None,
    **retry_kwargs: Any,
) -> ErrorHandler:
    """Build the standard handler from inventory settings.

    Unavailable providers and timeouts are retried per the ``retry_*`` settings and roll back
    once retries run out. Health-check and command failures roll back. Configuration,
    authentication, host key and lock errors fail at once. ``retry_kwargs`` pass ``sleep``,
    ``rng`` and ``clock`` to the retry strategy.
    """
    retry = RetryStrategy.from_settings(settings, **retry_kwargs)
    rollback = RollbackRecoveryStrategy.from_settings(settings)
    breaker_kwargs = {"clock": retry_kwargs["clock"]} if "clock" in retry_kwargs else {}
    handler = ErrorHandler(
        logger=logger,
        registry=registry,
        breakers=CircuitBreakerBoard.from_settings(settings, **breaker_kwargs),
    )

    handler.register(ProviderUnavailableError, retry)
    handler.register(ProviderUnavailableError, rollback)
    handler.register(DeploymentTimeoutError, retry)
    handler.register(DeploymentTimeoutError, rollback)
    handler.register(HealthCheckError, rollback)
    handler.register(CommandFailedError, rollback)
    for error_type in (ConfigurationError, AuthenticationError, HostKeyError, LockHeldError):
        handler.register(error_type, FailStrategy("not_recoverable"))
    return handler

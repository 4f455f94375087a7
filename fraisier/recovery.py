"""Recovery strategies: retry with backoff, fallback to alternatives, rollback reasons, breakers.

The strategies decide, but they do not deploy. ``RetryStrategy.run`` and ``FallbackStrategy.run``
wrap a callable, and ``fraisier.error_handler.ErrorHandler`` queries the same objects for a
decision when the engine drives the loop itself.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from fraisier.errors import (
    ConfigurationError,
    ConnectionLostError,
    DeploymentError,
    DeploymentTimeoutError,
    FraisierError,
    HealthCheckError,
    HostUnreachableError,
    InterruptedRunError,
    ProviderError,
    ProviderUnavailableError,
    translate_exception,
)
from fraisier.redact import redact

logger = logging.getLogger("fraisier.recovery")

T = TypeVar("T")
R = TypeVar("R")

# Values of the rollback ``reason``. They are also metric label values, so the set stays fixed.
ROLLBACK_REASONS = (
    "health_check",
    "timeout",
    "step_failed",
    "unreachable",
    "manual",
    "interrupted",
)

# Maximum length of one sleep call while waiting between attempts, in seconds. ``should_stop``
# is checked between slices, so a SIGINT stops the wait within this time.
SLEEP_SLICE = 0.1

_UNSET: Any = object()


def _setting(
    settings: Mapping[str, Any],
    key: str,
    default: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
) -> Any:
    """Read one numeric setting and raise ConfigurationError naming the key and the value."""
    value = settings.get(key, _UNSET)
    if value is _UNSET:
        return default
    if value is None and allow_none:
        return None

    kind = "an integer" if integer else "a number"
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    expected = f"{kind} {' and '.join(bounds)}".strip()
    if allow_none:
        expected += " or null to disable the limit"

    number: float | None = None
    # bool is an int subclass, but "retries: true" is a mistake, not the number 1.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or math.isnan(number) or math.isinf(number):
        raise ConfigurationError(
            f"invalid setting {key}={value!r}: expected {expected}",
            context={"setting": key},
        )
    if integer:
        if number != int(number):
            raise ConfigurationError(
                f"invalid setting {key}={value!r}: expected {expected}",
                context={"setting": key},
            )
        number = int(number)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ConfigurationError(
            f"invalid setting {key}={value!r}: expected {expected}",
            context={"setting": key},
        )
    return number


def _flag(settings: Mapping[str, Any], key: str, default: bool) -> bool:
    """Read one boolean setting and raise ConfigurationError naming the key and the value."""
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"invalid setting {key}={value!r}: expected true or false",
            context={"setting": key},
        )
    return value


class RetryStrategy:
    """Strategy that retries recoverable Fraisier errors with capped exponential backoff.

    Attempt ``n`` (1-based) that fails waits ``delay(n)`` before attempt ``n + 1``. The base
    wait is ``min(max_delay, base_delay * multiplier ** (n - 1))``, and jitter draws the actual
    wait uniformly from ``[base * (1 - jitter), base]`` ("equal jitter" when ``jitter`` is 0.5).
    Jitter only shortens a wait, so ``max_delay`` stays a hard cap and hosts that failed
    together do not retry in step.
    """

    def __init__(
        self,
        max_attempts: int = 3,
        base_delay: float = 1.0,
        multiplier: float = 2.0,
        max_delay: float = 30.0,
        jitter: float = 0.5,
        max_elapsed: float | None = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        values = {
            "max_attempts": max_attempts,
            "base_delay": base_delay,
            "multiplier": multiplier,
            "max_delay": max_delay,
            "jitter": jitter,
            "max_elapsed": max_elapsed,
        }
        self.max_attempts: int = _setting(values, "max_attempts", 3, minimum=1, integer=True)
        self.base_delay: float = _setting(values, "base_delay", 1.0, minimum=0)
        self.multiplier: float = _setting(values, "multiplier", 2.0, minimum=1)
        self.max_delay: float = _setting(values, "max_delay", 30.0, minimum=0)
        self.jitter: float = _setting(values, "jitter", 0.5, minimum=0, maximum=1)
        self.max_elapsed: float | None = _setting(
            values, "max_elapsed", 300.0, minimum=0, allow_none=True
        )
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **kwargs: Any) -> RetryStrategy:
        """Build a strategy from inventory settings, where ``retries`` counts retries, not attempts.

        Keys: ``retries`` (default 2), ``retry_delay`` (seconds, default 1), ``retry_backoff``
        (multiplier, default 2), ``retry_max_delay`` (seconds, default 30), ``retry_jitter``
        (0 to 1, default 0.5) and ``retry_max_elapsed`` (seconds or null, default 300).
        ``kwargs`` pass ``sleep``, ``rng`` and ``clock`` through.
        """
        retries = _setting(settings, "retries", 2, minimum=0, integer=True)
        return cls(
            max_attempts=retries + 1,
            base_delay=_setting(settings, "retry_delay", 1.0, minimum=0),
            multiplier=_setting(settings, "retry_backoff", 2.0, minimum=1),
            max_delay=_setting(settings, "retry_max_delay", 30.0, minimum=0),
            jitter=_setting(settings, "retry_jitter", 0.5, minimum=0, maximum=1),
            max_elapsed=_setting(settings, "retry_max_elapsed", 300.0, minimum=0, allow_none=True),
            **kwargs,
        )

    def max_delay_after(self, attempt: int) -> float:
        """Return the wait after failed ``attempt`` before jitter, in seconds."""
        if attempt < 1:
            raise ValueError(f"attempt must be 1 or more, got {attempt}")
        try:
            raw = self.base_delay * self.multiplier ** (attempt - 1)
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, raw)

    def delay(self, attempt: int) -> float:
        """Draw the wait after failed ``attempt``, in seconds, with jitter applied."""
        ceiling = self.max_delay_after(attempt)
        if self.jitter == 0 or ceiling == 0:
            return ceiling
        return ceiling * (1 - self.jitter) + self._rng.random() * ceiling * self.jitter

    def should_retry(self, error: BaseException, attempt: int, elapsed: float) -> bool:
        """Decide whether failed ``attempt`` gets another try after ``elapsed`` seconds.

        Only a ``FraisierError`` whose ``recoverable`` is true is retried, and only while
        attempts remain. The check uses the wait before jitter, so a retry that is started
        never sleeps past ``max_elapsed``.
        """
        if not isinstance(error, FraisierError) or not error.recoverable:
            return False
        if attempt >= self.max_attempts:
            return False
        if self.max_elapsed is None:
            return True
        return elapsed + self.max_delay_after(attempt) <= self.max_elapsed

    def run(
        self,
        fn: Callable[[int], T],
        *,
        on_retry: Callable[[BaseException, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> T:
        """Call ``fn(attempt)`` until it returns, retrying per ``should_retry``.

        ``on_retry(error, attempt, delay)`` runs before each wait. When ``should_stop()``
        turns true, the wait ends and the last error is raised without a further attempt.
        The raised Fraisier error has the failed attempt number in its context; other
        exceptions propagate unchanged on their first occurrence.
        """
        started = self._clock()
        attempt = 1
        while True:
            try:
                return fn(attempt)
            except Exception as error:
                if isinstance(error, FraisierError):
                    error.context["attempt"] = attempt
                elapsed = self._clock() - started
                if not self.should_retry(error, attempt, elapsed):
                    raise
                if should_stop is not None and should_stop():
                    logger.info(
                        "retry of %s stopped before attempt %d", _error_code(error), attempt + 1
                    )
                    raise
                wait = self.delay(attempt)
                logger.warning(
                    "attempt %d/%d failed (%s: %s); retrying in %.2fs",
                    attempt,
                    self.max_attempts,
                    _error_code(error),
                    redact(str(error)),
                    wait,
                )
                if on_retry is not None:
                    on_retry(error, attempt, wait)
                if not self._wait(wait, should_stop):
                    logger.info("retry of %s stopped during the wait", _error_code(error))
                    raise
            attempt += 1

    def _wait(self, seconds: float, should_stop: Callable[[], bool] | None) -> bool:
        """Sleep ``seconds`` in slices and return False as soon as ``should_stop()`` is true."""
        remaining = seconds
        while remaining > 0:
            if should_stop is not None and should_stop():
                return False
            step = min(SLEEP_SLICE, remaining)
            self._sleep(step)
            remaining -= step
        return not (should_stop is not None and should_stop())

    def __repr__(self) -> str:
        return (
            f"RetryStrategy(max_attempts={self.max_attempts}, base_delay={self.base_delay}, "
            f"multiplier={self.multiplier}, max_delay={self.max_delay}, jitter={self.jitter}, "
            f"max_elapsed={self.max_elapsed})"
        )


def _error_code(error: BaseException) -> str:
    return error.code if isinstance(error, FraisierError) else type(error).__name__


class FallbackStrategy(Generic[T]):
    """Strategy that tries alternatives in order, such as artifact mirrors or source URLs.

    Any ``ProviderError``, recoverable or not, moves on to the next alternative. Other
    exceptions propagate at once, because a bad release or a bug fails on every mirror.
    """

    def __init__(
        self,
        alternatives: Sequence[T],
        on_fallback: Callable[[T, ProviderError], None] | None = None,
    ) -> None:
        if isinstance(alternatives, (str, bytes)):
            raise ConfigurationError(
                f"fallback alternatives must be a list, got the string {redact(alternatives)!r}; "
                f"wrap a single value in a list"
            )
        if not alternatives:
            raise ConfigurationError(
                "fallback alternatives are empty; list at least one mirror or source"
            )
        self.alternatives: tuple[T, ...] = tuple(alternatives)
        self.on_fallback = on_fallback

    def run(self, fn: Callable[[T], R]) -> R:
        """Return ``fn(alternative)`` for the first alternative that does not fail.

        When every alternative raises a ``ProviderError``, the raised
        ``ProviderUnavailableError`` lists each alternative with its error. It is recoverable
        when at least one of those errors was, so a retry around the fallback makes sense.
        """
        failures: list[tuple[T, ProviderError]] = []
        for index, alternative in enumerate(self.alternatives):
            try:
                return fn(alternative)
            except ProviderError as error:
                failures.append((alternative, error))
                is_last = index == len(self.alternatives) - 1
                if is_last:
                    break
                logger.warning(
                    "alternative %s failed (%s: %s); trying %s",
                    redact(str(alternative)),
                    error.code,
                    redact(str(error)),
                    redact(str(self.alternatives[index + 1])),
                )
                if self.on_fallback is not None:
                    self.on_fallback(alternative, error)

        listing = "; ".join(
            f"{redact(str(alternative))}: {error.code}: {redact(str(error))}"
            for alternative, error in failures
        )
        aggregate = ProviderUnavailableError(
            f"all {len(failures)} alternatives failed: {listing}",
            context={
                "alternatives": [
                    {
                        "alternative": redact(str(alternative)),
                        "code": error.code,
                        "message": redact(str(error)),
                    }
                    for alternative, error in failures
                ]
            },
            recoverable=any(error.recoverable for _, error in failures),
        )
        raise aggregate from failures[-1][1]


class FailStrategy:
    """Strategy that fails at once, for errors that no retry or rollback can fix."""

    def __init__(self, reason: str = "not_recoverable") -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"FailStrategy(reason={self.reason!r})"


class RollbackRecoveryStrategy:
    """Strategy that maps a failure to a rollback reason, or to None when it must not roll back."""

    def __init__(
        self,
        on_step_failure: bool = True,
        on_timeout: bool = True,
        on_health_check: bool = True,
    ) -> None:
        self.on_step_failure = on_step_failure
        self.on_timeout = on_timeout
        self.on_health_check = on_health_check

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RollbackRecoveryStrategy:
        """Build from ``rollback_on_step_failure``, ``rollback_on_timeout`` and
        ``rollback_on_health_check`` (booleans, all true by default)."""
        return cls(
            on_step_failure=_flag(settings, "rollback_on_step_failure", True),
            on_timeout=_flag(settings, "rollback_on_timeout", True),
            on_health_check=_flag(settings, "rollback_on_health_check", True),
        )

    def reason_for(self, error: BaseException) -> str | None:
        """Return the rollback reason for ``error``, one of ``ROLLBACK_REASONS``, or None.

        Health-check failures give ``health_check``, timeouts ``timeout``, other deploy step
        failures and unavailable sources ``step_failed``, and a host lost during the run
        ``unreachable``. The last two follow ``on_step_failure``. An interrupted run always
        gives ``interrupted``. Configuration, authentication, host key, lock and database
        errors give None, because they happen before a release is switched or would make the
        rollback fail too.
        """
        if not isinstance(error, FraisierError):
            error = translate_exception(error)
        if isinstance(error, InterruptedRunError):
            return "interrupted"
        if isinstance(error, HealthCheckError):
            return "health_check" if self.on_health_check else None
        if isinstance(error, DeploymentTimeoutError):
            return "timeout" if self.on_timeout else None
        if isinstance(error, DeploymentError):
            return "step_failed" if self.on_step_failure else None
        if isinstance(error, (HostUnreachableError, ConnectionLostError)):
            return "unreachable" if self.on_step_failure else None
        if isinstance(error, ProviderUnavailableError):
            return "step_failed" if self.on_step_failure else None
        return None

    def __repr__(self) -> str:
        return (
            f"RollbackRecoveryStrategy(on_step_failure={self.on_step_failure}, "
            f"on_timeout={self.on_timeout}, on_health_check={self.on_health_check})"
        )


BREAKER_STATES = ("closed", "open", "half_open")


class CircuitBreaker:
    """Per-host switch that blocks calls after consecutive failures, then lets one probe through.

    ``closed``: calls pass and failures are counted; ``failure_threshold`` consecutive
    failures open the breaker. ``open``: calls are rejected until ``reset_timeout`` seconds
    pass, then the breaker is ``half_open`` and allows one probe at a time. A probe's success
    closes the breaker and its failure opens it again. A probe that reports neither outcome
    frees its slot after another ``reset_timeout``. All methods are thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        values = {"failure_threshold": failure_threshold, "reset_timeout": reset_timeout}
        self.failure_threshold: int = _setting(
            values, "failure_threshold", 3, minimum=1, integer=True
        )
        self.reset_timeout: float = _setting(values, "reset_timeout", 30.0, minimum=0)
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at: float | None = None

    @property
    def state(self) -> str:
        """Current state: ``closed``, ``open`` or ``half_open``."""
        with self._lock:
            self._expire_open()
            return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted since the last success."""
        with self._lock:
            return self._failures

    def _expire_open(self) -> None:
        # Caller holds the lock.
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout:
            self._transition("half_open")
            self._probe_started_at = None

    def _transition(self, state: str) -> None:
        # Caller holds the lock.
        if state == self._state:
            return
        logger.info(
            "circuit breaker %s: %s -> %s after %d consecutive failures",
            self.name or "(unnamed)",
            self._state,
            state,
            self._failures,
        )
        self._state = state

    def allow(self) -> bool:
        """Return True when a call may go ahead. In ``half_open``, True claims the probe slot."""
        with self._lock:
            self._expire_open()
            if self._state == "closed":
                return True
            if self._state == "open":
                return False
            now = self._clock()
            probe_running = (
                self._probe_started_at is not None
                and now - self._probe_started_at < self.reset_timeout
            )
            if probe_running:
                return False
            self._probe_started_at = now
            return True

    def record_success(self) -> None:
        """Close the breaker and reset the failure count."""
        with self._lock:
            self._failures = 0
            self._probe_started_at = None
            self._transition("closed")

    def record_failure(self) -> None:
        """Count a failure and open the breaker at the threshold or when a probe fails."""
        with self._lock:
            self._expire_open()
            self._failures += 1
            self._probe_started_at = None
            if self._state == "half_open" or (
                self._state == "closed" and self._failures >= self.failure_threshold
            ):
                self._opened_at = self._clock()
                self._transition("open")

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self.state!r})"


class CircuitBreakerBoard:
    """One circuit breaker per host, created on first use with the same settings."""

    def __init__(self, **kwargs: Any) -> None:
        # Build one breaker now so that invalid settings fail here, not at the first host.
        CircuitBreaker(**kwargs)
        self._kwargs = kwargs
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **kwargs: Any) -> CircuitBreakerBoard:
        """Build from ``breaker_failure_threshold`` (default 3) and ``breaker_reset_timeout``
        (seconds, default 30). ``kwargs`` pass ``clock`` through."""
        return cls(
            failure_threshold=_setting(
                settings, "breaker_failure_threshold", 3, minimum=1, integer=True
            ),
            reset_timeout=_setting(settings, "breaker_reset_timeout", 30.0, minimum=0),
            **kwargs,
        )

    def for_host(self, host: str) -> CircuitBreaker:
        """Return the breaker of ``host``, creating a closed one on first use."""
        with self._lock:
            breaker = self._breakers.get(host)
            if breaker is None:
                breaker = CircuitBreaker(name=host, **self._kwargs)
                self._breakers[host] = breaker
            return breaker

    def open_hosts(self) -> list[str]:
        """Return the sorted hosts whose breaker is open now (``half_open`` ones excluded)."""
        with self._lock:
            breakers = list(self._breakers.items())
        return sorted(host for host, breaker in breakers if breaker.state == "open")

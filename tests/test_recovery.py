"""Tests of the retry, fallback, rollback and circuit breaker strategies."""

from __future__ import annotations

import random
import threading
import time

import pytest

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
    InterruptedRunError,
    LockHeldError,
    ProviderError,
    ProviderUnavailableError,
)
from fraisier.recovery import (
    ROLLBACK_REASONS,
    CircuitBreaker,
    CircuitBreakerBoard,
    FallbackStrategy,
    RetryStrategy,
    RollbackRecoveryStrategy,
)


class FakeTime:
    """Clock and sleep function that advance together without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(errors: list[BaseException], result: str = "ok"):
    """Return a callable that raises each error in turn, then returns ``result``."""
    calls: list[int] = []

    def fn(attempt: int) -> str:
        calls.append(attempt)
        if errors:
            raise errors.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def _waits(fake: FakeTime, on_retry_delays: list[float]) -> list[float]:
    """Group the slices in ``fake.sleeps`` back into one total per wait."""
    totals = []
    index = 0
    for delay in on_retry_delays:
        total = 0.0
        while total < delay - 1e-9:
            total += fake.sleeps[index]
            index += 1
        totals.append(total)
    assert index == len(fake.sleeps)
    return totals


# --- RetryStrategy.delay ---


def test_delay_sequence_without_jitter() -> None:
    retry = RetryStrategy(base_delay=1.0, multiplier=2.0, max_delay=30.0, jitter=0)

    delays = [retry.delay(attempt) for attempt in range(1, 8)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_delay_cap_survives_huge_attempts() -> None:
    retry = RetryStrategy(base_delay=1.0, multiplier=10.0, max_delay=12.5, jitter=0)

    assert retry.delay(10_000) == 12.5


def test_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt must be 1 or more"):
        RetryStrategy().delay(0)


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
def test_jitter_stays_within_bounds(jitter: float) -> None:
    retry = RetryStrategy(base_delay=2.0, max_delay=10.0, jitter=jitter, rng=random.Random(7))

    for attempt in (1, 2, 3, 4, 5):
        ceiling = min(10.0, 2.0 * 2 ** (attempt - 1))
        draws = [retry.delay(attempt) for _ in range(2000)]
        assert min(draws) >= ceiling * (1 - jitter)
        assert max(draws) <= ceiling
        # 2000 uniform draws cover most of the range, so the jitter really spreads the waits.
        assert max(draws) - min(draws) > 0.9 * ceiling * jitter


def test_jitter_is_reproducible_with_seed() -> None:
    first = RetryStrategy(rng=random.Random(42))
    second = RetryStrategy(rng=random.Random(42))

    assert [first.delay(3) for _ in range(5)] == [second.delay(3) for _ in range(5)]


# --- RetryStrategy.should_retry ---


def test_should_retry_only_recoverable_errors() -> None:
    retry = RetryStrategy(max_attempts=5, jitter=0)

    assert retry.should_retry(HostUnreachableError("down"), 1, 0.0) is True
    assert retry.should_retry(DeploymentTimeoutError("slow"), 1, 0.0) is True
    assert retry.should_retry(FraisierError("x", recoverable=True), 1, 0.0) is True
    assert retry.should_retry(AuthenticationError("denied"), 1, 0.0) is False
    assert retry.should_retry(CommandFailedError("exit 1"), 1, 0.0) is False
    assert retry.should_retry(ProviderUnavailableError("x", recoverable=False), 1, 0.0) is False
    assert retry.should_retry(OSError("raw"), 1, 0.0) is False


def test_should_retry_stops_at_max_attempts() -> None:
    retry = RetryStrategy(max_attempts=3, max_elapsed=None)
    error = HostUnreachableError("down")

    assert retry.should_retry(error, 1, 0.0) is True
    assert retry.should_retry(error, 2, 0.0) is True
    assert retry.should_retry(error, 3, 0.0) is False


def test_should_retry_respects_max_elapsed() -> None:
    retry = RetryStrategy(max_attempts=10, base_delay=4.0, jitter=0.5, max_elapsed=20.0)
    error = HostUnreachableError("down")

    # The check uses the wait before jitter: 4 s after attempt 1, 8 s after attempt 2.
    assert retry.should_retry(error, 1, 16.0) is True
    assert retry.should_retry(error, 1, 16.5) is False
    assert retry.should_retry(error, 2, 12.0) is True
    assert retry.should_retry(error, 2, 12.1) is False


# --- RetryStrategy.run ---


def test_run_retries_with_backoff_sequence() -> None:
    fake = FakeTime()
    retry = RetryStrategy(
        max_attempts=4, base_delay=1.0, jitter=0, sleep=fake.sleep, clock=fake.clock
    )
    fn = _failing(
        [HostUnreachableError("down"), ConnectionLostError("lost"), HostUnreachableError("down")]
    )
    retried: list[tuple[str, int, float]] = []

    result = retry.run(
        fn, on_retry=lambda error, attempt, delay: retried.append((error.code, attempt, delay))
    )

    assert result == "ok"
    assert fn.calls == [1, 2, 3, 4]
    assert retried == [
        ("host_unreachable", 1, 1.0),
        ("connection_lost", 2, 2.0),
        ("host_unreachable", 3, 4.0),
    ]
    assert _waits(fake, [1.0, 2.0, 4.0]) == pytest.approx([1.0, 2.0, 4.0])
    # Waits are sliced so that a stop request is seen within a tenth of a second.
    assert max(fake.sleeps) <= 0.1 + 1e-9


def test_run_caps_delay_at_max_delay() -> None:
    fake = FakeTime()
    retry = RetryStrategy(
        max_attempts=5,
        base_delay=1.0,
        multiplier=3.0,
        max_delay=5.0,
        jitter=0,
        max_elapsed=None,
        sleep=fake.sleep,
        clock=fake.clock,
    )
    delays: list[float] = []
    fn = _failing([HostUnreachableError("down") for _ in range(4)])

    retry.run(fn, on_retry=lambda error, attempt, delay: delays.append(delay))

    assert delays == [1.0, 3.0, 5.0, 5.0]
    assert sum(fake.sleeps) == pytest.approx(14.0)


def test_run_raises_last_error_with_attempt() -> None:
    fake = FakeTime()
    retry = RetryStrategy(max_attempts=3, jitter=0, sleep=fake.sleep, clock=fake.clock)
    last = HostUnreachableError("third", context={"host": "web1"})
    fn = _failing([HostUnreachableError("first"), HostUnreachableError("second"), last])

    with pytest.raises(HostUnreachableError) as caught:
        retry.run(fn)

    assert caught.value is last
    assert caught.value.context == {"host": "web1", "attempt": 3}
    assert fn.calls == [1, 2, 3]


def test_run_cut_off_by_max_elapsed() -> None:
    fake = FakeTime()
    retry = RetryStrategy(
        max_attempts=10,
        base_delay=2.0,
        jitter=0,
        max_elapsed=10.0,
        sleep=fake.sleep,
        clock=fake.clock,
    )
    fn = _failing([HostUnreachableError("down") for _ in range(10)])

    with pytest.raises(HostUnreachableError) as caught:
        retry.run(fn)

    # Waits of 2 and 4 s fit in 10 s; the next wait of 8 s would end at 14 s.
    assert fn.calls == [1, 2, 3]
    assert sum(fake.sleeps) == pytest.approx(6.0)
    assert caught.value.context["attempt"] == 3


def test_run_elapsed_counts_time_spent_in_fn() -> None:
    fake = FakeTime()
    retry = RetryStrategy(
        max_attempts=10,
        base_delay=1.0,
        jitter=0,
        max_elapsed=10.0,
        sleep=fake.sleep,
        clock=fake.clock,
    )

    def slow_failure(attempt: int) -> str:
        fake.now += 8.5
        raise HostUnreachableError("down")

    with pytest.raises(HostUnreachableError) as caught:
        retry.run(slow_failure)

    # Attempt 1 fails at 8.5 s and its 1 s wait fits; attempt 2 fails at 18 s, past the limit.
    assert caught.value.context["attempt"] == 2
    assert sum(fake.sleeps) == pytest.approx(1.0)


def test_run_does_not_retry_unrecoverable() -> None:
    fake = FakeTime()
    retry = RetryStrategy(max_attempts=5, sleep=fake.sleep, clock=fake.clock)
    fn = _failing([AuthenticationError("denied")])

    with pytest.raises(AuthenticationError):
        retry.run(fn)

    assert fn.calls == [1]
    assert fake.sleeps == []


def test_run_propagates_foreign_exceptions_unchanged() -> None:
    fake = FakeTime()
    retry = RetryStrategy(max_attempts=5, sleep=fake.sleep, clock=fake.clock)
    fn = _failing([KeyError("bug")])

    with pytest.raises(KeyError):
        retry.run(fn)

    assert fn.calls == [1]


def test_should_stop_interrupts_wait() -> None:
    fake = FakeTime()
    retry = RetryStrategy(
        max_attempts=5, base_delay=10.0, jitter=0, sleep=fake.sleep, clock=fake.clock
    )
    fn = _failing([HostUnreachableError("down") for _ in range(5)])

    # Stop once three slices of the 10 s wait have passed, as a SIGINT handler would.
    def should_stop() -> bool:
        return len(fake.sleeps) >= 3

    with pytest.raises(HostUnreachableError) as caught:
        retry.run(fn, should_stop=should_stop)

    assert fn.calls == [1]
    assert len(fake.sleeps) == 3
    assert sum(fake.sleeps) == pytest.approx(0.3)
    assert caught.value.context["attempt"] == 1


def test_should_stop_with_real_sleep() -> None:
    stop = threading.Event()
    retry = RetryStrategy(max_attempts=3, base_delay=30.0, jitter=0)
    fn = _failing([HostUnreachableError("down") for _ in range(3)])
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()

    with pytest.raises(HostUnreachableError):
        retry.run(fn, should_stop=stop.is_set)

    assert time.monotonic() - started < 2.0
    assert fn.calls == [1]


def test_should_stop_already_set_skips_wait() -> None:
    fake = FakeTime()
    retry = RetryStrategy(max_attempts=5, sleep=fake.sleep, clock=fake.clock)
    fn = _failing([HostUnreachableError("down")])

    with pytest.raises(HostUnreachableError):
        retry.run(fn, should_stop=lambda: True)

    assert fn.calls == [1]
    assert fake.sleeps == []


# --- RetryStrategy.from_settings ---


def test_from_settings_reads_every_key() -> None:
    retry = RetryStrategy.from_settings(
        {
            "retries": 4,
            "retry_delay": 0.5,
            "retry_backoff": 3,
            "retry_max_delay": 9,
            "retry_jitter": 0.1,
            "retry_max_elapsed": 60,
            "unrelated": "ignored",
        }
    )

    assert retry.max_attempts == 5
    assert retry.base_delay == 0.5
    assert retry.multiplier == 3
    assert retry.max_delay == 9
    assert retry.jitter == 0.1
    assert retry.max_elapsed == 60


def test_from_settings_defaults_and_null_limit() -> None:
    retry = RetryStrategy.from_settings({"retry_max_elapsed": None})

    assert retry.max_attempts == 3
    assert retry.base_delay == 1.0
    assert retry.max_elapsed is None


def test_from_settings_accepts_numeric_strings() -> None:
    retry = RetryStrategy.from_settings({"retries": "2", "retry_delay": "0.25"})

    assert retry.max_attempts == 3
    assert retry.base_delay == 0.25


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("retries", -1),
        ("retries", 1.5),
        ("retries", True),
        ("retries", "three"),
        ("retries", None),
        ("retry_delay", -0.1),
        ("retry_delay", float("nan")),
        ("retry_backoff", 0.5),
        ("retry_max_delay", float("inf")),
        ("retry_jitter", 1.5),
        ("retry_jitter", -0.1),
        ("retry_max_elapsed", -5),
        ("retry_max_elapsed", [60]),
    ],
)
def test_from_settings_rejects_invalid(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RetryStrategy.from_settings({key: value})

    assert key in caught.value.message
    assert repr(value) in caught.value.message
    assert caught.value.context["setting"] == key


# --- FallbackStrategy ---


def test_fallback_first_success_wins() -> None:
    tried: list[str] = []
    fallbacks: list[tuple[str, str]] = []

    def fetch(mirror: str) -> str:
        tried.append(mirror)
        if mirror == "https://a.example":
            raise ProviderUnavailableError("503")
        if mirror == "https://b.example":
            raise AuthenticationError("401")
        return f"artifact from {mirror}"

    fallback = FallbackStrategy(
        ["https://a.example", "https://b.example", "https://c.example", "https://d.example"],
        on_fallback=lambda alternative, error: fallbacks.append((alternative, error.code)),
    )

    assert fallback.run(fetch) == "artifact from https://c.example"
    assert tried == ["https://a.example", "https://b.example", "https://c.example"]
    assert fallbacks == [
        ("https://a.example", "provider_unavailable"),
        ("https://b.example", "authentication_failed"),
    ]


def test_fallback_all_fail_aggregate_error() -> None:
    errors = {
        "mirror-a": ProviderUnavailableError("503 Service Unavailable"),
        "mirror-b": AuthenticationError("401 Unauthorized"),
    }

    def fetch(mirror: str) -> str:
        raise errors[mirror]

    with pytest.raises(ProviderUnavailableError) as caught:
        FallbackStrategy(["mirror-a", "mirror-b"]).run(fetch)

    aggregate = caught.value
    assert "mirror-a: provider_unavailable: 503 Service Unavailable" in aggregate.message
    assert "mirror-b: authentication_failed: 401 Unauthorized" in aggregate.message
    assert aggregate.message.index("mirror-a") < aggregate.message.index("mirror-b")
    assert aggregate.context["alternatives"] == [
        {
            "alternative": "mirror-a",
            "code": "provider_unavailable",
            "message": "503 Service Unavailable",
        },
        {"alternative": "mirror-b", "code": "authentication_failed", "message": "401 Unauthorized"},
    ]
    assert aggregate.__cause__ is errors["mirror-b"]
    assert aggregate.recoverable is True


def test_fallback_aggregate_unrecoverable_when_all_are() -> None:
    def fetch(mirror: str) -> str:
        raise ProviderError(f"{mirror} rejected the token")

    with pytest.raises(ProviderUnavailableError) as caught:
        FallbackStrategy(["a", "b"]).run(fetch)

    assert caught.value.recoverable is False


def test_fallback_other_errors_propagate() -> None:
    tried: list[str] = []

    def fetch(mirror: str) -> str:
        tried.append(mirror)
        raise CommandFailedError("checksum mismatch")

    with pytest.raises(CommandFailedError):
        FallbackStrategy(["a", "b"]).run(fetch)

    assert tried == ["a"]


def test_fallback_redacts_url_passwords() -> None:
    def fetch(url: str) -> str:
        raise ProviderUnavailableError(f"GET {url} failed")

    with pytest.raises(ProviderUnavailableError) as caught:
        FallbackStrategy(["https://deploy:s3cr3tpass@mirror.example/app.tar.gz"]).run(fetch)

    assert "s3cr3tpass" not in caught.value.message
    assert "s3cr3tpass" not in caught.value.to_json()


def test_fallback_rejects_empty_or_string() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        FallbackStrategy([])
    with pytest.raises(ConfigurationError, match="must be a list"):
        FallbackStrategy("https://mirror.example")


def test_retry_around_fallback() -> None:
    fake = FakeTime()
    retry = RetryStrategy(max_attempts=3, jitter=0, sleep=fake.sleep, clock=fake.clock)
    fallback = FallbackStrategy(["a", "b"])
    outcomes = {"a": [ProviderUnavailableError("down"), ProviderUnavailableError("down")]}
    tried: list[str] = []

    def fetch(mirror: str) -> str:
        tried.append(mirror)
        if mirror == "b" or not outcomes["a"]:
            if mirror == "a":
                return "from a"
            raise ProviderUnavailableError("b down")
        raise outcomes["a"].pop(0)

    result = retry.run(lambda attempt: fallback.run(fetch))

    assert result == "from a"
    assert tried == ["a", "b", "a", "b", "a"]


# --- RollbackRecoveryStrategy ---


def test_rollback_reasons_default() -> None:
    strategy = RollbackRecoveryStrategy()

    assert strategy.reason_for(HealthCheckError("503")) == "health_check"
    assert strategy.reason_for(DeploymentTimeoutError("slow")) == "timeout"
    assert strategy.reason_for(CommandFailedError("exit 1")) == "step_failed"
    assert strategy.reason_for(ProviderUnavailableError("all mirrors failed")) == "step_failed"
    assert strategy.reason_for(HostUnreachableError("down")) == "unreachable"
    assert strategy.reason_for(ConnectionLostError("lost")) == "unreachable"
    assert strategy.reason_for(InterruptedRunError("SIGINT", signal_number=2)) == "interrupted"
    assert strategy.reason_for(ConfigurationError("bad")) is None
    assert strategy.reason_for(AuthenticationError("denied")) is None
    assert strategy.reason_for(HostKeyError("changed")) is None
    assert strategy.reason_for(LockHeldError("held")) is None


def test_rollback_reasons_translate_raw_errors() -> None:
    strategy = RollbackRecoveryStrategy()

    assert strategy.reason_for(EOFError()) == "unreachable"


def test_rollback_reasons_per_settings() -> None:
    no_health = RollbackRecoveryStrategy.from_settings({"rollback_on_health_check": False})
    no_timeout = RollbackRecoveryStrategy.from_settings({"rollback_on_timeout": False})
    no_step = RollbackRecoveryStrategy.from_settings({"rollback_on_step_failure": False})

    assert no_health.reason_for(HealthCheckError("503")) is None
    assert no_health.reason_for(DeploymentTimeoutError("slow")) == "timeout"
    assert no_timeout.reason_for(DeploymentTimeoutError("slow")) is None
    assert no_timeout.reason_for(CommandFailedError("exit 1")) == "step_failed"
    assert no_step.reason_for(CommandFailedError("exit 1")) is None
    assert no_step.reason_for(HostUnreachableError("down")) is None
    assert no_step.reason_for(HealthCheckError("503")) == "health_check"
    assert no_step.reason_for(InterruptedRunError("SIGTERM", signal_number=15)) == "interrupted"


def test_rollback_settings_reject_non_boolean() -> None:
    with pytest.raises(ConfigurationError, match="rollback_on_timeout='no'"):
        RollbackRecoveryStrategy.from_settings({"rollback_on_timeout": "no"})


def test_rollback_reasons_fixed_set() -> None:
    assert ROLLBACK_REASONS == (
        "health_check",
        "timeout",
        "step_failed",
        "unreachable",
        "manual",
        "interrupted",
    )
    strategy = RollbackRecoveryStrategy()
    errors = [
        HealthCheckError("x"),
        DeploymentTimeoutError("x"),
        CommandFailedError("x"),
        HostUnreachableError("x"),
        InterruptedRunError("x", signal_number=2),
    ]
    for error in errors:
        assert strategy.reason_for(error) in ROLLBACK_REASONS


# --- CircuitBreaker ---


def test_breaker_opens_after_threshold() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30, clock=fake.clock)

    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow() is True

    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.allow() is False


def test_breaker_success_resets_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2)

    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()

    assert breaker.state == "closed"
    assert breaker.failures == 1


def test_breaker_half_open_after_timeout() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=30, clock=fake.clock)
    breaker.record_failure()

    fake.now += 29.9
    assert breaker.state == "open"
    assert breaker.allow() is False

    fake.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_breaker_half_open_success_closes() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=fake.clock)
    breaker.record_failure()
    fake.now += 5
    assert breaker.allow() is True

    breaker.record_success()

    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert breaker.allow() is True
    assert breaker.allow() is True


def test_breaker_half_open_failure_reopens() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5, clock=fake.clock)
    for _ in range(3):
        breaker.record_failure()
    fake.now += 5
    assert breaker.allow() is True

    breaker.record_failure()

    assert breaker.state == "open"
    assert breaker.allow() is False
    fake.now += 4.9
    assert breaker.state == "open"
    fake.now += 0.1
    assert breaker.state == "half_open"


def test_breaker_stale_probe_frees_slot() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=fake.clock)
    breaker.record_failure()
    fake.now += 5
    assert breaker.allow() is True

    fake.now += 4
    assert breaker.allow() is False
    fake.now += 1
    assert breaker.allow() is True


def test_breaker_one_probe_across_threads() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1, clock=fake.clock)
    breaker.record_failure()
    fake.now += 1
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    allowed: list[bool] = []
    allowed_lock = threading.Lock()

    def probe() -> None:
        barrier.wait()
        result = breaker.allow()
        with allowed_lock:
            allowed.append(result)

    threads = [threading.Thread(target=probe) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(allowed) == threads_count
    assert allowed.count(True) == 1


def test_breaker_rejects_invalid_settings() -> None:
    with pytest.raises(ConfigurationError, match="failure_threshold=0"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ConfigurationError, match="reset_timeout=-1"):
        CircuitBreaker(reset_timeout=-1)


def test_board_one_breaker_per_host() -> None:
    fake = FakeTime()
    board = CircuitBreakerBoard(failure_threshold=2, reset_timeout=10, clock=fake.clock)

    assert board.for_host("web1") is board.for_host("web1")
    assert board.for_host("web1") is not board.for_host("web2")

    board.for_host("web1").record_failure()
    board.for_host("web1").record_failure()
    board.for_host("web2").record_failure()
    board.for_host("db1").record_failure()
    board.for_host("db1").record_failure()

    assert board.open_hosts() == ["db1", "web1"]
    fake.now += 10
    assert board.open_hosts() == []
    assert board.for_host("web1").state == "half_open"


def test_board_from_settings() -> None:
    board = CircuitBreakerBoard.from_settings(
        {"breaker_failure_threshold": 5, "breaker_reset_timeout": 2}
    )

    breaker = board.for_host("web1")
    assert breaker.failure_threshold == 5
    assert breaker.reset_timeout == 2
    with pytest.raises(ConfigurationError, match="breaker_failure_threshold"):
        CircuitBreakerBoard.from_settings({"breaker_failure_threshold": 0})

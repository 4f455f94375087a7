"""Health checks of a switched release: an HTTP status from the controller, or a command on the host."""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from fraisier.errors import DeploymentTimeoutError, FraisierError, HealthCheckError
from fraisier.inventory import HealthCheck
from fraisier.transport.base import Transport

log = logging.getLogger("fraisier.health")


@dataclasses.dataclass
class HealthResult:
    ok: bool
    attempts: int
    detail: str


def _check_url(url: str, expect_status: int, timeout: float) -> tuple[bool, str]:
    request = urllib.request.Request(
        url, method="GET", headers={"User-Agent": "fraisier-health-check"}
    )
    # The health check talks to the service directly, never through an HTTP proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"GET {url} failed: {reason}"
    if status != expect_status:
        return False, f"GET {url} returned {status}, expected {expect_status}"
    return True, f"GET {url} returned {status}"


def run_health_check(
    check: HealthCheck,
    *,
    url: str | None,
    command: str | None,
    transport: Transport,
    cwd: str,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Run the check up to ``retries + 1`` times, ``delay`` seconds apart.

    ``url`` and ``command`` are the check's values with variables already filled in.
    """
    attempts = 0
    detail = "not run"
    for attempt in range(1, check.retries + 2):
        attempts = attempt
        if url:
            ok, detail = _check_url(url, check.expect_status, check.timeout)
        else:
            assert command is not None
            try:
                result = transport.run(command, timeout=check.timeout, cwd=cwd)
                ok = result.exit_status == 0
                output = (result.stderr.strip() or result.stdout.strip())[-300:]
                detail = f"command exited {result.exit_status}" + (f": {output}" if output else "")
            except DeploymentTimeoutError:
                ok, detail = False, f"command timed out after {check.timeout:g}s"
            except FraisierError:
                raise
        if ok:
            return HealthResult(True, attempts, detail)
        log.info(
            "health check attempt %d of %d failed: %s",
            attempt,
            check.retries + 1,
            detail,
            extra={"event": "health_retry", "attempt": attempt},
        )
        if attempt <= check.retries and not should_stop():
            sleep(check.delay)
        elif should_stop():
            break
    return HealthResult(False, attempts, detail)


def health_error(result: HealthResult, host: str) -> HealthCheckError:
    return HealthCheckError(
        f"health check failed on {host} after {result.attempts} attempt(s): {result.detail}",
        context={"host": host},
    )

"""Output helpers shared by the task modules: errors as exit codes, and a closed stdout."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.exceptions import Exit

from fraisier.errors import FraisierError

F = TypeVar("F", bound=Callable[..., Any])


def quiet_on_closed_stdout(func: F) -> F:
    """Make a read-only task exit 1 without a traceback when its reader closes stdout.

    ``inv history | head`` closes the pipe after a few lines. The ``fraisier`` script handles
    this in its ``main``, and this decorator does the same for tasks run by ``inv``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:
            # Point stdout at /dev/null, so that the interpreter's flush at exit has a target.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def error_exit(exc: FraisierError, log_format: str, logging_ready: bool = True) -> Exit:
    """Return the Exit for an error: ``error: MESSAGE`` text, or one JSON log line.

    With JSON logs every stderr line is a JSON object, so the error is logged on
    ``fraisier.cli`` instead. When logging could not be set up (an invalid log level or log
    file), a handler with the same JSON formatter and redaction writes that one line.
    """
    code = int(exc.exit_code)
    if log_format != "json":
        return Exit(f"error: {exc}", code=code)
    from fraisier.logging import JsonFormatter, attach_filters

    logger = logging.getLogger("fraisier.cli")
    extra = {"error_code": exc.code, "exit_code": code}
    if logging_ready:
        logger.error("%s", exc.message, extra=extra)
    else:
        handler = attach_filters(logging.StreamHandler(sys.stderr))
        handler.setFormatter(JsonFormatter())
        handler.handle(
            logger.makeRecord(
                logger.name, logging.ERROR, __file__, 0, "%s", (exc.message,), None, extra=extra
            )
        )
    return Exit(code=code)

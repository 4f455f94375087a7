"""Output helpers shared by the task modules."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.exceptions import Exit

F = TypeVar("F", bound=Callable[..., Any])


def quiet_on_closed_stdout(func: F) -> F:
    """Make a read-only task exit 1 without a traceback when its reader closes stdout.

    ``inv history | head`` closes the pipe after a few lines; the ``fraisier`` script handles
    this in its ``main``, and this decorator does it for tasks run by ``inv``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:
            # Point stdout at /dev/null, so the interpreter's final flush cannot fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise Exit(code=1) from None

    return wrapper  # type: ignore[return-value]

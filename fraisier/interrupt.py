"""SIGINT and SIGTERM handling for a run: stop starting steps, then wind down cleanly.

The first signal sets a flag that every host worker checks before each step. Steps already
running end or time out, switched hosts are rolled back per ``on_failure``, locks are released
and the run is recorded as interrupted. A second SIGINT exits at once with status 130 after
printing which hosts may be in an unknown state.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from fraisier.command import command_name


class Interrupt:
    """The run's stop flag, set by a signal handler or by a caller."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_number: int | None = None
        self.describe_state: Callable[[], str] = lambda: "unknown"

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, signal_number: int) -> None:
        if self.signal_number is None:
            self.signal_number = signal_number
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) when the run is interrupted."""
        return self._event.wait(seconds)

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.is_set and signal_number == signal.SIGINT:
            state = self.describe_state()
            sys.stderr.write(
                "\nsecond interrupt: exiting now without cleanup. Hosts may be in this state:\n"
                f"{state}\nDeploy locks remain on the hosts: the next deploy reports each one, "
                f"and '{command_name()} unlock' removes them once no run is active.\n"
            )
            sys.stderr.flush()
            os._exit(130)
        name = signal.Signals(signal_number).name
        sys.stderr.write(
            f"\n{name} received: finishing the running steps, then rolling back and releasing "
            "locks (press Ctrl-C again to exit at once)\n"
        )
        sys.stderr.flush()
        self.set(signal_number)

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Install the handlers for the block, in the main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

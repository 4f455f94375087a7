"""Run a Fraisier task with the run database, audit trail and metrics push switched off.

Fraisier has no setting that turns recording off, so this wrapper swaps the function that
opens those back ends for one that keeps the records in memory (``NullRecorder``). Everything
else is the same code path as ``python -m fraisier``. The benchmark compares the two to
measure what recording in SQLite costs.

Usage: ``python bench/fraisier_norecord.py deploy --env ENV --inventory FILE [...]``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import fraisier.app
from fraisier.runner import RunServices


@contextlib.contextmanager
def memory_backends(inventory: Any) -> Iterator[fraisier.app.Backends]:
    """Yield back ends that record nothing outside this process."""
    yield fraisier.app.Backends(services=RunServices())


def main() -> None:
    """Run the Fraisier command line with in-memory back ends."""
    fraisier.app.backends = memory_backends
    from fraisier.cli import main as cli_main

    sys.argv[0] = "fraisier"
    cli_main()


if __name__ == "__main__":
    main()

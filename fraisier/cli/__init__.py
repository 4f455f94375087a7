"""The Invoke task namespace, shared by ``inv`` in a checkout and the ``fraisier`` command."""

from __future__ import annotations

import os
import sys

from invoke import Collection, Program

from fraisier import __version__
from fraisier.cli import deploy as deploy_tasks


def build_namespace() -> Collection:
    namespace = Collection.from_module(deploy_tasks, name="fraisier")
    try:
        from fraisier.cli import history
    except ImportError:  # pragma: no cover - present in every release
        history = None
    if history is not None:
        for name in ("history", "status", "show"):
            if hasattr(history, name):
                namespace.add_task(getattr(history, name))
        if hasattr(history, "db_collection"):
            namespace.add_collection(history.db_collection())
    try:
        from fraisier.cli import metrics
    except ImportError:  # pragma: no cover
        metrics = None
    if metrics is not None and hasattr(metrics, "metrics_collection"):
        namespace.add_collection(metrics.metrics_collection())
    return namespace


namespace = build_namespace()


def main() -> None:
    """Run the ``fraisier`` console script."""
    program = Program(namespace=namespace, name="Fraisier", binary="fraisier", version=__version__)
    try:
        program.run()
    except BrokenPipeError:
        # The reader of stdout went away (as in `fraisier status | head`); stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)

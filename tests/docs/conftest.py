"""Fixtures of the documentation tests; the helpers they use live in ``docs_helpers``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from docs_helpers import Sandbox
from support import Pushgateway, SshHost


@pytest.fixture
def sandbox(
    tmp_path: Path, ssh_hosts3: list[SshHost], pushgateway: Pushgateway
) -> Iterator[Sandbox]:
    """Return a copy of the checkout bound to the three reset test hosts and a Pushgateway."""
    installed = _installed_fraisier()
    box = Sandbox(tmp_path, ssh_hosts3, pushgateway.url)
    yield box
    box.stop_local_services()
    # A shown "pip install" must go into a virtual environment of the sandbox, never over
    # the installation that the rest of the suite and the operator's shell use.
    after = _installed_fraisier()
    if after != installed:
        pytest.fail(f"a sandbox command replaced this machine's fraisier {installed} with {after}")


def _installed_fraisier() -> str:
    """Return where this machine's Python imports fraisier from, outside any checkout."""
    return subprocess.run(
        [sys.executable, "-c", "import fraisier; print(fraisier.__file__)"],
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()

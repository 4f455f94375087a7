"""Fixtures of the documentation tests; the helpers they use live in ``docs_helpers``."""

from __future__ import annotations

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
    box = Sandbox(tmp_path, ssh_hosts3, pushgateway.url)
    yield box
    box.stop_local_services()

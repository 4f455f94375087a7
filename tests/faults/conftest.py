"""Fixtures for the fault tests; the helpers live in ``faultlab``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faultlab import Lab
from support import SshHost


@pytest.fixture
def lab(
    ssh_hosts3: list[SshHost], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Lab]:
    """Return a Lab on the three reset session hosts; thaw and restart them afterwards."""
    yield Lab(ssh_hosts3, tmp_path, capsys)
    for host in ssh_hosts3:
        host.thaw()
        host.start()

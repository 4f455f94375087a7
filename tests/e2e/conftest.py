"""Fixtures of the end-to-end tests; the helpers they use live in ``e2e_helpers``.

The helpers sit in a module with a unique name because every test folder has a ``conftest``
module, and a test that imports ``conftest`` by name may get another folder's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import TestProject
from support import SshHost


@pytest.fixture
def project(tmp_path: Path, ssh_hosts3: list[SshHost]) -> TestProject:
    """Return a test project on the three reset session hosts, with no release deployed."""
    return TestProject(tmp_path, ssh_hosts3)

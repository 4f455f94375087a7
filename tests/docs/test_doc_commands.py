"""Every shell command and configuration block shown in the README and the guides works.

The ``sh`` blocks of each section run in order in a ``Sandbox`` against real sshd test hosts,
so a command that no longer works, or an example that no longer deploys, fails here.
"""

from __future__ import annotations

import pytest
from docs_helpers import DOC_FILES, Block, Sandbox, read_blocks
from support import REPO_ROOT

SHELL_LANGS = ("sh", "bash", "shell", "console")


def _all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for name in DOC_FILES:
        path = REPO_ROOT / name
        if path.is_file():
            blocks += read_blocks(path)
    return blocks


def _sections() -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for block in _all_blocks():
        if block.lang in SHELL_LANGS and block.skip is None:
            seen[(str(block.path.relative_to(REPO_ROOT)), block.section)] = None
    return list(seen)


def test_doc_files_exist() -> None:
    missing = [name for name in DOC_FILES if not (REPO_ROOT / name).is_file()]

    assert missing == []


def test_shell_blocks_are_sh() -> None:
    # Only ``sh`` blocks run; a command block in another language would escape the tests.
    other = [b.where for b in _all_blocks() if b.lang in SHELL_LANGS and b.lang != "sh"]

    assert other == [], "write command blocks as ```sh"


def test_skipped_blocks_are_few() -> None:
    skipped = [b for b in _all_blocks() if b.lang == "sh" and b.skip is not None]
    run = [b for b in _all_blocks() if b.lang == "sh" and b.skip is None]

    assert run, "no shell block of the guides runs"
    assert len(skipped) <= len(run) // 2, [f"{b.where}: {b.skip}" for b in skipped]


@pytest.mark.ssh
@pytest.mark.monitoring
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("doc", "section"), _sections(), ids=[f"{d}::{s}" for d, s in _sections()])
def test_section_commands(doc: str, section: str, sandbox: Sandbox) -> None:
    blocks = [
        b
        for b in read_blocks(REPO_ROOT / doc)
        if b.section == section and b.lang == "sh" and b.skip is None
    ]

    for block in blocks:
        result = sandbox.run(block)
        assert result.returncode == block.exit_code, str(result)

"""Every YAML block of the README and the guides is valid configuration or a copy of a tested file.

A block marked ``excerpt PATH`` must appear line for line in that file of the repository, whose
example deploys are tested. Any other block is loaded as an inventory, completed with a minimal
host and fraise when it only shows part of one, or as a recipe when it has ``steps``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from docs_helpers import DOC_FILES, Block, TagDumper, load_doc_yaml, read_blocks
from support import REPO_ROOT

from fraisier.inventory import TOP_KEYS, load_inventory
from fraisier.recipes import load_recipe

EXCERPT_ROOTS = ("examples/", "inventories/", "tasks/", "monitoring/", ".ci/")


def _yaml_blocks() -> list[Block]:
    blocks: list[Block] = []
    for name in DOC_FILES:
        path = REPO_ROOT / name
        if path.is_file():
            # A block marked skip carries its reason in the Markdown; the parser rejects a
            # skip without one.
            blocks += [b for b in read_blocks(path) if b.lang in ("yaml", "yml") and b.skip is None]
    return blocks


BLOCKS = _yaml_blocks()


def _contains_lines(text: str, excerpt: str) -> bool:
    """Return whether ``excerpt`` is a run of lines of ``text``, indented by any amount."""
    lines = [line.rstrip() for line in text.splitlines()]
    expected = textwrap.dedent(excerpt.strip("\n")).splitlines()
    expected = [line.rstrip() for line in expected]
    for start in range(len(lines) - len(expected) + 1):
        window = textwrap.dedent("\n".join(lines[start : start + len(expected)])).splitlines()
        if window == expected:
            return True
    return False


def _complete_inventory(data: dict[str, Any]) -> dict[str, Any]:
    """Add a host and a fraise to a partial inventory, so the loader checks the shown keys."""
    data = dict(data)
    data.setdefault("environment", "doc")
    data.setdefault("hosts", {"web1": {"address": "192.0.2.10"}})
    data.setdefault("fraises", {"app": {"deploy_to": "/srv/app"}})
    return data


def _env_names(text: str) -> list[str]:
    return re.findall(r"!env\s+([A-Za-z_][A-Za-z0-9_]*)", text)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_yaml_block_is_valid(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.excerpt is not None:
        assert block.excerpt.startswith(EXCERPT_ROOTS), f"{block.where}: {block.excerpt}"
        source = REPO_ROOT / block.excerpt
        assert source.is_file(), f"{block.where}: excerpt of missing file {block.excerpt}"
        assert _contains_lines(source.read_text(encoding="utf-8"), block.text), (
            f"{block.where}: the block is not a copy of lines of {block.excerpt}"
        )
        return

    for name in _env_names(block.text):
        monkeypatch.setenv(name, "doc-value")
    data = load_doc_yaml(block.text)
    assert isinstance(data, dict), f"{block.where}: a YAML block must be a mapping"
    if "steps" in data:
        path = tmp_path / "tasks" / "doc.yaml"
        path.parent.mkdir()
        path.write_text(block.text, encoding="utf-8")
        recipe = load_recipe(path)
        assert recipe.steps
        return

    unknown = sorted(set(data) - set(TOP_KEYS))
    assert unknown == [], (
        f"{block.where}: keys {unknown} are neither inventory nor recipe keys; mark the block "
        "'doc-test: excerpt PATH' or 'doc-test: skip: REASON'"
    )
    path = tmp_path / "inventories" / "doc.yaml"
    path.parent.mkdir()
    # A shown key file is the reader's own: make it exist under a temporary HOME.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for host in (data.get("hosts") or {}).values():
        key = (host or {}).get("identity_file")
        if isinstance(key, str) and not Path(key).is_absolute():
            key_path = Path(key).expanduser()
            key_path = key_path if key_path.is_absolute() else path.parent / key_path
            key_path.parent.mkdir(parents=True, exist_ok=True)
            key_path.write_text("not a key: only its existence is checked\n")
    path.write_text(yaml.dump(_complete_inventory(data), Dumper=TagDumper), encoding="utf-8")
    loaded = load_inventory(path)
    assert loaded.hosts
    assert loaded.fraises

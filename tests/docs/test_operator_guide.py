"""The operator guide names every error and exit code, and the docs' relative links resolve.

The error codes are collected from the code, never from a list kept by hand: the ``code`` of
every ``FraisierError`` subclass, and every literal code that ``fraisier/`` passes as
``code="..."`` or assigns to an error's ``code``. A code added to the engine without a row in
docs/OPERATOR_GUIDE.md fails here.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest
from support import REPO_ROOT

from fraisier.errors import ExitCode, FraisierError

GUIDE = REPO_ROOT / "docs" / "OPERATOR_GUIDE.md"
LINKED_DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# An inline link or image, [text](target) or [text](target "title"), whose target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _class_codes() -> dict[str, str]:
    """Return the class-level ``code`` of FraisierError and all its subclasses, by code."""
    codes: dict[str, str] = {}
    pending: list[type[FraisierError]] = [FraisierError]
    while pending:
        cls = pending.pop()
        codes[cls.code] = cls.__name__
        pending.extend(cls.__subclasses__())
    return codes


def _is_code_keyword(node: ast.AST) -> bool:
    return isinstance(node, ast.keyword) and node.arg == "code"


def _is_code_assignment(node: ast.AST) -> bool:
    return isinstance(node, ast.Assign) and any(
        isinstance(target, ast.Attribute) and target.attr == "code" for target in node.targets
    )


def _literal_codes() -> dict[str, str]:
    """Return the error codes written as literals in ``fraisier/``, with the file of each.

    Two forms set a code on an error instance: a keyword argument ``code="..."`` and an
    assignment ``error.code = "..."``. Exit codes are integers, so they never match.
    """
    codes: dict[str, str] = {}
    package = REPO_ROOT / "fraisier"
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = str(path.relative_to(REPO_ROOT))
        for node in ast.walk(tree):
            if not (_is_code_keyword(node) or _is_code_assignment(node)):
                continue
            value = node.value  # type: ignore[attr-defined]
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                codes.setdefault(value.value, where)
    return codes


def _guide_text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_error_codes_found_in_code() -> None:
    # Guards the collection itself: an empty or tiny set would make the next test pass vacuously.
    class_codes = _class_codes()
    literal_codes = _literal_codes()

    assert "configuration_error" in class_codes
    assert "rollback_failed" in class_codes
    assert "lock_stale" in literal_codes
    assert "host_key_unknown" in literal_codes
    assert len(class_codes) >= 15


def test_guide_names_every_class_error_code() -> None:
    text = _guide_text()

    missing = {code: name for code, name in _class_codes().items() if f"`{code}`" not in text}

    assert missing == {}, "add these error codes (code: class) to docs/OPERATOR_GUIDE.md"


def test_guide_names_every_literal_error_code() -> None:
    text = _guide_text()

    missing = {code: where for code, where in _literal_codes().items() if f"`{code}`" not in text}

    assert missing == {}, "add these error codes (code: file) to docs/OPERATOR_GUIDE.md"


def test_guide_names_every_exit_code() -> None:
    text = _guide_text()
    rows = {line for line in text.splitlines() if line.startswith("|")}

    missing = [
        member.name
        for member in ExitCode
        if not any(f"| {member.value} | `{member.name}` |" in row for row in rows)
    ]

    assert missing == [], "add a table row '| VALUE | `NAME` | ...' for these exit codes"


# --- relative links -------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """Return the anchor that GitHub gives a Markdown heading's text, without the ``#``.

    GitHub lowercases the text, drops punctuation other than ``-`` and ``_``, and turns each
    space into ``-``. Inline code keeps its text without the backticks.
    """
    text = heading.strip().lower().replace("`", "")
    kept = []
    for char in text:
        if char in " -_" or unicodedata.category(char)[0] in ("L", "N"):
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def _prose_lines(path: Path) -> list[str]:
    """Return the lines of a Markdown file outside fenced blocks, with inline code removed."""
    lines: list[str] = []
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def anchors(path: Path) -> set[str]:
    """Return the heading anchors of a Markdown file, numbered as GitHub numbers duplicates."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        anchor = github_anchor(heading.group(1))
        count = counts.get(anchor, 0)
        counts[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """Return the link targets of a Markdown file that are neither URLs nor mail addresses."""
    targets: list[str] = []
    for line in _prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue
            targets.append(target)
    return targets


def test_anchor_of_headings() -> None:
    assert github_anchor("Recipe: `steps[N]`") == "recipe-stepsn"
    assert github_anchor("Reading a run's history") == "reading-a-runs-history"
    assert github_anchor("4. Grafana") == "4-grafana"
    assert github_anchor("Setting up the Pushgateway, Prometheus") == (
        "setting-up-the-pushgateway-prometheus"
    )


def test_links_found_outside_code() -> None:
    links = relative_links(GUIDE)

    assert "configuration.md" in links
    assert "DEPLOYMENT_PATTERNS.md" in links
    assert "#exit-codes" in links


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken: list[str] = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
            continue
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")

    assert broken == [], f"broken links in {doc.relative_to(REPO_ROOT)}"

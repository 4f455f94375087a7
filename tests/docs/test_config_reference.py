"""docs/configuration.md lists exactly the keys that the inventory and recipe loaders accept.

The key lists come from the loaders' own constants and dataclasses, so a key added to the code
without a row in the reference, or a row left behind for a removed key, fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO_ROOT

from fraisier import inventory, recipes

REFERENCE = REPO_ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\|\s*`(?P<key>[^`]+)`\s*\|(?P<rest>.*)\|\s*$")


def _tables(path: Path) -> dict[str, list[list[str]]]:
    """Return the rows of each ``## `` section's table: the key, then the other cells."""
    tables: dict[str, list[list[str]]] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            tables[section] = []
            continue
        match = ROW.match(line)
        if match and section:
            cells = [cell.strip() for cell in match.group("rest").split("|")]
            tables[section].append([match.group("key"), *cells])
    return tables


TABLES = _tables(REFERENCE)

# Section title in the reference -> the keys that the code accepts there.
EXPECTED_KEYS: dict[str, tuple[str, ...]] = {
    "Inventory: top-level keys": inventory.TOP_KEYS,
    "Inventory: `settings`": inventory.SETTING_KEYS,
    "Inventory: `hosts.NAME`": inventory.HOST_KEYS,
    "Inventory: `groups.NAME`": inventory.GROUP_KEYS,
    "Inventory: `fraises.NAME`": tuple(
        k for k in inventory.FRAISE_KEYS if k not in inventory.FRAISE_SETTING_KEYS
    ),
    "Inventory: per-fraise settings": inventory.FRAISE_SETTING_KEYS,
    "Inventory: `fraises.NAME.source`": inventory.SOURCE_KEYS,
    "Inventory: `fraises.NAME.health_check`": inventory.HEALTH_CHECK_KEYS,
    "Recipe: top-level keys": recipes.RECIPE_KEYS,
    "Recipe: `steps[N]`": recipes.STEP_KEYS,
    "Recipe: built-in steps": recipes.BUILTIN_STEPS,
    "Run variables": inventory.RESERVED_VARS,
}

# Words that the Type column must contain for each annotation of a dataclass field.
TYPE_WORDS = {
    "str | None": "string",
    "str": "string",
    "int": "integer",
    "int | None": "integer",
    "float": "number",
    "float | None": "number",
    "bool": "boolean",
    "bool | str": "boolean",
    "tuple[int | str, ...]": "list",
    "tuple[tuple[str, str], ...]": "mapping",
}


def _keys(section: str) -> list[str]:
    assert section in TABLES, f"docs/configuration.md has no section '## {section}'"
    return [row[0] for row in TABLES[section]]


def _literal(cell: str) -> Any:
    """Return the YAML value of a cell written as one backquoted literal, else the cell."""
    match = re.fullmatch(r"`([^`]*)`(?: in the project)?", cell)
    return yaml.safe_load(match.group(1)) if match else cell


def _normal(value: Any) -> Any:
    """Return a value comparable across YAML and dataclass forms: a mapping as its items."""
    if isinstance(value, dict):
        return [[k, _normal(v)] for k, v in sorted(value.items())]
    if isinstance(value, tuple):
        return [_normal(v) for v in value]
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


@pytest.mark.parametrize("section", list(EXPECTED_KEYS))
def test_reference_lists_every_key(section: str) -> None:
    documented = _keys(section)
    accepted = EXPECTED_KEYS[section]

    assert sorted(set(documented)) == sorted(documented), f"repeated rows in '{section}'"
    assert sorted(documented) == sorted(accepted)


def test_reference_rows_have_type_and_meaning() -> None:
    incomplete = [
        f"{section}: {row[0]}"
        for section, rows in TABLES.items()
        for row in rows
        if section in EXPECTED_KEYS and (len(row) < 2 or not all(row[1:]))
    ]

    assert incomplete == []


@pytest.mark.parametrize(
    ("section", "model"),
    [
        ("Inventory: `settings`", inventory.Settings),
        ("Inventory: `fraises.NAME.health_check`", inventory.HealthCheck),
        ("Recipe: `steps[N]`", recipes.Step),
    ],
)
def test_reference_defaults_match_code(section: str, model: type) -> None:
    rows = {row[0]: row for row in TABLES[section]}
    fields = {f.name: f for f in dataclasses.fields(model) if f.name in rows}
    assert fields, f"no field of {model.__name__} is documented in '{section}'"

    for name, field in fields.items():
        doc_type, doc_default = rows[name][1], rows[name][2]
        words = TYPE_WORDS.get(str(field.type))
        if words is not None:
            assert words in doc_type, f"{name}: type {field.type} documented as {doc_type!r}"
        if field.default is dataclasses.MISSING or field.default is None:
            continue
        documented = _literal(doc_default)
        if isinstance(documented, str) and documented == doc_default and "`" not in doc_default:
            # Free text such as "settings.retries": the default is another setting's value.
            continue
        assert _normal(documented) == _normal(field.default), (
            f"{section} {name}: documented default {doc_default!r}, code default {field.default!r}"
        )


def test_source_exclude_default_matches_code() -> None:
    rows = {row[0]: row for row in TABLES["Inventory: `fraises.NAME.source`"]}

    assert _literal(rows["exclude"][2]) == list(inventory.Source.exclude)


def test_reference_lists_every_environment_variable() -> None:
    used: set[str] = set()
    for path in (REPO_ROOT / "fraisier").rglob("*.py"):
        used.update(re.findall(r"FRAISIER_[A-Z_]+", path.read_text(encoding="utf-8")))

    assert sorted(_keys("Environment variables")) == sorted(used)

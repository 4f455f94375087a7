"""Rolling batches: ``serial`` as a number, a percentage or a list, and the failure threshold."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


def parse_serial(value: Any) -> tuple[int | str, ...]:
    """Validate ``serial``: a positive number, a percentage such as "25%", or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must not be an empty list")
    parsed: list[int | str] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError("must be a number of hosts, a percentage such as '25%', or a list")
        if isinstance(item, int) and item >= 1:
            parsed.append(item)
            continue
        if isinstance(item, str) and item.isdigit() and int(item) >= 1:
            parsed.append(int(item))
            continue
        match = _PERCENT.match(item) if isinstance(item, str) else None
        if match and 0 < float(match.group(1)) <= 100:
            parsed.append(item)
            continue
        raise ValueError(
            f"item {item!r} must be a number of hosts (1 or more) or a percentage from 1% to 100%"
        )
    return tuple(parsed)


def batch_size(item: int | str, total: int) -> int:
    """Return the number of hosts one ``serial`` item stands for, at least 1."""
    if isinstance(item, int):
        return max(1, min(item, total))
    percent = float(item.rstrip("%"))
    return max(1, min(total, math.ceil(total * percent / 100)))


def split_batches(hosts: Sequence[T], serial: Sequence[int | str]) -> list[list[T]]:
    """Split hosts into batches; the last ``serial`` item repeats until every host is placed."""
    batches: list[list[T]] = []
    position = 0
    index = 0
    while position < len(hosts):
        item = serial[min(index, len(serial) - 1)]
        size = batch_size(item, len(hosts))
        batches.append(list(hosts[position : position + size]))
        position += size
        index += 1
    return batches


def threshold_exceeded(failed: int, total: int, max_fail_percentage: float) -> bool:
    """Return whether ``failed`` of ``total`` hosts is over the allowed failure percentage."""
    if total == 0 or failed == 0:
        return False
    return failed * 100.0 / total > max_fail_percentage

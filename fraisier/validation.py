"""Strict patterns for names that reach a remote shell, and command templating with quoting."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from fraisier.errors import ValidationError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
HOST_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
RELEASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A git ref or commit: no whitespace, no shell metacharacters, no "..", no leading dash.
GIT_REF_PATTERN = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/+@^~-]{1,200}$")
VARIABLE_PATTERN = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\|\s*raw\s*)?\}\}")


def _check(pattern: re.Pattern[str], value: object, what: str, hint: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(f"invalid {what} {value!r}: {hint}", context={"value": repr(value)})
    return value


def validate_name(value: object, what: str = "name") -> str:
    """Check an environment, fraise or group name: lowercase letters, digits, '-' and '_'."""
    return _check(
        NAME_PATTERN,
        value,
        what,
        "use 1 to 63 characters: lowercase letters, digits, '-' and '_', starting with a letter",
    )


def validate_host_name(value: object) -> str:
    """Check an inventory host name: letters, digits, '.', '-' and '_'."""
    return _check(
        HOST_NAME_PATTERN,
        value,
        "host name",
        "use 1 to 63 characters: letters, digits, '.', '-' and '_'",
    )


def validate_release_id(value: object) -> str:
    """Check a release id: letters, digits, '.', '-' and '_', no slash, no leading dot or dash."""
    return _check(
        RELEASE_ID_PATTERN,
        value,
        "release id",
        "use 1 to 64 characters: letters, digits, '.', '-' and '_', starting with a letter or digit",
    )


def validate_git_ref(value: object) -> str:
    """Check a git ref or commit id before it is passed to git."""
    return _check(
        GIT_REF_PATTERN,
        value,
        "git ref",
        "use a branch, tag or commit name without spaces, shell characters or '..'",
    )


def quote(value: Any) -> str:
    """Quote one value for a POSIX shell."""
    return shlex.quote(str(value))


def render(template: str, variables: Mapping[str, Any], *, where: str = "command") -> str:
    """Replace ``{{ name }}`` with the shell-quoted variable; ``{{ name | raw }}`` inserts it as is.

    Raises ConfigurationError naming the variable when it is not defined.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ValidationError(
                f"undefined variable {{{{ {name} }}}} in {where}; define it under 'vars' in the "
                f"inventory or recipe (defined: {known})"
            )
        value = variables[name]
        return str(value) if match.group(2) else quote(value)

    return VARIABLE_PATTERN.sub(substitute, template)


def render_plain(template: str, variables: Mapping[str, Any], *, where: str = "setting") -> str:
    """Replace ``{{ name }}`` with the variable as is, for paths and URLs that are quoted later."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise ValidationError(f"undefined variable {{{{ {name} }}}} in {where}")
        return str(variables[name])

    return VARIABLE_PATTERN.sub(substitute, template)

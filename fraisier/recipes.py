"""Recipes: the ordered, named steps that deploy a fraise, read from ``tasks/<name>.yaml``.

A fraise whose inventory entry names a ``recipe`` uses ``tasks/<recipe>.yaml``. Otherwise the
recipe is looked up as ``tasks/<fraise>.yaml`` first, then ``tasks/<type>.yaml`` (``api``,
``etl``...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fraisier.errors import ConfigurationError, ValidationError
from fraisier.inventory import Fraise, _Section, load_yaml
from fraisier.validation import VARIABLE_PATTERN, validate_name

BUILTIN_STEPS = ("fetch", "link_shared", "switch", "restart", "health_check", "cleanup")
CWD_CHOICES = ("release", "current", "deploy_to", "shared")
STEP_KEYS = (
    "name",
    "builtin",
    "run",
    "sudo",
    "timeout",
    "retries",
    "retry_delay",
    "rollback",
    "cwd",
    "env",
)
RECIPE_KEYS = ("description", "vars", "restart", "steps")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    builtin: str | None = None
    run: str | None = None
    sudo: bool | str = False  # True runs as root; a string names the user
    timeout: float | None = None
    retries: int | None = None
    retry_delay: float | None = None
    rollback: str | None = None
    cwd: str = "release"
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    vars: dict[str, Any]
    restart: str | None
    steps: tuple[Step, ...]
    raw: dict[str, Any]

    @property
    def makes_release(self) -> bool:
        """Whether the recipe fetches and switches a release, or only runs commands."""
        return any(s.builtin == "fetch" for s in self.steps)


def recipes_dir(project_root: Path, setting: str | None) -> Path:
    if setting:
        path = Path(setting).expanduser()
        return path if path.is_absolute() else project_root / path
    return project_root / "tasks"


def find_recipe(fraise: Fraise, directory: Path) -> Path:
    """Return the recipe file of a fraise, naming the paths tried when none exists."""
    if fraise.recipe_set:
        tried = [directory / f"{fraise.recipe}.yaml"]
    else:
        tried = [directory / f"{fraise.name}.yaml", directory / f"{fraise.recipe}.yaml"]
    for path in tried:
        if path.is_file():
            return path
    known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
    raise ConfigurationError(
        f"no recipe for fraise '{fraise.name}': tried {', '.join(str(p) for p in tried)}; "
        f"known recipes: {', '.join(known) or 'none'}; set 'recipe' on the fraise or add the file"
    )


def load_recipe(path: Path) -> Recipe:
    """Read and validate one recipe file."""
    data = load_yaml(path)
    if data is None:
        raise ConfigurationError(f"{path}: the recipe is empty; add 'steps'")
    top = _Section(path, "", data, RECIPE_KEYS)
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigurationError(f"{path}: 'steps' must be a non-empty list of steps")

    steps: list[Step] = []
    for index, body in enumerate(raw_steps):
        steps.append(_read_step(path, index, body))
    _check_order(path, steps)

    restart = top.str("restart")
    if any(s.builtin == "restart" for s in steps) and not restart:
        raise ConfigurationError(
            f"{path}: the recipe has a 'restart' step but no top-level 'restart' command; add "
            "'restart: COMMAND'"
        )
    return Recipe(
        name=path.stem,
        path=path,
        description=top.str("description", "") or "",
        vars=top.vars("vars"),
        restart=restart,
        steps=tuple(steps),
        raw=data,
    )


def _read_step(path: Path, index: int, body: Any) -> Step:
    if isinstance(body, str) and body in BUILTIN_STEPS:
        body = {"builtin": body}
    step = _Section(path, f"steps[{index}]", body, STEP_KEYS)
    builtin = step.str("builtin")
    if builtin is not None and builtin not in BUILTIN_STEPS:
        raise ConfigurationError(
            f"{path}: '{step.at('builtin')}' is {builtin!r}; built-in steps are "
            f"{', '.join(BUILTIN_STEPS)}"
        )
    name = step.str("name", builtin)
    if name is None:
        raise ConfigurationError(f"{path}: '{step.at('name')}' is missing; give every step a name")
    try:
        validate_name(name, "step name")
    except ValidationError as exc:
        raise ConfigurationError(f"{path}: '{step.at('name')}': {exc.message}") from None

    run = step.str("run")
    if builtin is None and not (run and run.strip()):
        raise ConfigurationError(
            f"{path}: step '{name}' ({step.key}) has no command; add 'run: COMMAND' or use "
            f"'builtin: NAME' ({', '.join(BUILTIN_STEPS)})"
        )
    if builtin is not None and run is not None:
        raise ConfigurationError(f"{path}: built-in step '{name}' cannot have 'run'; remove it")

    sudo: bool | str = False
    raw_sudo = step.data.get("sudo")
    if isinstance(raw_sudo, bool):
        sudo = raw_sudo
    elif isinstance(raw_sudo, str):
        validate_name(raw_sudo.replace(".", "-"), f"sudo user in {path} {step.key}")
        sudo = raw_sudo
    elif raw_sudo is not None:
        raise step.fail("sudo", "must be true, false or a user name")

    cwd = step.str("cwd", "release") or "release"
    if cwd not in CWD_CHOICES and not cwd.startswith("/"):
        raise step.fail("cwd", f"must be one of {', '.join(CWD_CHOICES)} or an absolute path")

    env_section = step.section("env", None)
    env_section_data = step.data.get("env") or {}
    if not isinstance(env_section_data, dict):
        raise env_section.fail("env", "must be a mapping")
    env: list[tuple[str, str]] = []
    for key, value in env_section_data.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigurationError(
                f"{path}: invalid environment variable name {key!r} in {step.key}.env"
            )
        env.append((key, str(value)))

    return Step(
        name=name,
        builtin=builtin,
        run=run,
        sudo=sudo,
        timeout=step.float("timeout", None, 0.1, 86400),
        retries=step.int("retries", None, 0, 20),
        retry_delay=step.float("retry_delay", None, 0, 3600),
        rollback=step.str("rollback"),
        cwd=cwd,
        env=tuple(env),
    )


def _check_order(path: Path, steps: list[Step]) -> None:
    names = [s.name for s in steps]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(
            f"{path}: step names must be unique; repeated: {', '.join(duplicates)}"
        )
    builtins = [s.builtin for s in steps if s.builtin]
    if "fetch" not in builtins and "switch" not in builtins:
        # A recipe without a release: plain commands run in deploy_to, such as maintenance jobs.
        for name in ("link_shared", "restart", "health_check", "cleanup"):
            if name in builtins:
                raise ConfigurationError(
                    f"{path}: built-in step '{name}' needs a release; add 'builtin: fetch' and "
                    "'builtin: switch' or remove it"
                )
        return
    for required in ("fetch", "switch"):
        if builtins.count(required) != 1:
            raise ConfigurationError(
                f"{path}: the recipe needs exactly one '{required}' step; add 'builtin: {required}'"
            )
    fetch = builtins.index("fetch")
    switch = builtins.index("switch")
    if fetch > switch:
        raise ConfigurationError(f"{path}: 'fetch' must come before 'switch'")
    for after in ("health_check", "restart"):
        if after in builtins and builtins.index(after) < switch:
            raise ConfigurationError(f"{path}: '{after}' must come after 'switch'")
    for step in steps:
        for template in (step.run, step.rollback):
            if template and "{{" in template and not VARIABLE_PATTERN.search(template):
                raise ConfigurationError(
                    f"{path}: step '{step.name}' has a malformed '{{{{ ... }}}}' placeholder in "
                    f"{template!r}; write '{{{{ name }}}}'"
                )

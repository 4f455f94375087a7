"""Load and validate an environment's inventory: hosts, groups, fraises, settings and variables.

Variable precedence, lowest first: recipe defaults, environment ``vars``, fraise ``vars``, group
``vars`` (in the order the groups are listed under ``groups``), host ``vars``. The run's own
variables (``release_id``, ``release_path``, ``deploy_to`` and the others in ``RESERVED_VARS``)
are set last and cannot be overridden.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fraisier.errors import ConfigurationError, ValidationError
from fraisier.redact import register_secret
from fraisier.validation import (
    validate_git_ref,
    validate_host_name,
    validate_name,
)

log = logging.getLogger("fraisier.inventory")

FRAISE_TYPES = ("api", "etl", "scheduled", "backup")
RESERVED_VARS = (
    "project_root",
    "environment",
    "fraise",
    "host",
    "address",
    "deploy_to",
    "releases_path",
    "release_id",
    "release_path",
    "current_path",
    "shared_path",
    "previous_release",
    "revision",
)


class Secret(str):
    """A string marked secret in the inventory: masked in logs, records and metrics."""


class _InventoryLoader(yaml.SafeLoader):
    """YAML loader with ``!secret VALUE`` and ``!env NAME`` tags that rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[int, int]] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            mark = key_node.start_mark
            try:
                first = seen.setdefault(key, (mark.line, mark.column))
            except TypeError:
                continue
            if first != (mark.line, mark.column):
                raise ConfigurationError(
                    f"{mark.name}:{mark.line + 1}: duplicate key {key!r}, first defined at line "
                    f"{first[0] + 1}; YAML keeps only the last one, so remove or rename one of them"
                )
        return super().construct_mapping(node, deep=deep)


def _construct_secret(loader: yaml.SafeLoader, node: yaml.Node) -> Secret:
    value = Secret(loader.construct_scalar(node))  # type: ignore[arg-type]
    register_secret(value)
    return value


def _construct_env(loader: yaml.SafeLoader, node: yaml.Node) -> Secret:
    name = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    if name not in os.environ:
        mark = node.start_mark
        raise ConfigurationError(
            f"{mark.name}:{mark.line + 1}: environment variable {name} is not set "
            f"(used by '!env {name}'); export it before running Fraisier"
        )
    value = Secret(os.environ[name])
    register_secret(value)
    return value


_InventoryLoader.add_constructor("!secret", _construct_secret)
_InventoryLoader.add_constructor("!env", _construct_env)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with the inventory tags; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc}") from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # PyYAML names the file in marks and errors from this attribute
        return yaml.load(stream, Loader=_InventoryLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigurationError(
            f"{where}: malformed YAML: {exc.problem}; fix the syntax at that line"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: malformed YAML: {exc}") from None


# --- small typed readers that name the file and key in every error -------------------------


class _Section:
    """A mapping from the YAML file together with its dotted key path, for precise errors."""

    def __init__(self, path: Path, key: str, data: Any, allowed: Iterable[str] | None) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"{path}: '{key}' must be a mapping, got {type(data).__name__} {data!r}"
            )
        self.path = path
        self.key = key
        self.data: dict[str, Any] = data
        if allowed is None:
            return
        allowed = tuple(allowed)
        for name in data:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = (
                    f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
                )
                raise ConfigurationError(f"{path}: unknown key '{self.at(name)}'; {hint}")

    def at(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def fail(self, name: str, problem: str) -> ConfigurationError:
        value = self.data.get(name)
        return ConfigurationError(f"{self.path}: '{self.at(name)}' {problem} (got {value!r})")

    def str(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise ConfigurationError(f"{self.path}: '{self.at(name)}' is missing; add it")
            return default
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.fail(name, "must be a string")
        return value if isinstance(value, str) else str(value)

    def int(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(name, f"must be a whole number from {low} to {high}")
        return value

    def float(self, name: str, default: float | None, low: float, high: float) -> float | None:
        value = self.data.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not low <= value <= high
        ):
            raise self.fail(name, f"must be a number from {low} to {high}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, "must be true or false")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(name, default)
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}")
        return value

    def str_list(self, name: str) -> list[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "must be a list of strings")
        return list(value)

    def vars(self, name: str = "vars") -> dict[str, Any]:
        value = self.data.get(name) or {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a mapping of variable names to values")
        for var in value:
            if not isinstance(var, str) or not var.isidentifier():
                raise ConfigurationError(
                    f"{self.path}: invalid variable name '{self.at(name)}.{var}'; "
                    "use letters, digits and '_', not starting with a digit"
                )
            if var in RESERVED_VARS:
                raise ConfigurationError(
                    f"{self.path}: '{self.at(name)}.{var}' is set by Fraisier for each run; "
                    "choose another variable name"
                )
        return dict(value)

    def section(self, name: str, allowed: Iterable[str] | None) -> _Section:
        return _Section(self.path, self.at(name), self.data.get(name), allowed)


# --- the model ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    address: str
    connection: str = "ssh"  # "ssh" or "local"
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    groups: tuple[str, ...] = ()
    vars: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.connection == "local"


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    url: str | None = None
    command: str | None = None
    expect_status: int = 200
    retries: int = 5
    delay: float = 1.0
    timeout: float = 5.0


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "path" or "git"
    path: str | None = None
    repo: str | None = None
    ref: str = "HEAD"
    exclude: tuple[str, ...] = (".git", "__pycache__", "*.pyc")
    # Further folders packed into the same release after ``path``; their files replace files
    # of the same name from earlier folders.
    extra_paths: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """Return every folder of a ``path`` source, in packing order."""
        return (self.path, *self.extra_paths) if self.path else self.extra_paths


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run settings, set in the inventory's ``settings`` and overridden per fraise."""

    database: str | None = None
    pushgateway: str | None = None
    otlp_endpoint: str | None = None
    known_hosts: str | None = None
    host_key_checking: str = "strict"
    forks: int = 50
    serial: tuple[int | str, ...] = ("100%",)
    max_fail_percentage: float = 0.0
    on_failure: str = "rollback"
    connect_timeout: float = 10.0
    keepalive: int = 15
    command_timeout: float = 600.0
    retries: int = 0
    retry_delay: float = 1.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 30.0
    retry_jitter: float = 0.5
    retry_max_elapsed: float = 300.0
    breaker_failure_threshold: int = 3
    breaker_reset_timeout: float = 30.0
    rollback_on_timeout: bool = True
    rollback_on_health_check: bool = True
    rollback_on_step_failure: bool = True
    lock_stale_after: float = 900.0
    recipes_dir: str | None = None
    log_file: str | None = None


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(Settings))
FRAISE_SETTING_KEYS = (
    "serial",
    "max_fail_percentage",
    "on_failure",
    "command_timeout",
    "retries",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "retry_jitter",
    "retry_max_elapsed",
    "rollback_on_timeout",
    "rollback_on_health_check",
    "rollback_on_step_failure",
)


@dataclasses.dataclass(frozen=True)
class Fraise:
    name: str
    type: str
    recipe: str
    # True when the inventory names the recipe; then no file named after the fraise replaces it.
    recipe_set: bool
    hosts: tuple[str, ...]
    deploy_to: str
    source: Source | None
    health_check: HealthCheck | None
    shared: tuple[str, ...]
    keep_releases: int
    settings: Settings
    vars: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Inventory:
    path: Path
    environment: str
    settings: Settings
    vars: dict[str, Any]
    hosts: dict[str, Host]
    groups: dict[str, tuple[str, ...]]
    group_vars: dict[str, dict[str, Any]]
    fraises: dict[str, Fraise]
    raw: dict[str, Any]

    @property
    def project_root(self) -> Path:
        return self.path.resolve().parent.parent

    def fraise(self, name: str) -> Fraise:
        """Return one fraise, or raise ConfigurationError listing the known ones."""
        if name not in self.fraises:
            known = ", ".join(sorted(self.fraises)) or "none"
            raise ConfigurationError(
                f"{self.path}: fraise '{name}' not found in environment '{self.environment}'; "
                f"known fraises: {known}"
            )
        return self.fraises[name]

    def select(self, names: Iterable[str] | None = None) -> list[Fraise]:
        """Return the named fraises, or all of them."""
        if not names:
            return list(self.fraises.values())
        unique = list(dict.fromkeys(names))
        return [self.fraise(n) for n in unique]

    def hosts_for(self, fraise: Fraise, limit: str | None = None) -> list[Host]:
        """Return the fraise's hosts, narrowed by ``--limit`` (comma-separated hosts or groups)."""
        hosts = [self.hosts[name] for name in fraise.hosts]
        if not limit:
            return hosts
        wanted: set[str] = set()
        for item in (part.strip() for part in limit.split(",")):
            if not item:
                continue
            if item in self.hosts:
                wanted.add(item)
            elif item in self.groups:
                wanted.update(self.groups[item])
            else:
                known = ", ".join(sorted([*self.hosts, *self.groups]))
                raise ConfigurationError(
                    f"--limit: '{item}' is neither a host nor a group of environment "
                    f"'{self.environment}' ({self.path}); known: {known}"
                )
        selected = [h for h in hosts if h.name in wanted]
        if not selected:
            raise ConfigurationError(
                f"--limit {limit!r} selects none of the hosts of fraise '{fraise.name}' "
                f"({', '.join(fraise.hosts)})"
            )
        return selected

    def variables(self, fraise: Fraise, host: Host, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """Merge variables for one host and fraise in the documented precedence."""
        merged: dict[str, Any] = dict(defaults)
        layers: list[tuple[str, Mapping[str, Any]]] = [
            ("environment", self.vars),
            (f"fraise {fraise.name}", fraise.vars),
        ]
        layers += [
            (f"group {g}", self.group_vars[g]) for g in self.groups if host.name in self.groups[g]
        ]
        layers.append((f"host {host.name}", host.vars))
        for label, layer in layers:
            if layer:
                log.debug("applying %s vars: %s", label, ", ".join(sorted(layer)))
            merged.update(layer)
        merged.update(
            project_root=str(self.project_root),
            environment=self.environment,
            fraise=fraise.name,
            host=host.name,
            address=host.address,
        )
        return merged


# --- loading -----------------------------------------------------------------------------


def inventory_dir(project_root: Path) -> Path:
    return project_root / "inventories"


def known_environments(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml") if not p.name.startswith("."))


def find_inventory(environment: str, project_root: Path) -> Path:
    """Return the path of ``inventories/<environment>.yaml``, listing known ones if missing."""
    validate_name(environment, "environment name")
    directory = inventory_dir(project_root)
    path = directory / f"{environment}.yaml"
    if not path.is_file():
        known = ", ".join(known_environments(directory)) or "none"
        raise ConfigurationError(
            f"unknown environment '{environment}': {path} not found; known environments: {known}"
        )
    return path


TOP_KEYS = ("environment", "settings", "vars", "hosts", "groups", "fraises")
HOST_KEYS = ("address", "connection", "port", "user", "identity_file", "groups", "vars")
GROUP_KEYS = ("hosts", "vars")
SOURCE_KEYS = ("path", "git", "ref", "exclude")
HEALTH_CHECK_KEYS = ("url", "command", "expect_status", "retries", "delay", "timeout")
FRAISE_KEYS = (
    "type",
    "recipe",
    "hosts",
    "deploy_to",
    "source",
    "health_check",
    "shared",
    "keep_releases",
    "vars",
    *FRAISE_SETTING_KEYS,
)


def load_inventory(path: Path, environment: str | None = None) -> Inventory:
    """Read, validate and return the inventory at ``path``; contacts no host."""
    path = Path(path)
    data = load_yaml(path)
    if data is None:
        raise ConfigurationError(
            f"{path}: the file is empty; define at least 'hosts' and 'fraises'"
        )
    top = _Section(path, "", data, TOP_KEYS)

    # The file names its environment with the key, else by its own name; --env must agree.
    env_name = top.str("environment") or path.stem
    validate_name(env_name, f"environment name in {path}")
    if environment and env_name != environment:
        raise ConfigurationError(
            f"{path}: 'environment' is '{env_name}' but the file was loaded for '{environment}'; "
            "make them match or rename the file"
        )

    settings = _read_settings(top.section("settings", SETTING_KEYS), Settings())
    if settings.known_hosts and not Path(settings.known_hosts).expanduser().is_absolute():
        # Like recipes_dir and a SQLite database, a relative known_hosts is in the project.
        project_root = path.resolve().parent.parent
        settings = dataclasses.replace(
            settings, known_hosts=str(project_root / settings.known_hosts)
        )
    env_vars = top.vars("vars")
    hosts = _read_hosts(top.section("hosts", None), path)
    groups, group_vars = _read_groups(top.section("groups", None), hosts, path)
    fraises = _read_fraises(top.section("fraises", None), path, hosts, groups, settings, env_vars)

    return Inventory(
        path=path,
        environment=env_name,
        settings=settings,
        vars=env_vars,
        hosts=hosts,
        groups=groups,
        group_vars=group_vars,
        fraises=fraises,
        raw=data,
    )


def _read_settings(section: _Section, base: Settings) -> Settings:
    values: dict[str, Any] = {}
    s = section
    for name in (
        "database",
        "pushgateway",
        "otlp_endpoint",
        "known_hosts",
        "recipes_dir",
        "log_file",
    ):
        if name in s.data:
            values[name] = s.str(name)
    if "host_key_checking" in s.data:
        values["host_key_checking"] = s.choice(
            "host_key_checking", "strict", ("strict", "accept-new")
        )
    if "on_failure" in s.data:
        values["on_failure"] = s.choice("on_failure", "rollback", ("rollback", "leave"))
    for name, low, high in (
        ("forks", 1, 1000),
        ("keepalive", 0, 3600),
        ("retries", 0, 20),
        ("breaker_failure_threshold", 1, 1000),
    ):
        if name in s.data:
            values[name] = s.int(name, None, low, high)
    for name, low, high in (
        ("max_fail_percentage", 0, 100),
        # Fabric truncates the connect timeout to whole seconds, and 0 means no timeout at all.
        ("connect_timeout", 1, 600),
        ("command_timeout", 0.1, 86400),
        ("retry_delay", 0, 3600),
        ("retry_backoff", 1, 10),
        ("retry_max_delay", 0, 3600),
        ("retry_jitter", 0, 1),
        ("retry_max_elapsed", 0, 86400),
        ("breaker_reset_timeout", 0, 3600),
        ("lock_stale_after", 1, 7 * 86400),
    ):
        if name in s.data:
            values[name] = s.float(name, None, low, high)
    for name in ("rollback_on_timeout", "rollback_on_health_check", "rollback_on_step_failure"):
        if name in s.data:
            values[name] = s.bool(name, True)
    if "serial" in s.data:
        values["serial"] = _read_serial(s)
    return dataclasses.replace(base, **values)


def _read_serial(section: _Section) -> tuple[int | str, ...]:
    from fraisier.batches import parse_serial

    try:
        return parse_serial(section.data["serial"])
    except ValueError as exc:
        raise section.fail("serial", str(exc)) from None


def _read_hosts(section: _Section, path: Path) -> dict[str, Host]:
    if not section.data:
        raise ConfigurationError(f"{path}: 'hosts' is missing or empty; list at least one host")
    hosts: dict[str, Host] = {}
    for name in section.data:
        try:
            validate_host_name(name)
        except ValidationError as exc:
            raise ConfigurationError(f"{path}: hosts: {exc.message}") from None
        h = section.section(name, HOST_KEYS)
        connection = h.choice("connection", "ssh", ("ssh", "local"))
        address = h.str("address", "127.0.0.1" if connection == "local" else None)
        if not address:
            raise ConfigurationError(
                f"{path}: '{h.at('address')}' is missing; give the host's IP address or DNS name, "
                "or set 'connection: local' for the controller itself"
            )
        _check_address(path, h, address)
        identity = h.str("identity_file")
        if identity is not None:
            resolved = Path(identity).expanduser()
            if not resolved.is_absolute():
                resolved = path.resolve().parent / resolved
            if not resolved.is_file():
                raise ConfigurationError(
                    f"{path}: '{h.at('identity_file')}' {identity!r}: file not found; "
                    "fix the path or remove the key to use ssh-agent and ~/.ssh/config"
                )
            identity = str(resolved)
        hosts[name] = Host(
            name=name,
            address=address,
            connection=connection,
            port=h.int("port", None, 1, 65535),
            user=h.str("user"),
            identity_file=identity,
            groups=tuple(h.str_list("groups")),
            vars=h.vars(),
        )
    return hosts


def _check_address(path: Path, section: _Section, address: str) -> None:
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    labels = address.rstrip(".").split(".")
    if not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
        raise ConfigurationError(
            f"{path}: '{section.at('address')}' {address!r} is neither an IP address nor a "
            "valid DNS name"
        )


def _read_groups(
    section: _Section, hosts: dict[str, Host], path: Path
) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, Any]]]:
    members: dict[str, list[str]] = {}
    group_vars: dict[str, dict[str, Any]] = {}
    for name, _ in section.data.items():
        validate_name(name, f"group name in {path}")
        g = section.section(name, GROUP_KEYS)
        listed = g.str_list("hosts")
        for host in listed:
            if host not in hosts:
                raise ConfigurationError(
                    f"{path}: '{g.at('hosts')}' names host '{host}', which is not under 'hosts'"
                )
        members[name] = listed
        group_vars[name] = g.vars()
    # Hosts may also name their groups themselves.
    for host in hosts.values():
        for group in host.groups:
            if group in hosts:
                raise ConfigurationError(f"{path}: '{group}' is both a host and a group name")
            members.setdefault(group, [])
            group_vars.setdefault(group, {})
            if host.name not in members[group]:
                members[group].append(host.name)
    for group in members:
        if group in hosts:
            raise ConfigurationError(f"{path}: '{group}' is both a host and a group name")
    members["all"] = list(hosts)
    group_vars.setdefault("all", {})
    return {k: tuple(v) for k, v in members.items()}, group_vars


def _read_fraises(
    section: _Section,
    path: Path,
    hosts: dict[str, Host],
    groups: dict[str, tuple[str, ...]],
    settings: Settings,
    env_vars: Mapping[str, Any],
) -> dict[str, Fraise]:
    if not section.data:
        raise ConfigurationError(
            f"{path}: 'fraises' is missing or empty; define at least one fraise"
        )
    fraises: dict[str, Fraise] = {}
    # The environment's vars.keep_releases is every fraise's default, checked once.
    default_keep = _environment_keep_releases(path, env_vars)
    for name in section.data:
        try:
            validate_name(name, "fraise name")
        except ValidationError as exc:
            raise ConfigurationError(f"{path}: fraises: {exc.message}") from None
        f = section.section(name, FRAISE_KEYS)
        ftype = f.choice("type", "api", FRAISE_TYPES)
        recipe = f.str("recipe", ftype) or ftype
        validate_name(recipe, f"recipe name in {path} fraises.{name}.recipe")

        targets: list[str] = []
        for item in f.str_list("hosts") or ["all"]:
            if item in hosts:
                names: tuple[str, ...] = (item,)
            elif item in groups:
                names = groups[item]
            else:
                known = ", ".join(sorted([*hosts, *groups]))
                raise ConfigurationError(
                    f"{path}: '{f.at('hosts')}' names '{item}', which is neither a host nor a "
                    f"group; known: {known}"
                )
            targets += [n for n in names if n not in targets]

        fraise_vars = f.vars()
        deploy_to = f.str("deploy_to") or fraise_vars.get("deploy_to") or env_vars.get("deploy_to")
        if not deploy_to:
            raise ConfigurationError(
                f"{path}: '{f.at('deploy_to')}' is missing; set the directory that holds the "
                "fraise's releases on each host, for example /srv/" + name
            )
        fraise_settings = _read_settings(
            _Section(
                path,
                f.key,
                {k: v for k, v in f.data.items() if k in FRAISE_SETTING_KEYS},
                FRAISE_SETTING_KEYS,
            ),
            settings,
        )
        fraises[name] = Fraise(
            name=name,
            type=ftype,
            recipe=recipe,
            recipe_set="recipe" in f.data,
            hosts=tuple(targets),
            deploy_to=str(deploy_to),
            source=_read_source(f, path),
            health_check=_read_health_check(f),
            shared=tuple(_check_shared(f, p) for p in f.str_list("shared")),
            keep_releases=f.int("keep_releases", default_keep, 1, 1000) or 5,
            settings=fraise_settings,
            vars=fraise_vars,
        )
    return fraises


def _environment_keep_releases(path: Path, env_vars: Mapping[str, Any]) -> int:
    """Return ``vars.keep_releases`` of the environment, checked like the fraise's own key."""
    value = env_vars.get("keep_releases", 5)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ConfigurationError(
            f"{path}: 'vars.keep_releases' must be a whole number from 1 to 1000 (got {value!r})"
        )
    return value


def _check_shared(section: _Section, item: str) -> str:
    parts = Path(item).parts
    if not item or Path(item).is_absolute() or ".." in parts:
        raise ConfigurationError(
            f"{section.path}: '{section.at('shared')}' entry {item!r} must be a relative path "
            "inside the release, without '..'"
        )
    return item


def _read_source(section: _Section, path: Path) -> Source | None:
    s = section.section("source", SOURCE_KEYS)
    if "git" in s.data and "path" in s.data:
        raise ConfigurationError(f"{path}: '{s.key}' has both 'git' and 'path'; keep one")
    if "git" in s.data:
        ref = s.str("ref", "HEAD") or "HEAD"
        try:
            validate_git_ref(ref)
        except ValidationError as exc:
            raise ConfigurationError(f"{path}: '{s.at('ref')}': {exc.message}") from None
        repo = s.str("git")
        if not repo:
            raise ConfigurationError(
                f"{path}: '{s.at('git')}' is empty; give a repository URL or a local path"
            )
        return Source(
            kind="git", repo=_resolve_git_repo(repo, path.resolve().parent.parent), ref=ref
        )
    if not s.data:
        return None
    folders = s.str_list("path")
    if not folders or not all(folders):
        raise ConfigurationError(
            f"{path}: '{s.key}' is missing; set 'source: {{path: DIR}}' for a local directory or "
            "'source: {git: REPO, ref: REF}' for a git repository"
        )
    resolved = []
    for folder in folders:
        local = Path(folder).expanduser()
        resolved.append(str(local if local.is_absolute() else path.resolve().parent.parent / local))
    exclude = tuple(s.str_list("exclude")) or Source.exclude
    return Source(kind="path", path=resolved[0], extra_paths=tuple(resolved[1:]), exclude=exclude)


def _resolve_git_repo(repo: str, project_root: Path) -> str:
    """Return a local repository path relative to the project root; leave URLs as they are.

    A URL has a scheme (``https://``, ``ssh://``, ``file://``) or is scp-like (``host:path``,
    ``user@host:path``), as git reads them.
    """
    if "://" in repo or re.match(r"^[^/]+:", repo):
        return repo
    local = Path(repo).expanduser()
    return str(local if local.is_absolute() else project_root / local)


def _read_health_check(section: _Section) -> HealthCheck | None:
    if section.data.get("health_check") is None:
        return None
    h = section.section("health_check", HEALTH_CHECK_KEYS)
    url, command = h.str("url"), h.str("command")
    if bool(url) == bool(command):
        raise ConfigurationError(
            f"{section.path}: '{h.key}' needs exactly one of 'url' (an HTTP check from the "
            "controller) or 'command' (run on the host)"
        )
    if url and not url.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"{section.path}: '{h.at('url')}' {url!r} must start with http:// or https://"
        )
    return HealthCheck(
        url=url,
        command=command,
        expect_status=h.int("expect_status", 200, 100, 599) or 200,
        retries=h.int("retries", 5, 0, 100) or 0,
        delay=h.float("delay", 1.0, 0, 600) or 0.0,
        timeout=h.float("timeout", 5.0, 0.1, 600) or 5.0,
    )

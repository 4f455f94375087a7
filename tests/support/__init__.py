"""Test hosts, servers and inventory files for the Fraisier integration tests.

``tests/`` has no ``__init__.py``, so pytest puts ``tests/`` on ``sys.path`` when it loads
``tests/conftest.py``, and test modules import this package as ``support``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .services import Prometheus, Pushgateway, check_database, free_port, http_request
from .sshd import SshHost

__all__ = [
    "REPO_ROOT",
    "Prometheus",
    "Pushgateway",
    "SshHost",
    "bind_hosts_to_addresses",
    "build_inventory",
    "check_database",
    "free_port",
    "hello_fraise",
    "http_request",
    "testinfra_host_for",
    "write_inventory",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _merge(defaults: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Update a copy of ``defaults`` with ``overrides``, where a value of None deletes the key."""
    merged = copy.deepcopy(defaults)
    for key, value in (overrides or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_inventory(
    hosts: Sequence[SshHost],
    known_hosts: str | Path,
    database: str,
    fraises: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    vars: dict[str, Any] | None = None,
    environment: str = "test",
) -> dict[str, Any]:
    """Build the inventory dict for ``hosts``: one entry per host and a group ``web`` of all.

    ``fraises``, ``settings`` and ``vars`` update the defaults key by key. A value of None
    removes a default key, so ``fraises={"hello": None}`` drops the default fraise.
    """
    if not hosts:
        raise ValueError("an inventory needs at least one SshHost; got an empty list")
    names = [host.name for host in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"inventory host names must be distinct; got {names}")

    host_entries = {
        host.name: {
            "address": host.address,
            "port": host.port,
            "user": host.user,
            "identity_file": host.identity_file,
            "vars": {"deploy_root": host.deploy_root},
        }
        for host in hosts
    }
    default_settings = {
        "known_hosts": str(known_hosts),
        "host_key_checking": "strict",
        "database": database,
    }
    default_fraises = {
        "hello": {
            "type": "api",
            "hosts": ["web"],
            "deploy_to": "{{ deploy_root }}/hello",
            "source": {"path": str(REPO_ROOT / "examples" / "hello")},
        }
    }
    return {
        "environment": environment,
        "settings": _merge(default_settings, settings),
        "vars": _merge({"keep_releases": 5}, vars),
        "hosts": host_entries,
        "groups": {"web": {"hosts": names}},
        "fraises": _merge(default_fraises, fraises),
    }


def write_inventory(
    directory: str | Path,
    hosts: Sequence[SshHost],
    fraises: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    vars: dict[str, Any] | None = None,
    path: str | Path | None = None,
    environment: str = "test",
) -> Path:
    """Write the inventory of ``hosts`` as YAML and return its path.

    Without ``path`` the file is ``DIRECTORY/inventories/ENVIRONMENT.yaml``. The known_hosts
    file with every host's key and the SQLite run database go into ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    known_hosts = directory / "known_hosts"
    known_hosts.write_text("".join(f"{host.known_hosts_line}\n" for host in hosts))
    # An absolute path gives four slashes: sqlite:// plus /tmp/...
    database = f"sqlite:///{directory / 'runs.db'}"
    inventory = build_inventory(
        hosts, known_hosts, database, fraises, settings, vars, environment=environment
    )
    target = Path(path) if path is not None else directory / "inventories" / f"{environment}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return target


def hello_fraise(health_retries: int, health_delay: float, **extra: Any) -> dict[str, Any]:
    """Return the inventory entry of the example service on the ``web`` group of test hosts.

    ``extra`` keys replace or add keys of the entry, such as ``recipe`` or ``source``.
    """
    return {
        "type": "api",
        "hosts": ["web"],
        "deploy_to": "{{ deploy_root }}/hello",
        "source": {"path": str(REPO_ROOT / "examples" / "hello")},
        "health_check": {
            "url": "http://{{ bind }}:{{ port }}/health",
            "retries": health_retries,
            "delay": health_delay,
            "timeout": 2,
        },
        **extra,
    }


def bind_hosts_to_addresses(
    path: Path, hosts: Sequence[SshHost], host_updates: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Set each host's ``bind`` variable to its own address in the inventory at ``path``.

    The test hosts share one machine, so each host's service binds its own loopback address
    and all of them use the same port. ``host_updates`` updates host entries by name. Returns
    the inventory as written.
    """
    data = yaml.safe_load(path.read_text())
    for host in hosts:
        data["hosts"][host.name]["vars"]["bind"] = host.address
        data["hosts"][host.name].update((host_updates or {}).get(host.name, {}))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def testinfra_host_for(ssh_host: SshHost, timeout: int = 10) -> Any:
    """Return a testinfra host for ``ssh_host`` whose paramiko client checks its host key.

    testinfra 10's paramiko backend accepts any host key (WarningPolicy) and reads no
    known_hosts file, so this function connects a strict client itself and gives it to the
    backend. NOTE: if that connection drops, testinfra reconnects with its own client, which
    accepts any host key.
    """
    import testinfra

    host = testinfra.get_host(
        f"paramiko://{ssh_host.user}@{ssh_host.address}:{ssh_host.port}",
        ssh_identity_file=ssh_host.identity_file,
        timeout=timeout,
    )
    backend = host.backend
    # ``client`` is a functools.cached_property, so an instance attribute replaces it.
    # get_host() caches hosts by address and port, so a cached host gets a fresh client.
    old_client = backend.__dict__.pop("client", None)
    if old_client is not None:
        old_client.close()
    backend.client = ssh_host.paramiko_client(timeout=timeout)
    return host

"""Tests of the test infrastructure: sshd hosts, inventories, monitoring servers, databases."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import paramiko
import pytest
import yaml
from support import Prometheus, Pushgateway, SshHost, check_database, free_port, http_request
from support.sshd import DEPLOY_ROOT_BASE, SUDOERS_DIR


def _run_ssh(host: SshHost, command: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        host.ssh_args(command), capture_output=True, text=True, timeout=timeout, check=False
    )


def _port_refuses(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.ssh
def test_three_hosts_have_distinct_addresses(ssh_hosts3: list[SshHost]) -> None:
    addresses = {host.address for host in ssh_hosts3}
    users = {host.user for host in ssh_hosts3}

    assert len(addresses) == 3
    assert len(users) == 3
    for host in ssh_hosts3:
        assert host.address.startswith("127.0.0.")
        assert host.address != "127.0.0.1"
        assert host.user == f"fr-{host.name}"
        assert host.running


@pytest.mark.ssh
def test_openssh_client_runs_command(ssh_hosts3: list[SshHost]) -> None:
    for host in ssh_hosts3:
        result = _run_ssh(host, "id -un; pwd")

        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == host.user
        assert lines[1] == f"/home/{host.user}"


@pytest.mark.ssh
def test_deploy_root_owned_by_user(ssh_host: SshHost) -> None:
    result = _run_ssh(
        ssh_host, f"stat -c %U {ssh_host.deploy_root}; touch {ssh_host.deploy_root}/x"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ssh_host.user
    assert Path(ssh_host.deploy_root, "x").exists()


# pytest runs tests in file order, so the second test sees the file the first one wrote
# unless the ssh_hosts3 fixture wipes the deploy root in between.
@pytest.mark.ssh
def test_deploy_root_dirtied_by_test(ssh_host: SshHost) -> None:
    Path(ssh_host.deploy_root, "left-over").write_text("from an earlier test")

    assert Path(ssh_host.deploy_root, "left-over").exists()


@pytest.mark.ssh
def test_deploy_root_empty_in_next_test(ssh_host: SshHost) -> None:
    assert list(Path(ssh_host.deploy_root).iterdir()) == []


@pytest.mark.ssh
def test_reset_cleans_stopped_frozen_host(ssh_host: SshHost) -> None:
    Path(ssh_host.deploy_root, "left-over").write_text("x")
    result = _run_ssh(ssh_host, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo started")
    assert result.stdout.strip() == "started"
    client = ssh_host.paramiko_client()
    ssh_host.freeze()
    ssh_host.stop()

    ssh_host.reset()

    client.close()
    assert ssh_host.running
    assert list(Path(ssh_host.deploy_root).iterdir()) == []
    assert ssh_host.user_pids() == set()
    assert _run_ssh(ssh_host, "true").returncode == 0


@pytest.mark.ssh
def test_paramiko_connects_with_known_hosts(ssh_host: SshHost) -> None:
    client = ssh_host.paramiko_client()
    try:
        _, stdout, _ = client.exec_command("id -un", timeout=10)
        output = stdout.read().decode().strip()
    finally:
        client.close()

    assert output == ssh_host.user


@pytest.mark.ssh
def test_paramiko_rejects_changed_host_key(ssh_host: SshHost) -> None:
    wrong = ssh_host.wrong_known_hosts()

    assert Path(wrong).read_text() != Path(ssh_host.known_hosts).read_text()
    with pytest.raises(paramiko.BadHostKeyException):
        ssh_host.paramiko_client(known_hosts=wrong)


@pytest.mark.ssh
def test_openssh_rejects_changed_host_key(ssh_host: SshHost) -> None:
    args = ssh_host.ssh_args("true", known_hosts=ssh_host.wrong_known_hosts())
    result = subprocess.run(args, capture_output=True, text=True, timeout=15, check=False)

    assert result.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in result.stderr


@pytest.mark.ssh
def test_sudo_without_password(ssh_host: SshHost) -> None:
    result = _run_ssh(ssh_host, "sudo -n true && sudo -n id -u")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


@pytest.mark.ssh
def test_fabric_uses_connect_kwargs(ssh_host: SshHost) -> None:
    import fabric

    connection = fabric.Connection(
        ssh_host.address,
        user=ssh_host.user,
        port=ssh_host.port,
        connect_kwargs=ssh_host.connect_kwargs(),
    )
    connection.client.load_host_keys(ssh_host.known_hosts)
    connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        result = connection.run("echo hello", hide=True, timeout=10, in_stream=False)
        target = f"{ssh_host.deploy_root}/uploaded"
        connection.put(__file__, target)
    finally:
        connection.close()

    assert result.stdout.strip() == "hello"
    assert Path(target).read_text() == Path(__file__).read_text()


@pytest.mark.ssh
def test_testinfra_host_runs_checks(ssh_host: SshHost, testinfra_host) -> None:
    host = testinfra_host(ssh_host)

    assert host.user().name == ssh_host.user
    assert host.file(ssh_host.deploy_root).is_directory
    assert host.file(ssh_host.deploy_root).user == ssh_host.user
    assert host.run("id -un").stdout.strip() == ssh_host.user


@pytest.mark.ssh
def test_stop_closes_port_and_processes(ssh_host_factory) -> None:
    (host,) = ssh_host_factory(1)
    client = host.paramiko_client()
    client.exec_command("sleep 60")
    time.sleep(0.3)
    assert host.session_pids()

    host.stop()
    host.stop()  # stop() is idempotent

    assert not host.running
    assert _port_refuses(host.address, host.port)
    assert host.session_pids() == set()
    assert host.user_pids() == set()
    client.close()


@pytest.mark.ssh
def test_restart_keeps_port_and_files(ssh_host_factory) -> None:
    (host,) = ssh_host_factory(1)
    port = host.port
    Path(host.deploy_root, "release").write_text("kept")

    host.restart()

    assert host.port == port
    assert _run_ssh(host, "cat " + host.deploy_root + "/release").stdout == "kept"


@pytest.mark.ssh
def test_kill_ends_every_host_process(ssh_host_factory) -> None:
    (host,) = ssh_host_factory(1)
    # A daemon started with setsid leaves the session tree, so only the uid finds it.
    result = _run_ssh(host, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo started")
    assert result.stdout.strip() == "started"
    assert host.user_pids()

    host.kill()

    assert _port_refuses(host.address, host.port)
    assert host.user_pids() == set()


@pytest.mark.ssh
def test_freeze_hangs_command_until_thaw(ssh_host: SshHost) -> None:
    client = ssh_host.paramiko_client()
    try:
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_session(timeout=10)
        channel.exec_command("read line; echo got $line")
        frozen = ssh_host.freeze()
        assert frozen

        channel.sendall(b"x\n")
        channel.settimeout(1.5)
        with pytest.raises(TimeoutError):
            channel.recv(100)
        with pytest.raises(paramiko.SSHException, match="Timeout opening channel"):
            transport.open_session(timeout=1.5)

        ssh_host.thaw()
        channel.settimeout(10)
        assert channel.recv(100).strip() == b"got x"
        assert channel.recv_exit_status() == 0
    finally:
        ssh_host.thaw()
        client.close()


@pytest.mark.ssh
def test_frozen_listener_hangs_new_connection(ssh_host: SshHost) -> None:
    ssh_host.freeze(listener=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _run_ssh(ssh_host, "true", timeout=2.0)
    finally:
        ssh_host.thaw()

    assert _run_ssh(ssh_host, "true").returncode == 0


@pytest.mark.ssh
def test_close_removes_sudoers_and_deploy_root(ssh_host_factory) -> None:
    (host,) = ssh_host_factory(1)
    sudoers = SUDOERS_DIR / f"fraisier-test-{host.user}"
    deploy_root = Path(host.deploy_root)
    assert sudoers.exists()
    assert deploy_root.is_dir()

    host.close()

    assert not sudoers.exists()
    assert not deploy_root.exists()
    assert deploy_root.parent == DEPLOY_ROOT_BASE


@pytest.mark.ssh
def test_start_failure_reports_sshd_output(ssh_host_factory) -> None:
    (host,) = ssh_host_factory(1)
    host.stop()
    with open(Path(host.workdir, "sshd_config"), "a") as config:
        config.write("NoSuchOption yes\n")

    with pytest.raises(RuntimeError, match="NoSuchOption"):
        host.start()
    assert not host.running


@pytest.mark.ssh
def test_address_taken_by_live_host_is_rejected(ssh_host: SshHost) -> None:
    with pytest.raises(RuntimeError, match="in use by another SshHost"):
        SshHost(address=ssh_host.address).start()


@pytest.mark.ssh
def test_inventory_for_writes_shape(ssh_hosts3: list[SshHost], inventory_for) -> None:
    path = inventory_for(
        ssh_hosts3,
        fraises={"worker": {"type": "etl", "hosts": ["web"], "deploy_to": "/x"}},
        settings={"host_key_checking": "accept-new"},
        vars={"keep_releases": 2},
    )
    inventory = yaml.safe_load(path.read_text())

    assert path.name == "test.yaml"
    assert inventory["environment"] == "test"
    assert inventory["settings"]["host_key_checking"] == "accept-new"
    assert inventory["settings"]["database"].startswith("sqlite:////")
    assert inventory["vars"] == {"keep_releases": 2}
    assert set(inventory["fraises"]) == {"hello", "worker"}
    assert inventory["groups"]["web"]["hosts"] == [host.name for host in ssh_hosts3]
    known_hosts = Path(inventory["settings"]["known_hosts"]).read_text().splitlines()
    assert known_hosts == [host.known_hosts_line for host in ssh_hosts3]
    for host in ssh_hosts3:
        entry = inventory["hosts"][host.name]
        assert entry["address"] == host.address
        assert entry["port"] == host.port
        assert entry["user"] == host.user
        assert entry["identity_file"] == host.identity_file
        assert entry["vars"]["deploy_root"] == host.deploy_root


@pytest.mark.ssh
def test_inventory_for_none_drops_default(ssh_hosts3: list[SshHost], inventory_for) -> None:
    path = inventory_for(ssh_hosts3[:1], fraises={"hello": None})

    assert yaml.safe_load(path.read_text())["fraises"] == {}


@pytest.mark.monitoring
def test_prometheus_scrapes_pushed_metric(pushgateway: Pushgateway, prometheus: Prometheus) -> None:
    body = b'fraisier_support_check{fraise="hello"} 42\n'
    status, _ = http_request(
        f"{pushgateway.url}/metrics/job/support/environment/test", method="PUT", data=body
    )
    assert status == 200
    assert "fraisier_support_check" in pushgateway.metrics_text()

    result = prometheus.wait_for('fraisier_support_check{job="support"}', timeout=20)

    assert result[0]["value"][1] == "42"
    assert result[0]["metric"]["environment"] == "test"
    assert result[0]["metric"]["fraise"] == "hello"


@pytest.mark.monitoring
def test_prometheus_fires_rule_file_alert(pushgateway: Pushgateway, tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "support",
                "rules": [{"alert": "SupportCheckHigh", "expr": "fraisier_support_alert > 1"}],
            }
        ]
    }
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules))
    http_request(
        f"{pushgateway.url}/metrics/job/support", method="PUT", data=b"fraisier_support_alert 5\n"
    )

    with Prometheus(pushgateway, rule_files=[rule_file]) as server:
        deadline = time.monotonic() + 20
        while not server.alerts() and time.monotonic() < deadline:
            time.sleep(0.25)
        alerts = server.alerts()
        groups = server.rule_groups()

    assert [alert["labels"]["alertname"] for alert in alerts] == ["SupportCheckHigh"]
    assert alerts[0]["state"] == "firing"
    assert groups[0]["rules"][0]["health"] == "ok"


@pytest.mark.monitoring
def test_pushgateway_wipe_deletes_groups(pushgateway: Pushgateway) -> None:
    http_request(f"{pushgateway.url}/metrics/job/a", method="PUT", data=b"x 1\n")
    assert any(group["labels"].get("job") == "a" for group in pushgateway.groups())

    pushgateway.wipe()

    assert pushgateway.groups() == []


@pytest.mark.monitoring
@pytest.mark.parametrize("persistence", [False, True])
def test_pushgateway_restart_persistence(persistence: bool) -> None:
    with Pushgateway(persistence=persistence) as server:
        port = server.port
        http_request(f"{server.url}/metrics/job/kept", method="PUT", data=b"x 1\n")

        server.restart()

        assert server.port == port
        jobs = [group["labels"].get("job") for group in server.groups()]
        assert ("kept" in jobs) is persistence


@pytest.mark.monitoring
def test_prometheus_wait_for_times_out(prometheus: Prometheus) -> None:
    with pytest.raises(TimeoutError, match="no_such_metric"):
        prometheus.wait_for("no_such_metric", timeout=1)


@pytest.mark.database
def test_database_urls_reach_servers(postgres_url: str, mysql_url: str) -> None:
    assert urllib.parse.urlsplit(postgres_url).hostname == "127.0.0.1"
    assert urllib.parse.urlsplit(mysql_url).hostname == "127.0.0.1"


@pytest.mark.parametrize("scheme", ["postgresql://postgres", "mysql://root"])
def test_check_database_names_closed_port(scheme: str) -> None:
    port = free_port()

    with pytest.raises(RuntimeError, match=f"cannot connect to .* at 127.0.0.1:{port}"):
        check_database(f"{scheme}@127.0.0.1:{port}/test")

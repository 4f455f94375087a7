"""The cron and CI job scripts of ``examples/cron`` and ``examples/ci`` against real test hosts.

Each test runs a script from a sandbox, as cron or a CI runner would. It checks the exit
status and output, the releases on the sshd test hosts, and that no secret placed in the
environment reaches the output or the log. The GitHub Actions and GitLab CI files cannot run
here: their test only parses them and checks that they call deploy.sh with one deploy of an
environment at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from docs_helpers import BLOCK_TIMEOUT, Sandbox, load_doc_yaml
from support import REPO_ROOT, SshHost

from fraisier.db import resolve_database_url
from fraisier.db.sqlite import SQLiteRunStore
from fraisier.db.url import parse_database_url

pytestmark = [pytest.mark.ssh, pytest.mark.monitoring, pytest.mark.timeout(600)]

DATABASE_PASSWORD = "db-pw-5f1c9e7a"
API_TOKEN = "api-token-93b2d4e6"
GIT_USER = ["-c", "user.name=CI test", "-c", "user.email=ci@example.invalid"]


def releases(host: SshHost) -> list[str]:
    folder = Path(host.deploy_root) / "hello" / "releases"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def current_release(host: SshHost) -> str | None:
    link = Path(host.deploy_root) / "hello" / "current"
    return link.resolve().name if link.is_symlink() else None


def deployed_revision(host: SshHost) -> str:
    return (Path(host.deploy_root) / "hello" / "current" / "REVISION").read_text().strip()


@contextlib.contextmanager
def hold_database_lock(project: Path, environment: str, fraise: str) -> Iterator[Path]:
    """Hold the deploy lock that a run of ``fraise`` takes in the project's SQLite database."""
    inventory = load_doc_yaml((project / "inventories" / f"{environment}.yaml").read_text())
    url = resolve_database_url(inventory["settings"]["database"], project)
    path = SQLiteRunStore(parse_database_url(url)).lock_path(environment, fraise)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        os.close(fd)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert DATABASE_PASSWORD not in text
        assert API_TOKEN not in text


# --- cron -----------------------------------------------------------------------------------

CRON = "examples/cron"


@pytest.fixture
def cron_env(sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """Return the variables of a cron job whose secrets come from an environment file.

    The sandbox's inventory gets a variable read with ``!env``, so the token is a secret of
    the run as well as a variable of the environment.
    """
    inventory = sandbox.root / CRON / "inventories" / "prod.yaml"
    text = inventory.read_text()
    assert text.count("\nvars:\n") == 1
    inventory.write_text(text.replace("\nvars:\n", "\nvars:\n  api_token: !env HELLO_API_TOKEN\n"))
    env_file = tmp_path / "prod.env"
    env_file.write_text(
        f"FRAISIER_DATABASE_PASSWORD={DATABASE_PASSWORD}\nHELLO_API_TOKEN={API_TOKEN}\n"
    )
    env_file.chmod(0o600)
    return {"DEPLOY_ENV_FILE": str(env_file)}


def run_cron(
    sandbox: Sandbox, env: dict[str, str], cwd: str = "/"
) -> subprocess.CompletedProcess[str]:
    # cron starts jobs in the user's home folder; the script must not depend on the cwd.
    return subprocess.run(
        [str(sandbox.root / CRON / "deploy-scheduled.sh"), "prod"],
        cwd=cwd,
        env={**sandbox.environment(False), **env},
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )


def cron_log(sandbox: Sandbox) -> str:
    return (sandbox.root / CRON / "var" / "log" / "deploy-prod.log").read_text()


def test_cron_success_is_quiet(
    sandbox: Sandbox, cron_env: dict[str, str], ssh_hosts3: list[SshHost]
) -> None:
    done = run_cron(sandbox, cron_env)

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""
    for host in ssh_hosts3[:2]:
        assert len(releases(host)) == 1
        assert current_release(host) == releases(host)[0]
    records = [json.loads(line) for line in cron_log(sandbox).splitlines()]
    assert any(r.get("event") == "host_end" and r.get("status") == "success" for r in records)
    assert_no_secret(done.stdout, done.stderr, cron_log(sandbox))


def test_cron_lock_held_is_quiet(
    sandbox: Sandbox, cron_env: dict[str, str], ssh_hosts3: list[SshHost]
) -> None:
    with hold_database_lock(sandbox.root / CRON, "prod", "hello"):
        direct = sandbox.shell(
            "fraisier deploy --env prod",
            cwd=CRON,
            env={"HELLO_API_TOKEN": API_TOKEN},
        )
        done = run_cron(sandbox, cron_env)

    assert direct.returncode == 4, direct.stderr  # the case the script handles
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""
    assert [releases(h) for h in ssh_hosts3[:2]] == [[], []]


def test_cron_config_error_alerts(
    sandbox: Sandbox, cron_env: dict[str, str], ssh_hosts3: list[SshHost]
) -> None:
    inventory = sandbox.root / CRON / "inventories" / "prod.yaml"
    inventory.write_text(inventory.read_text() + "colour: red\n")

    done = run_cron(sandbox, cron_env)

    assert done.returncode == 2
    assert done.stdout == ""
    assert "ALERT: deploy of prod not started: configuration error (exit 2)" in done.stderr
    assert "colour" in done.stderr  # Fraisier's message names the invalid key
    assert [releases(h) for h in ssh_hosts3[:2]] == [[], []]
    assert_no_secret(done.stdout, done.stderr)


def test_cron_health_failure_alerts(
    sandbox: Sandbox, cron_env: dict[str, str], ssh_hosts3: list[SshHost]
) -> None:
    web1, web2 = ssh_hosts3[:2]
    assert run_cron(sandbox, cron_env).returncode == 0
    good = current_release(web1)
    (sandbox.root / "examples" / "hello" / "UNHEALTHY").touch()
    alert_file = sandbox.root / "alert.txt"
    env = {**cron_env, "ALERT_COMMAND": f"cat > {alert_file}"}

    done = run_cron(sandbox, env)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == ""  # the alert went to ALERT_COMMAND
    alert = alert_file.read_text()
    assert alert.startswith("ALERT: deploy of prod failed (exit 1).")
    assert "rolled_back" in alert
    assert "web1" in alert
    assert str(sandbox.root / CRON / "var" / "log" / "deploy-prod.log") in alert
    assert current_release(web1) == current_release(web2) == good
    assert len(releases(web1)) == 2
    assert_no_secret(done.stdout, done.stderr, alert, cron_log(sandbox))


def test_cron_sigterm_is_forwarded(
    sandbox: Sandbox, cron_env: dict[str, str], ssh_hosts3: list[SshHost]
) -> None:
    web1 = ssh_hosts3[0]
    assert run_cron(sandbox, cron_env).returncode == 0
    good = current_release(web1)
    # A failing health check keeps the run busy for a few seconds after the switch.
    (sandbox.root / "examples" / "hello" / "UNHEALTHY").touch()
    job = subprocess.Popen(
        [str(sandbox.root / CRON / "deploy-scheduled.sh"), "prod"],
        env={**sandbox.environment(False), **cron_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while current_release(web1) == good and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current_release(web1) != good, "the run never switched web1"

    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)

    assert job.returncode == 143, stderr
    assert "ALERT: deploy of prod was interrupted (exit 143)." in stderr
    assert current_release(web1) == good
    assert_no_secret(stdout, stderr)


def test_crontab_line_skips_overlap(sandbox: Sandbox, cron_env: dict[str, str]) -> None:
    lines = (sandbox.root / CRON / "crontab").read_text().splitlines()
    jobs = [line for line in lines if line and not line.startswith("#") and "=" not in line]
    assert len(jobs) == 1
    command = jobs[0].split(None, 5)[5]
    assert command.startswith("flock -n -E 0 ")
    assert command.endswith("/examples/cron/deploy-scheduled.sh prod")
    lock = sandbox.root / "cron.lock"
    # The line's own command, with this sandbox's paths in place of /srv/fraisier and /tmp.
    command = command.replace("/tmp/fraisier-deploy-prod.lock", str(lock)).replace(
        "/srv/fraisier", str(sandbox.root)
    )
    log = sandbox.root / CRON / "var" / "log" / "deploy-prod.log"
    env = {**sandbox.environment(False), **cron_env}

    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        skipped = subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, check=False
        )
    assert skipped.returncode == 0
    assert skipped.stdout + skipped.stderr == ""
    assert not log.exists()

    ran = subprocess.run(
        ["sh", "-c", command], env=env, capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert log.exists()


# --- CI -------------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *GIT_USER, *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


class ServiceRepository:
    """A git repository of the service, as on a git server, and a CI job's clone of it.

    It contains the example service's app.py and the files of ``examples/ci`` at its root,
    with the sandbox's bound inventory, whose source is the clone that deploy.sh runs in.
    """

    def __init__(self, sandbox: Sandbox, root: Path) -> None:
        self.sandbox = sandbox
        self.origin = root / "hello.git"
        self.checkout = root / "ci-job"
        self.origin.mkdir(parents=True)
        git(self.origin, "init", "--quiet", "-b", "main")
        shutil.copy2(sandbox.root / "examples" / "hello" / "app.py", self.origin)
        shutil.copytree(sandbox.root / "examples" / "ci", self.origin, dirs_exist_ok=True)
        (self.origin / ".gitignore").write_text("var/\ndeploy.json\n")
        self.commit("Add the service")
        git(root, "clone", "--quiet", str(self.origin), str(self.checkout))

    def commit(self, message: str) -> str:
        git(self.origin, "add", "--all")
        git(self.origin, "commit", "--quiet", "-m", message)
        return git(self.origin, "rev-parse", "HEAD")

    def run_job(
        self, commit: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run deploy.sh in the job's clone, after fetching the pushed commits."""
        git(self.checkout, "fetch", "--quiet", "origin")
        return subprocess.run(
            ["./deploy.sh", "prod", commit],
            cwd=self.checkout,
            env={**self.sandbox.environment(False), **(env or {})},
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )

    def result(self) -> list[dict[str, Any]]:
        return json.loads((self.checkout / "deploy.json").read_text())


@pytest.fixture
def repository(sandbox: Sandbox, tmp_path: Path) -> ServiceRepository:
    return ServiceRepository(sandbox, tmp_path / "git")


def test_ci_deploys_the_merged_commit(
    repository: ServiceRepository, ssh_hosts3: list[SshHost]
) -> None:
    hosts = ssh_hosts3[:2]
    first = git(repository.origin, "rev-parse", "HEAD")
    (repository.origin / "CHANGES").write_text("second release\n")
    second = repository.commit("Describe the second release")
    secrets = {"FRAISIER_DATABASE_PASSWORD": DATABASE_PASSWORD}

    for number, commit in enumerate((second, first), start=1):
        done = repository.run_job(commit, secrets)

        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"deployed {commit} to prod\n")
        assert git(repository.checkout, "rev-parse", "HEAD") == commit
        assert repository.result()[0]["status"] == "success"
        for host in hosts:
            assert deployed_revision(host) == commit
            assert len(releases(host)) == number
        assert_no_secret(
            done.stdout, done.stderr, (repository.checkout / "deploy.json").read_text()
        )

    # The second job deployed the first commit, which has no CHANGES file.
    assert not (Path(hosts[0].deploy_root) / "hello" / "current" / "CHANGES").exists()


def test_ci_health_failure_fails_job(
    repository: ServiceRepository, ssh_hosts3: list[SshHost]
) -> None:
    web1 = ssh_hosts3[0]
    good_commit = git(repository.origin, "rev-parse", "HEAD")
    assert repository.run_job(good_commit).returncode == 0
    good = current_release(web1)
    (repository.origin / "UNHEALTHY").touch()
    bad_commit = repository.commit("Break the health check")

    done = repository.run_job(bad_commit)

    assert done.returncode == 1
    assert f"error: deploy of {bad_commit} to prod failed (exit 1)" in done.stderr
    assert "hello web1: rolled_back" in done.stderr
    assert repository.result()[0]["status"] == "rolled_back"
    assert current_release(web1) == good
    assert deployed_revision(web1) == good_commit


def test_ci_config_error_fails_job(
    repository: ServiceRepository, ssh_hosts3: list[SshHost]
) -> None:
    inventory = repository.origin / "inventories" / "prod.yaml"
    inventory.write_text(inventory.read_text() + "colour: red\n")
    commit = repository.commit("Break the inventory")

    done = repository.run_job(commit)

    assert done.returncode == 2
    assert "configuration error (exit 2); fix the inventory or recipe" in done.stderr
    assert [releases(h) for h in ssh_hosts3[:2]] == [[], []]


def test_ci_unknown_commit_fails_job(repository: ServiceRepository) -> None:
    done = repository.run_job("0" * 40)

    assert done.returncode == 2
    assert "cannot check out 0000000000000000000000000000000000000000" in done.stderr


def test_ci_lock_held_fails_job(repository: ServiceRepository, ssh_hosts3: list[SshHost]) -> None:
    commit = git(repository.origin, "rev-parse", "HEAD")
    git(repository.checkout, "checkout", "--quiet", "--detach", commit)

    with hold_database_lock(repository.checkout, "prod", "hello"):
        started = time.monotonic()
        done = repository.run_job(commit, {"DEPLOY_WAIT_LOCK": "2"})
        waited = time.monotonic() - started

    assert done.returncode == 4
    assert "another run held the deploy lock of prod for more than 2s (exit 4)" in done.stderr
    assert "re-run this job" in done.stderr
    assert waited >= 2
    assert [releases(h) for h in ssh_hosts3[:2]] == [[], []]


# --- CI configuration files -----------------------------------------------------------------


def test_github_workflow_calls_deploy_script() -> None:
    workflow = yaml.safe_load((REPO_ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    # YAML 1.1 reads the key "on" as the boolean true.
    trigger = workflow.get("on", workflow.get(True))
    steps = workflow["jobs"]["deploy"]["steps"]
    runs = [step.get("run", "") for step in steps]

    assert trigger == {"push": {"branches": ["main"]}}
    assert workflow["concurrency"] == {"group": "deploy-prod", "cancel-in-progress": False}
    assert 'examples/ci/deploy.sh prod "$GITHUB_SHA"' in runs
    # Secrets reach the commands only through env, never written into a command line.
    assert all("secrets." not in run for run in runs)
    assert not any("set -x" in run or "echo $" in run for run in runs)


def test_gitlab_job_calls_deploy_script() -> None:
    pipeline = yaml.safe_load((REPO_ROOT / "examples" / "ci" / "gitlab-ci.yml").read_text())
    job = pipeline["deploy-prod"]
    commands = job["before_script"] + job["script"]

    assert job["resource_group"] == "prod"
    assert job["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "push" && $CI_COMMIT_BRANCH == "main"'}]
    assert job["script"] == ['examples/ci/deploy.sh prod "$CI_COMMIT_SHA"']
    assert not any("set -x" in c or "echo $" in c for c in commands)


def test_cron_env_file_read_as_data(sandbox: Sandbox, tmp_path: Path) -> None:
    token = 'it\'s a $secret `id` "quoted" value'
    env_file = tmp_path / "prod.env"
    env_file.write_text(f"# secrets of prod\n\nHELLO_API_TOKEN={token}\n")
    seen = tmp_path / "seen"
    # A stand-in for fraisier that records the variable it was given, then succeeds.
    fake = tmp_path / "fake-fraisier"
    fake.write_text(f'#!/bin/sh\nprintf %s "$HELLO_API_TOKEN" > {seen}\n')
    fake.chmod(0o755)

    done = run_cron(sandbox, {"DEPLOY_ENV_FILE": str(env_file), "FRAISIER": str(fake)})

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert seen.read_text() == token


def test_cron_env_file_errors_exit_2(sandbox: Sandbox, tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("export HELLO_API_TOKEN=s3cr3t-value\n")
    readonly = tmp_path / "readonly.env"
    readonly.write_text("# bash's own\nUID=5\n")

    missing = run_cron(sandbox, {"DEPLOY_ENV_FILE": str(tmp_path / "nope.env")})
    folder = run_cron(sandbox, {"DEPLOY_ENV_FILE": str(tmp_path)})
    malformed = run_cron(sandbox, {"DEPLOY_ENV_FILE": str(bad)})
    read_only = run_cron(sandbox, {"DEPLOY_ENV_FILE": str(readonly)})

    assert missing.returncode == 2
    assert "is missing or not readable" in missing.stderr
    assert folder.returncode == 2
    assert "is missing or not readable" in folder.stderr
    assert malformed.returncode == 2
    assert "line 1 is not NAME=value" in malformed.stderr
    assert "s3cr3t-value" not in malformed.stderr
    assert read_only.returncode == 2
    assert "line 2 sets a read-only variable" in read_only.stderr


def test_cron_env_file_crlf_and_project(sandbox: Sandbox, tmp_path: Path) -> None:
    env_file = tmp_path / "prod.env"
    env_file.write_bytes(
        f"HELLO_API_TOKEN=abc\r\nFRAISIER_PROJECT={sandbox.root / CRON}\r\n".encode()
    )
    seen = tmp_path / "seen"
    fake = tmp_path / "fake-fraisier"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s|%s|%s" "$HELLO_API_TOKEN" "$FRAISIER_PROJECT" "$PWD" > {seen}\n'
    )
    fake.chmod(0o755)

    done = run_cron(
        sandbox,
        {
            "DEPLOY_ENV_FILE": str(env_file),
            "FRAISIER": str(fake),
            "FRAISIER_PROJECT": "/nonexistent",
        },
    )

    assert done.returncode == 0, done.stderr
    project = str(sandbox.root / CRON)
    assert seen.read_text() == f"abc|{project}|{project}"


def test_cron_usage_and_relative_project(sandbox: Sandbox, cron_env: dict[str, str]) -> None:
    no_argument = subprocess.run(
        [str(sandbox.root / CRON / "deploy-scheduled.sh")],
        env=sandbox.environment(False),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    relative = run_cron(sandbox, {**cron_env, "FRAISIER_PROJECT": CRON}, cwd=str(sandbox.root))

    assert no_argument.returncode == 2
    assert "usage: deploy-scheduled.sh ENV" in no_argument.stderr
    assert relative.returncode == 0, relative.stderr
    assert not (sandbox.root / CRON / CRON).exists()


def _exiting_fraisier(directory: Path, code: int) -> Path:
    """Write a stand-in for fraisier that prints an empty summary and exits with ``code``.

    The fault and database tests produce a real failed rollback (3) and a failed database task
    (5). Here only the scripts' handling of the codes is under test.
    """
    stub = directory / f"fraisier-exit-{code}"
    stub.write_text(f"#!/bin/sh\necho '[]'\nexit {code}\n")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize(
    ("code", "channel", "expected"),
    [
        (3, "page", "PAGE: rollback failed during the deploy of prod (exit 3)"),
        (5, "alert", "ALERT: deploy of prod failed on the run database (exit 5)"),
        (143, "alert", "ALERT: deploy of prod was interrupted (exit 143)"),
    ],
)
def test_cron_rare_exit_codes(
    sandbox: Sandbox, tmp_path: Path, code: int, channel: str, expected: str
) -> None:
    page, alert = tmp_path / "page.txt", tmp_path / "alert.txt"

    done = run_cron(
        sandbox,
        {
            "FRAISIER": str(_exiting_fraisier(tmp_path, code)),
            "ALERT_COMMAND": f"cat > {alert}",
            "PAGE_COMMAND": f"cat > {page}",
        },
    )

    assert done.returncode == code
    assert done.stderr == ""
    sent = (page if channel == "page" else alert).read_text()
    assert sent.startswith(expected), sent
    assert not (alert if channel == "page" else page).exists()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (3, "rollback failed during the deploy of"),
        (5, "failed on the run database (exit 5)"),
    ],
)
def test_ci_rare_exit_codes(
    repository: ServiceRepository, tmp_path: Path, code: int, expected: str
) -> None:
    commit = git(repository.origin, "rev-parse", "HEAD")

    done = repository.run_job(commit, {"FRAISIER": str(_exiting_fraisier(tmp_path, code))})

    assert done.returncode == code
    assert expected in done.stderr

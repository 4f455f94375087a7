"""Git sources: the ref is resolved once on the controller and every host gets that commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from e2e_helpers import run_fraisier


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.email=dev@example.invalid", "-c", "user.name=dev", *args]
    return subprocess.run(
        command, cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def _repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "app.txt").write_text("one\n")
    _git(repo, "add", "app.txt")
    _git(repo, "commit", "-q", "-m", "one")
    _git(repo, "checkout", "-q", "-b", "feature")
    (repo / "app.txt").write_text("two\n")
    _git(repo, "commit", "-q", "-am", "two")
    _git(repo, "checkout", "-q", "main")
    return repo


def _project(tmp_path: Path, repo: Path) -> Path:
    root = tmp_path / "project"
    (root / "inventories").mkdir(parents=True)
    (root / "tasks").mkdir()
    (root / "tasks" / "rel.yaml").write_text(yaml.safe_dump({"steps": ["fetch", "switch"]}))
    inventory = {
        "hosts": {"a": {"connection": "local"}, "b": {"connection": "local"}},
        "fraises": {
            "rel": {
                "recipe": "rel",
                "deploy_to": str(tmp_path / "deploy" / "{{ host }}"),
                "source": {"git": str(repo), "ref": "main"},
            }
        },
    }
    (root / "inventories" / "git.yaml").write_text(yaml.safe_dump(inventory))
    return root


def test_git_ref_resolved_once_for_all_hosts(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    root = _project(tmp_path, repo)
    feature = _git(repo, "rev-parse", "feature")

    result = run_fraisier(root, "deploy", "--env", "git", "--ref", "feature", "--json")

    assert result.returncode == 0, result
    run = result.json()[0]
    for host in ("a", "b"):
        current = tmp_path / "deploy" / host / "current"
        assert (current / "app.txt").read_text() == "two\n"
        assert (current / "REVISION").read_text().strip() == feature
    history = run_fraisier(root, "history", "--env", "git", "--json")
    assert history.returncode == 0, history
    recorded = next(r for r in history.json() if r["run_id"] == run["run_id"])
    assert recorded["git_commit"] == feature
    assert recorded["git_ref"] == "feature"


def test_git_default_ref_and_unknown_ref(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    root = _project(tmp_path, repo)

    default = run_fraisier(root, "deploy", "--env", "git")
    missing = run_fraisier(root, "deploy", "--env", "git", "--ref", "no-such-branch")

    assert default.returncode == 0, default
    revision = (tmp_path / "deploy" / "a" / "current" / "REVISION").read_text().strip()
    assert revision == _git(repo, "rev-parse", "main")
    assert missing.returncode == 2, missing
    assert "git ref 'no-such-branch' not found" in missing.stderr

"""Release sources, prepared once on the controller so every host gets the same files.

A local directory is packed into a gzip'd tar archive. A git repository's ref is resolved to one
commit on the controller, and ``git archive`` packs that commit.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import hashlib
import logging
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

from fraisier.errors import ConfigurationError, ProviderError
from fraisier.inventory import Source
from fraisier.redact import redact
from fraisier.validation import validate_git_ref

log = logging.getLogger("fraisier.sources")


@dataclasses.dataclass
class Artifact:
    archive: Path
    revision: str  # the git commit, or "path:<sha256 of the archive>"
    commit: str | None
    ref: str | None
    size: int

    def remove(self) -> None:
        self.archive.unlink(missing_ok=True)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def pack_directory(source: Source, workdir: Path) -> Artifact:
    """Pack the source's folders into one tar.gz archive, skipping excluded names.

    A file of a later folder replaces the file of the same relative path of an earlier one.
    """
    entries = _source_entries(source)
    handle, name = tempfile.mkstemp(prefix="fraisier-", suffix=".tar.gz", dir=workdir)
    os.close(handle)
    archive = Path(name)

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    # The gzip header contains a time and a file name unless they are fixed, so the same files
    # would give another archive digest, and another revision, on every run.
    with (
        archive.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as packed,
        tarfile.open(fileobj=packed, mode="w") as tar,
    ):
        for relative in sorted(entries):
            tar.add(entries[relative], arcname=relative, recursive=False, filter=normalize)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    return Artifact(archive, f"path:{digest}", None, None, archive.stat().st_size)


def _source_entries(source: Source) -> dict[str, Path]:
    """Map each relative path of the release to the file or folder it comes from."""
    entries: dict[str, Path] = {}
    for folder in source.paths:
        root = Path(folder)
        if not root.is_dir():
            raise ConfigurationError(
                f"source directory {root} not found; fix 'source.path' of the fraise in the "
                "inventory"
            )
        for current, dirs, files in os.walk(root):
            base = Path(current)
            dirs[:] = sorted(d for d in dirs if not _excluded(d, source.exclude))
            for entry in [*dirs, *(f for f in files if not _excluded(f, source.exclude))]:
                path = base / entry
                relative = path.relative_to(root).as_posix()
                earlier = entries.get(relative)
                if earlier is not None and earlier.is_dir() != path.is_dir():
                    raise ConfigurationError(
                        f"source folders disagree on {relative}: a folder in one and a file in "
                        f"the other ({earlier} and {path}); rename one of them"
                    )
                entries[relative] = path
    return entries


def _git(args: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except FileNotFoundError:
        raise ConfigurationError("git is not installed on the controller; install it") from None
    except subprocess.TimeoutExpired:
        raise ProviderError(
            f"git {args[0]} timed out after {timeout:g}s", code="git_timeout"
        ) from None
    if result.returncode != 0:
        raise ProviderError(
            f"git {redact(' '.join(args))} failed: {redact(result.stderr.strip())[-500:]}",
            code="git_failed",
        )
    return result.stdout


def resolve_git(source: Source, ref: str | None, cache_dir: Path) -> tuple[Path, str, str]:
    """Mirror the repository into ``cache_dir`` and resolve ``ref`` to one commit."""
    ref = validate_git_ref(ref or source.ref)
    repo = source.repo or ""
    mirror = cache_dir / hashlib.sha256(repo.encode()).hexdigest()[:16]
    if (mirror / "HEAD").exists():
        _git(["fetch", "--prune", "--quiet", "origin", "+refs/*:refs/*"], cwd=mirror)
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _git(["clone", "--mirror", "--quiet", "--", repo, str(mirror)])
    try:
        commit = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=mirror).strip()
    except ProviderError:
        raise ConfigurationError(
            f"git ref {ref!r} not found in {redact(repo)}; give an existing branch, tag or commit "
            "with --ref or 'source.ref'"
        ) from None
    return mirror, ref, commit


def pack_git(source: Source, ref: str | None, workdir: Path, cache_dir: Path) -> Artifact:
    """Resolve the ref once and pack that commit with ``git archive``."""
    mirror, resolved_ref, commit = resolve_git(source, ref, cache_dir)
    handle, name = tempfile.mkstemp(prefix="fraisier-", suffix=".tar.gz", dir=workdir)
    os.close(handle)
    archive = Path(name)
    _git(["archive", "--format=tar.gz", f"--output={archive}", commit], cwd=mirror)
    log.info("resolved %s to commit %s", resolved_ref, commit)
    return Artifact(archive, commit, commit, resolved_ref, archive.stat().st_size)


def prepare_artifact(source: Source, ref: str | None, workdir: Path, cache_dir: Path) -> Artifact:
    """Build the archive that every host of the run receives."""
    if source.kind == "git":
        return pack_git(source, ref, workdir, cache_dir)
    if ref:
        raise ConfigurationError(
            "--ref applies to git sources only; this fraise's source is a directory"
        )
    return pack_directory(source, workdir)

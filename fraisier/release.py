"""The Capistrano-style release layout on a host, and the shell commands that change it.

Layout under ``deploy_to``::

    releases/<release_id>/          one directory per release, with REVISION and .fraisier-state
    current -> releases/<id>        switched atomically: a temporary link renamed over ``current``
    shared/                         paths linked into every release
    .fraisier/lock/holder.json      the deploy lock and its holder
    .fraisier/uploads/              archives on their way into a release

A release's ``.fraisier-state`` is ``building`` while it is made, ``ready`` once every step before
the switch passed, ``healthy`` after its health check passed, and ``failed`` when a run gave up on
it. Only ``ready`` or ``healthy`` releases are rollback targets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from collections.abc import Iterable, Sequence

from fraisier.errors import DeploymentError
from fraisier.validation import quote, validate_release_id

STATE_FILE = ".fraisier-state"
GOOD_STATES = ("ready", "healthy")


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
    release_id: str
    state: str


@dataclasses.dataclass(frozen=True)
class HostState:
    """Contents of the release directory of one fraise on one host."""

    exists: bool
    current: str | None
    releases: tuple[ReleaseInfo, ...]

    def state_of(self, release_id: str) -> str | None:
        for info in self.releases:
            if info.release_id == release_id:
                return info.state
        return None

    def last_healthy(self, exclude: Iterable[str] = ()) -> str | None:
        skip = set(exclude)
        for info in reversed(self.releases):
            if info.state == "healthy" and info.release_id not in skip:
                return info.release_id
        return None

    def rollback_target(self) -> str | None:
        """Return the newest good release older than ``current``, for a manual rollback."""
        ids = [r.release_id for r in self.releases]
        if self.current not in ids:
            candidates = self.releases
        else:
            candidates = self.releases[: ids.index(self.current)]
        for info in reversed(candidates):
            if info.state in GOOD_STATES:
                return info.release_id
        return None


def new_release_id(run_id: str, now: dt.datetime | None = None) -> str:
    """Return a sortable release id: UTC time to the millisecond and six characters of the run id.

    Rollback targets and cleanup order releases by id, so two deploys within one second must
    still sort by time, not by their random run ids.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d%H%M%S}{now.microsecond // 1000:03d}-{run_id[:6]}"


class ReleasePaths:
    """Paths and commands for one fraise's release directory on one host."""

    def __init__(self, deploy_to: str) -> None:
        self.deploy_to = deploy_to.rstrip("/") or "/"
        self.releases = f"{self.deploy_to}/releases"
        self.current = f"{self.deploy_to}/current"
        self.shared = f"{self.deploy_to}/shared"
        self.meta = f"{self.deploy_to}/.fraisier"
        self.uploads = f"{self.meta}/uploads"
        self.lock = f"{self.meta}/lock"

    def release(self, release_id: str) -> str:
        return f"{self.releases}/{validate_release_id(release_id)}"

    # --- read-only -----------------------------------------------------------------------

    def read_state_command(self) -> str:
        """Return a read-only command that prints the current link and every release's state."""
        # A deploy_to that cannot be entered is "absent" only when a deploy could create it:
        # its nearest existing parent is a folder the deploy user may write to.
        target = quote(self.deploy_to)
        return (
            f"if ! cd -- {target} 2>/dev/null; then\n"
            f"  if [ -e {target} ]; then echo unusable {target}; exit 0; fi\n"
            f"  dir={target}\n"
            '  while [ ! -e "$dir" ] && [ "$dir" != / ]; do dir=$(dirname -- "$dir"); done\n'
            '  if [ -d "$dir" ] && [ -w "$dir" ] && [ -x "$dir" ]; then echo absent\n'
            '  else printf "unusable %s\\n" "$dir"; fi\n'
            "  exit 0\n"
            "fi\n"
            "echo present\n"
            'printf "current=%s\\n" "$(readlink current 2>/dev/null)"\n'
            "for d in releases/*/; do\n"
            '  [ -d "$d" ] || continue\n'
            "  id=${d#releases/}; id=${id%/}\n"
            f'  st=$(cat "$d{STATE_FILE}" 2>/dev/null || echo unknown)\n'
            '  printf "release=%s %s\\n" "$id" "$st"\n'
            "done\n"
        )

    @staticmethod
    def parse_state(output: str) -> HostState:
        lines = output.splitlines()
        if lines and lines[0].startswith("unusable "):
            path = lines[0][len("unusable ") :].strip()
            raise DeploymentError(
                f"{path} cannot be read or written by the deploy user, so no deploy can use "
                "the fraise's deploy_to there; fix the folder's owner or mode on the host",
                code="lock_failed",
            )
        if not lines or lines[0].strip() != "present":
            return HostState(exists=False, current=None, releases=())
        current: str | None = None
        releases: list[ReleaseInfo] = []
        for line in lines[1:]:
            if line.startswith("current="):
                target = line[len("current=") :].strip().rstrip("/")
                current = target.rsplit("/", 1)[-1] if target else None
            elif line.startswith("release="):
                release_id, _, state = line[len("release=") :].partition(" ")
                releases.append(ReleaseInfo(release_id, state.strip() or "unknown"))
        releases.sort(key=lambda r: r.release_id)
        return HostState(exists=True, current=current, releases=tuple(releases))

    # --- changes -------------------------------------------------------------------------

    def prepare_command(self) -> str:
        return "mkdir -p -- " + " ".join(
            quote(p) for p in (self.releases, self.shared, self.uploads)
        )

    def clear_uploads_command(self) -> str:
        return f"rm -f -- {quote(self.uploads)}/*.tar.gz"

    def upload_path(self, release_id: str) -> str:
        return f"{self.uploads}/{validate_release_id(release_id)}.tar.gz"

    def unpack_command(self, release_id: str, revision: str, archive: str | None = None) -> str:
        """Return the command that creates the release directory from an uploaded archive."""
        release = self.release(release_id)
        archive = archive or self.upload_path(release_id)
        return (
            f"mkdir -- {quote(release)} || exit 1\n"
            f"echo building > {quote(release + '/' + STATE_FILE)}\n"
            f"tar -xzf {quote(archive)} -C {quote(release)} || "
            f"{{ rm -f -- {quote(archive)}; exit 1; }}\n"
            f"rm -f -- {quote(archive)}\n"
            f"printf '%s\\n' {quote(revision)} > {quote(release + '/REVISION')}\n"
        )

    def link_shared_command(self, release_id: str, shared: Sequence[str]) -> str:
        """Return the command that links each shared path into the release.

        A shared path missing from ``shared/`` is seeded from the release when the release has it,
        else created as an empty directory.
        """
        release = self.release(release_id)
        lines = []
        for item in shared:
            source = f"{self.shared}/{item}"
            target = f"{release}/{item}"
            lines.append(
                f'if [ ! -e {quote(source)} ]; then mkdir -p -- "$(dirname -- {quote(source)})"; '
                f"if [ -e {quote(target)} ]; then cp -a -- {quote(target)} {quote(source)}; "
                f"else mkdir -p -- {quote(source)}; fi; fi\n"
                f'mkdir -p -- "$(dirname -- {quote(target)})" && rm -rf -- {quote(target)} && '
                f"ln -s -- {quote(source)} {quote(target)} || exit 1\n"
            )
        return "".join(lines) or "true"

    def set_state_command(self, release_id: str, state: str) -> str:
        path = f"{self.release(release_id)}/{STATE_FILE}"
        return f"[ -d {quote(self.release(release_id))} ] && echo {quote(state)} > {quote(path)}"

    def switch_command(self, release_id: str) -> str:
        """Return the command that points ``current`` at a release atomically.

        ``ln -sfn`` alone unlinks before it links on some systems, so the link is made under a
        temporary name and renamed over ``current`` (rename(2) is atomic).
        """
        release = self.release(release_id)
        temporary = f"{self.deploy_to}/.current-{secrets.token_hex(4)}"
        return (
            f"[ -d {quote(release)} ] || {{ echo 'release {release_id} not found' >&2; exit 1; }}\n"
            f"ln -s -- {quote('releases/' + release_id)} {quote(temporary)} && "
            f"mv -T -- {quote(temporary)} {quote(self.current)}"
        )

    def remove_releases_command(self, release_ids: Iterable[str]) -> str | None:
        paths = [quote(self.release(r)) for r in release_ids]
        return f"rm -rf -- {' '.join(paths)}" if paths else None


def releases_to_remove(state: HostState, keep: int, protect: Iterable[str | None]) -> list[str]:
    """Choose the releases to delete.

    Kept are the newest ``keep`` good releases, the current one, the last healthy one and every
    protected release, such as this run's rollback target. Failed releases are deleted except
    the newest, which stays for inspection.
    """
    protected = {p for p in protect if p}
    if state.current:
        protected.add(state.current)
    last_healthy = state.last_healthy()
    if last_healthy:
        protected.add(last_healthy)

    good = [r.release_id for r in state.releases if r.state in GOOD_STATES]
    protected.update(good[-keep:])
    failed = [r.release_id for r in state.releases if r.state not in GOOD_STATES]
    if failed:
        protected.add(failed[-1])
    return [r.release_id for r in state.releases if r.release_id not in protected]

"""Real OpenSSH servers on loopback addresses 127.0.0.N that act as Fraisier test hosts.

Each ``SshHost`` runs its own ``/usr/sbin/sshd`` with its own host key, port, deploy user
(``fr-hN``), deploy root and client key. Creating users, writing sudoers files and running sshd
need root.

Each host holds an exclusive ``flock`` on ``/run/fraisier-test/127.0.0.N.lock`` while it
exists. Pytest processes that run at the same time therefore never share an address, a deploy
user or a deploy root.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .services import free_port

log = logging.getLogger("fraisier.tests.sshd")

SSHD_BINARY = "/usr/sbin/sshd"
SSH_KEYGEN_BINARY = "/usr/bin/ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
LOCK_DIR = Path("/run/fraisier-test")
DEPLOY_ROOT_BASE = Path("/srv/fraisier-test")
SUDOERS_DIR = Path("/etc/sudoers.d")
LAST_OCTETS = range(2, 255)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_live_hosts: set[SshHost] = set()


@dataclasses.dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    uid: int
    state: str
    cmdline: str


def _processes() -> list[_Process]:
    """Read every process from /proc, skipping those that exit while being read."""
    processes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            uid = os.stat(f"/proc/{entry}").st_uid
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name in field 2 may contain spaces and parentheses, so the fields
        # after it are split from the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        processes.append(
            _Process(
                pid=int(entry),
                ppid=int(fields[1]),
                uid=uid,
                state=fields[0],
                cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
            )
        )
    return processes


def _descendants(processes: list[_Process], roots: set[int]) -> set[int]:
    """Return ``roots`` and every process below them in the parent tree."""
    children: dict[int, list[int]] = {}
    for process in processes:
        children.setdefault(process.ppid, []).append(process.pid)
    found = set()
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid in found:
            continue
        found.add(pid)
        pending.extend(children.get(pid, []))
    return found


def _signal_all(pids: set[int], signal_number: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number)


def _run(command: list[str], description: str) -> str:
    """Run a setup command and return its output, or raise RuntimeError with its stderr."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{description} failed: {' '.join(command)} exited {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def _generate_key(path: Path, comment: str) -> None:
    _run(
        [SSH_KEYGEN_BINARY, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        f"generating the key {path}",
    )


def _ensure_user(name: str) -> pwd.struct_passwd:
    """Create the deploy user ``name`` unless it exists, and unlock it for key logins."""
    if os.geteuid() != 0:
        raise RuntimeError(
            f"creating the test user {name} needs root; run the tests as root (see docs/testing.md)"
        )
    # useradd and usermod take a lock on /etc/passwd and fail at once when another process
    # holds it, so parallel test runs retry for a few seconds.
    for attempt in range(20):
        try:
            try:
                pwd.getpwnam(name)
            except KeyError:
                _run(
                    ["useradd", "-m", "-s", "/bin/sh", "-c", "Fraisier test host", name],
                    f"creating the test user {name}",
                )
            # A locked password ("!") makes sshd reject key logins when UsePAM is off; "*"
            # unlocks the account without allowing any password.
            _run(["usermod", "-s", "/bin/sh", "-p", "*", name], f"unlocking the test user {name}")
            return pwd.getpwnam(name)
        except RuntimeError:
            if attempt == 19:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def _reserve_address(address: str) -> int | None:
    """Lock ``address`` and return the lock file descriptor, or None if another process has it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{address}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class SshHost:
    """One test host: a real sshd on 127.0.0.N with its own user, keys and deploy root.

    Without ``address`` the first free address from 127.0.0.2 up is taken. The first
    ``start()`` creates everything and empties the deploy root. ``stop()``, ``kill()`` and
    ``restart()`` keep the port, the keys and the deploy root, so an inventory stays valid.
    ``close()`` removes them.
    """

    def __init__(self, address: str | None = None, base_dir: str | None = None) -> None:
        self._requested_address = address
        self._base_dir = base_dir
        self._lock_fd: int | None = None
        self._address = ""
        self._port = 0
        self._user = ""
        self._uid = -1
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._listener_pids: set[int] = set()
        self._frozen: set[int] = set()

    # Properties

    @property
    def address(self) -> str:
        """Loopback address that sshd listens on."""
        self._require_prepared()
        return self._address

    @property
    def port(self) -> int:
        """TCP port that sshd listens on."""
        self._require_prepared()
        return self._port

    @property
    def name(self) -> str:
        """Inventory name of the host, ``h`` and the last octet of the address."""
        return f"h{self.address.rsplit('.', 1)[1]}"

    @property
    def user(self) -> str:
        """Deploy user that the client logs in as."""
        self._require_prepared()
        return self._user

    @property
    def identity_file(self) -> str:
        """Private key of the client, accepted by this host only."""
        return str(self._dir / "id_ed25519")

    @property
    def known_hosts(self) -> str:
        """known_hosts file with the correct host key of this host."""
        return str(self._dir / "known_hosts")

    @property
    def known_hosts_line(self) -> str:
        """The ``[address]:port ssh-ed25519 KEY`` line of ``known_hosts``, without newline."""
        return Path(self.known_hosts).read_text().strip()

    @property
    def deploy_root(self) -> str:
        """Directory owned by the deploy user, empty when the host is first started."""
        return str(DEPLOY_ROOT_BASE / self.address)

    @property
    def workdir(self) -> str:
        """Temporary directory with the keys, sshd_config and sshd's output."""
        return str(self._dir)

    @property
    def running(self) -> bool:
        """Whether the sshd listener process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def _dir(self) -> Path:
        self._require_prepared()
        assert self._workdir is not None
        return self._workdir

    def _require_prepared(self) -> None:
        if self._workdir is None:
            raise RuntimeError("the SshHost has no address and keys yet; call start() first")

    def __repr__(self) -> str:
        where = f"{self._address}:{self._port}" if self._workdir else "not started"
        return f"<SshHost {where} running={self.running}>"

    # Setup

    def _reserve(self) -> None:
        if self._requested_address is not None:
            fd = _reserve_address(self._requested_address)
            if fd is None:
                raise RuntimeError(
                    f"test host address {self._requested_address} is in use by another SshHost "
                    f"(lock {LOCK_DIR}/{self._requested_address}.lock); pick another address "
                    f"or leave it out"
                )
            self._lock_fd, self._address = fd, self._requested_address
            return
        for octet in LAST_OCTETS:
            address = f"127.0.0.{octet}"
            fd = _reserve_address(address)
            if fd is not None:
                self._lock_fd, self._address = fd, address
                return
        raise RuntimeError(f"every test host address 127.0.0.2-254 is locked in {LOCK_DIR}")

    def _prepare(self) -> None:
        """Reserve an address and create the user, keys, deploy root, sudoers and sshd_config."""
        self._reserve()
        octet = self._address.rsplit(".", 1)[1]
        self._user = f"fr-h{octet}"
        workdir = Path(
            tempfile.mkdtemp(prefix=f"fraisier-sshd-{self._address}-", dir=self._base_dir)
        )
        # The deploy user must reach authorized_keys: sshd reads it with the user's uid.
        workdir.chmod(0o711)
        self._workdir = workdir
        _live_hosts.add(self)

        entry = _ensure_user(self._user)
        self._uid = entry.pw_uid

        _generate_key(workdir / "ssh_host_ed25519_key", f"fraisier-test-host-{self._address}")
        _generate_key(workdir / "id_ed25519", f"fraisier-test-client-{self._user}")
        authorized_keys = workdir / "authorized_keys"
        shutil.copyfile(workdir / "id_ed25519.pub", authorized_keys)
        authorized_keys.chmod(0o644)

        self._reset_deploy_root()
        self._write_sudoers()
        self._port = free_port(self._address)
        self._write_sshd_config()
        host_key = (workdir / "ssh_host_ed25519_key.pub").read_text().split()
        self._write_known_hosts(workdir / "known_hosts", host_key[0], host_key[1])

    def _reset_deploy_root(self) -> None:
        root = DEPLOY_ROOT_BASE / self._address
        DEPLOY_ROOT_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(mode=0o755)
        os.chown(root, self._uid, pwd.getpwnam(self._user).pw_gid)

    def _write_sudoers(self) -> None:
        SUDOERS_DIR.mkdir(mode=0o750, exist_ok=True)
        target = SUDOERS_DIR / f"fraisier-test-{self._user}"
        staging = self._dir / "sudoers"
        staging.write_text(f"{self._user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        staging.chmod(0o440)
        if shutil.which("visudo"):
            _run(["visudo", "-c", "-q", "-f", str(staging)], f"checking {staging}")
        shutil.copyfile(staging, target)
        target.chmod(0o440)

    def _write_sshd_config(self) -> None:
        workdir = self._dir
        lines = [
            f"ListenAddress {self._address}:{self._port}",
            f"HostKey {workdir / 'ssh_host_ed25519_key'}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            f"AllowUsers {self._user}",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            "StrictModes no",
            "MaxSessions 100",
            "MaxStartups 100:30:200",
            "UseDNS no",
            "LogLevel ERROR",
            "ClientAliveInterval 5",
            "PrintMotd no",
            "PrintLastLog no",
            # Fabric's put() and get() use SFTP.
            "Subsystem sftp internal-sftp",
        ]
        (workdir / "sshd_config").write_text("\n".join(lines) + "\n")

    def _write_known_hosts(self, path: Path, key_type: str, key_base64: str) -> None:
        path.write_text(f"[{self._address}]:{self._port} {key_type} {key_base64}\n")

    def wrong_known_hosts(self) -> str:
        """Write a known_hosts file that lists a different key for this host and return it."""
        workdir = self._dir
        other_key = workdir / "other_host_ed25519_key"
        if not other_key.exists():
            _generate_key(other_key, f"fraisier-test-other-{self._address}")
        key_type, key_base64 = (workdir / "other_host_ed25519_key.pub").read_text().split()[:2]
        path = workdir / "known_hosts.wrong"
        self._write_known_hosts(path, key_type, key_base64)
        return str(path)

    # Process control

    def start(self) -> None:
        """Start sshd unless it runs, and wait until it sends its SSH banner."""
        if self.running:
            return
        if self._workdir is None:
            self._prepare()
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        workdir = self._dir
        command = [SSHD_BINARY, "-D", "-e", "-f", str(workdir / "sshd_config")]
        log.info("starting sshd for %s on %s:%s", self._user, self._address, self._port)
        with open(workdir / "sshd.log", "ab") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._listener_pids.add(self._process.pid)
        self._wait_for_banner()

    def _wait_for_banner(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no connection yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(
                    f"sshd for {self._address}:{self._port} exited during start; "
                    f"its output:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self._address, self._port), timeout=1.0) as sock:
                    banner = sock.recv(256)
                if banner.startswith(b"SSH-"):
                    return
                last_error = f"unexpected banner {banner[:60]!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"sshd on {self._address}:{self._port} sent no SSH banner within {START_TIMEOUT:.0f} s "
            f"({last_error}); its output:\n{self.log_tail()}"
        )

    def log_tail(self, limit: int = 4000) -> str:
        """Return the last ``limit`` characters of sshd's output."""
        try:
            return (self._dir / "sshd.log").read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def session_pids(self) -> set[int]:
        """Return the pids of this host's sshd session processes and of their descendants.

        A session process is a child of a listener of this host, or a process titled
        ``sshd: USER`` for this host's user, which also finds sessions left by a listener
        that was stopped. Zombies are left out.
        """
        if self._workdir is None:
            return set()
        processes = _processes()
        prefixes = (f"sshd: {self._user} ", f"sshd: {self._user}@")
        roots = {
            p.pid
            for p in processes
            if p.ppid in self._listener_pids
            or p.cmdline.startswith(prefixes)
            or p.cmdline == f"sshd: {self._user}"
        }
        roots -= self._listener_pids
        alive = {p.pid for p in processes if p.state != "Z"}
        return (_descendants(processes, roots) - self._listener_pids) & alive

    def user_pids(self) -> set[int]:
        """Return the pids of every live process that runs as this host's deploy user."""
        if self._workdir is None:
            return set()
        return {p.pid for p in _processes() if p.uid == self._uid and p.state != "Z"}

    def _stop_listener(self, graceful: bool) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if graceful:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "sshd on %s did not stop on SIGTERM; sending SIGKILL", self._address
                    )
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._process = None

    def kill_sessions(self) -> None:
        """SIGKILL every session process and every process of the deploy user, but not sshd."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            # A session may fork between the scan and the signal, so scan until none is left.
            pids = self.session_pids() | self.user_pids()
            if not pids:
                self._frozen.clear()
                return
            _signal_all(pids, signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"processes of test host {self._address} (user {self._user}) survived "
                    f"SIGKILL for {STOP_TIMEOUT:.0f} s: {sorted(pids)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop sshd with SIGTERM and SIGKILL every session. Calling it again does nothing.

        On return no listener, session or deploy-user process of this host is alive.
        """
        self._stop_listener(graceful=True)
        self.kill_sessions()

    def kill(self) -> None:
        """SIGKILL the listener and every session and deploy-user process of this host."""
        self._stop_listener(graceful=False)
        self.kill_sessions()

    def restart(self) -> None:
        """Stop sshd and its sessions, then start it again on the same port with the same key."""
        self.stop()
        self.start()

    def freeze(self, listener: bool = False) -> set[int]:
        """SIGSTOP every session process (and the listener if ``listener``) and return the pids.

        Commands on open connections then hang with the TCP connection still open. A frozen
        listener also makes new connections hang before the SSH banner.
        """
        stopped: set[int] = set()
        if listener and self.running:
            assert self._process is not None
            _signal_all({self._process.pid}, signal.SIGSTOP)
            stopped.add(self._process.pid)
        # A session process may fork between the scan and SIGSTOP, for example the
        # monitor right after authentication. Scan again after every stopped process shows
        # state T, until a scan finds nothing new.
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            new = self.session_pids() - stopped
            if not new:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"sessions of test host {self._address} kept forking for "
                    f"{STOP_TIMEOUT:.0f} s while being frozen: {sorted(new)}"
                )
            _signal_all(new, signal.SIGSTOP)
            stopped |= new
            self._wait_stopped(new, deadline)
        self._frozen |= stopped
        return stopped

    @staticmethod
    def _wait_stopped(pids: set[int], deadline: float) -> None:
        """Wait until each of ``pids`` is stopped (state T) or has exited."""
        while time.monotonic() < deadline:
            states = {p.pid: p.state for p in _processes() if p.pid in pids}
            if all(state in ("T", "Z") for state in states.values()):
                return
            time.sleep(0.01)

    def thaw(self) -> None:
        """SIGCONT every process that ``freeze()`` stopped and every current session process."""
        pids = self._frozen | self.session_pids()
        if self.running:
            assert self._process is not None
            pids.add(self._process.pid)
        _signal_all(pids, signal.SIGCONT)
        self._frozen.clear()

    def reset(self) -> None:
        """Bring the host back to a clean started state with an empty deploy root.

        Thaws and kills sessions and deploy-user processes, starts sshd if it is down, and
        empties the deploy root. The port and keys stay the same.
        """
        self.thaw()
        self.kill_sessions()
        self.start()
        self._reset_deploy_root()

    def close(self) -> None:
        """Stop sshd and remove the deploy root, the sudoers file and the keys, once."""
        if self._workdir is None:
            return
        self.thaw()
        self.stop()
        (SUDOERS_DIR / f"fraisier-test-{self._user}").unlink(missing_ok=True)
        shutil.rmtree(DEPLOY_ROOT_BASE / self._address, ignore_errors=True)
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        _live_hosts.discard(self)

    def __enter__(self) -> SshHost:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Client helpers

    def ssh_args(self, command: str | None = None, known_hosts: str | None = None) -> list[str]:
        """Build an OpenSSH client command line for this host with strict host key checking."""
        args = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            self.identity_file,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-p",
            str(self.port),
            f"{self.user}@{self.address}",
        ]
        if command is not None:
            args.append(command)
        return args

    def connect_kwargs(self) -> dict[str, Any]:
        """Return the ``connect_kwargs`` for Fabric, also valid for ``SSHClient.connect``."""
        return {"key_filename": self.identity_file, "look_for_keys": False, "allow_agent": False}

    def paramiko_client(self, known_hosts: str | None = None, timeout: float = 5.0) -> Any:
        """Connect a paramiko SSHClient that rejects any host key not in ``known_hosts``."""
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(known_hosts or self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.address,
                port=self.port,
                username=self.user,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                **self.connect_kwargs(),
            )
        except BaseException:
            client.close()
            raise
        return client


@atexit.register
def _close_live_hosts() -> None:
    """Close hosts that a test run left open, so no sshd outlives the interpreter."""
    for host in list(_live_hosts):
        try:
            host.close()
        except Exception:
            log.exception("closing test host %r at exit failed", host)

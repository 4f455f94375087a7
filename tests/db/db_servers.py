"""Private PostgreSQL and MariaDB servers on loopback that a test may stop and restart."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
MARIADB_INSTALL_DB = Path("/usr/bin/mariadb-install-db")
MARIADBD = Path("/usr/sbin/mariadbd")


def wait_for_port(port: int, up: bool, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:port accepts connections (``up``) or refuses them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                listening = True
        except OSError:
            listening = False
        if listening == up:
            return
        time.sleep(0.1)
    state = "accept" if up else "refuse"
    raise RuntimeError(f"127.0.0.1:{port} did not {state} connections within {timeout} s")


class PrivatePostgres:
    """A PostgreSQL 15 cluster in a temp dir, run as the ``postgres`` user on a free port.

    The cluster uses scram-sha-256 password authentication, so tests exercise real passwords.
    """

    user = "postgres"
    password = "pg-Secret-4711"
    database = "postgres"

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"{PG_BIN / 'initdb'} is missing: install postgresql-15")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fraisier-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        account = pwd.getpwnam("postgres")
        os.chown(self.root, account.pw_uid, account.pw_gid)
        os.chmod(self.root, 0o700)
        password_file = self.root / "pwfile"
        password_file.write_text(self.password + "\n")
        os.chown(password_file, account.pw_uid, account.pw_gid)
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--locale=C",
        )

    def _as_postgres(self, *command: str) -> None:
        result = subprocess.run(
            command,
            user="postgres",
            group="postgres",
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}: {result.stderr or result.stdout}"
            )

    def url(self, password: str | None = "<own>") -> str:
        """Return the server URL; ``password=None`` leaves the password out."""
        secret = self.password if password == "<own>" else password
        credentials = f"{self.user}:{secret}" if secret else self.user
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        wait_for_port(self.port, up=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``fast`` disconnects the clients, ``immediate`` kills it."""
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"
        )  # fmt: skip
        wait_for_port(self.port, up=False)

    def restart(self) -> None:
        """Stop and start the server, dropping every client connection."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server if it runs and remove its directory."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateMariaDB:
    """A MariaDB server in a temp dir on a free loopback port, root without a password."""

    user = "root"
    database = "fraisier"

    def __init__(self) -> None:
        for binary in (MARIADB_INSTALL_DB, MARIADBD):
            if not binary.exists():
                raise RuntimeError(f"{binary} is missing: install mariadb-server")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fraisier-mariadb-"))
        self.data = self.root / "data"
        self.socket = self.root / "mysqld.sock"
        self.log = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        result = subprocess.run(
            [
                str(MARIADB_INSTALL_DB),
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-install-db exited {result.returncode}: {result.stderr}")

    def url(self) -> str:
        """Return the server URL of the test database."""
        return f"mysql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        """Start the server, create the test database and wait until it accepts connections."""
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    str(MARIADBD),
                    "--no-defaults",
                    f"--datadir={self.data}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=16M",
                    f"--pid-file={self.root / 'mysqld.pid'}",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, up=True, timeout=60)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; server log: {self.log.read_text()[-2000:]}") from None
        import pymysql

        conn = pymysql.connect(unix_socket=str(self.socket), user="root", connect_timeout=10)
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
                cursor.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''")
                cursor.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1'")
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the server with SIGTERM and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        wait_for_port(self.port, up=False)

    def restart(self) -> None:
        """Stop and start the server, dropping every client connection."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

"""A throwaway MariaDB server built from the installed ``mariadbd``.

``MariaDBServer()`` runs ``mariadb-install-db --no-defaults`` into a fresh
temporary folder and starts ``mariadbd --no-defaults`` on a free 127.0.0.1
port with its unix socket in that folder. An ``--init-file``, run at every
start, creates a password user ``appliance`` with all privileges on a
database ``appliance``, and an admin user for test setup.

As root the data folder belongs to the ``mysql`` system user and the server
drops to it (``--user=mysql``). No option file (``/etc/mysql``) is read and
the machine's own server on port 3306 is never touched.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymysql

from tests.harness.ports import LOOPBACK, free_port
from tests.harness.process import ServerProcess

#: The system user that owns the data when the test session runs as root.
SYSTEM_USER = "mysql"
#: Seconds allowed for ``mariadb-install-db``.
INSTALL_TIMEOUT = 120.0
#: Seconds to wait for the server to accept a login, and to exit on SIGTERM.
SERVER_WAIT = 60.0
#: Server options shared by the install step and every start (small and fast).
SERVER_OPTIONS = (
    "--skip-name-resolve",
    "--innodb-log-file-size=8M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=2",
    "--character-set-server=utf8mb4",
)


class MariaDBServer(ServerProcess):
    """A running throwaway MariaDB server; see the module docstring.

    Attributes: ``host`` (127.0.0.1), ``port``, ``user``/``password``/``database``
    (``appliance``), ``admin_user``/``admin_password`` (all privileges, grant
    option), ``socket`` (unix socket path), ``base_dir``, ``datadir``,
    ``log_path``. Use it as a context manager or call :meth:`close`.
    """

    name = "mariadbd"

    def __init__(self, *, options: Sequence[str] = ()) -> None:
        """Install the system tables and start the server; ``options`` go to ``mariadbd``."""
        self.host = LOOPBACK
        self.port = 0
        self.user = "appliance"
        self.password = secrets.token_urlsafe(18)
        self.database = "appliance"
        self.admin_user = "harness_admin"
        self.admin_password = secrets.token_urlsafe(18)
        self._options = [*SERVER_OPTIONS, *options]
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.base_dir = Path(
            tempfile.mkdtemp(prefix="appliance-mariadb-", dir="/tmp" if self._run_as else None)
        )
        self.datadir = self.base_dir / "data"
        self.socket = self.base_dir / "sock"
        self.log_path = self.base_dir / "mariadbd.log"
        self._init_file = self.base_dir / "init.sql"
        try:
            self._chown(self.base_dir)
            self._install()
            self._write_init_file()
            self._first_start()
        except BaseException:
            self.close()
            raise

    # -- public API --------------------------------------------------------

    def connect(self, **overrides: Any) -> pymysql.connections.Connection:
        """Open a PyMySQL connection as ``appliance`` over TCP (keyword arguments override)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
            "connect_timeout": 10,
        }
        params.update(overrides)
        return pymysql.connect(**params)

    def execute(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as the admin user with autocommit; return its rows."""
        conn = self.connect(
            user=self.admin_user, password=self.admin_password, database=None, autocommit=True
        )
        try:
            with conn.cursor() as cursor:
                cursor.execute(query, params)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def start(self) -> None:
        """Start the server again on the same port and data folder (no-op if running)."""
        if self._closed:
            raise RuntimeError("server is closed")
        if self.running:
            return
        args = [
            "mariadbd",
            "--no-defaults",
            *([f"--user={self._run_as}"] if self._run_as else []),
            f"--datadir={self.datadir}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            f"--socket={self.socket}",
            f"--pid-file={self.base_dir / 'mariadbd.pid'}",
            f"--tmpdir={self.base_dir}",
            f"--init-file={self._init_file}",
            *self._options,
        ]
        self._spawn(args)
        self._wait_ready()

    def __repr__(self) -> str:
        """Show where the server listens."""
        return f"<MariaDBServer {self.host}:{self.port} dir={self.base_dir}>"

    # -- setup steps -------------------------------------------------------

    def _install(self) -> None:
        """Create the system tables with ``mariadb-install-db --no-defaults``."""
        args = [
            "mariadb-install-db",
            "--no-defaults",  # must be the first option
            f"--datadir={self.datadir}",
            *([f"--user={self._run_as}"] if self._run_as else []),
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
            *self._options,
        ]
        try:
            result = subprocess.run(
                args,
                check=False,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"mariadb-install-db timed out after {INSTALL_TIMEOUT} s") from error
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise RuntimeError(f"mariadb-install-db failed (exit {result.returncode})\n{tail}")

    def _write_init_file(self) -> None:
        """Write the SQL run at each start: the ``appliance`` database and users."""
        statements = [
            f"CREATE DATABASE IF NOT EXISTS `{self.database}`",
            f"CREATE USER IF NOT EXISTS '{self.user}'@'%' IDENTIFIED BY '{self.password}'",
            f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO '{self.user}'@'%'",
            f"CREATE USER IF NOT EXISTS '{self.admin_user}'@'%' "
            f"IDENTIFIED BY '{self.admin_password}'",
            f"GRANT ALL PRIVILEGES ON *.* TO '{self.admin_user}'@'%' WITH GRANT OPTION",
        ]
        fd = os.open(self._init_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(";\n".join(statements) + ";\n")
        self._chown(self._init_file)

    def _first_start(self) -> None:
        """Start on a free port, picking another one if it was taken meanwhile."""
        for attempt in range(3):
            self.port = free_port()
            try:
                self.start()
                return
            except RuntimeError as error:
                if attempt == 2 or "already in use" not in str(error):
                    raise

    def _probe(self) -> str | None:
        """Ready when ``appliance`` can log in."""
        try:
            self.connect(connect_timeout=2).close()
        except pymysql.err.OperationalError as error:
            return str(error)
        return None

    def _chown(self, path: Path) -> None:
        """Give ``path`` to the server user when running as root."""
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

"""A throwaway PostgreSQL server built from the installed server binaries.

``PostgresServer()`` runs ``initdb`` into a fresh temporary folder and starts
the server on a free 127.0.0.1 port with logical decoding, TLS (a server
certificate for ``localhost`` and 127.0.0.1 issued by a :class:`TestCA`) and
SCRAM-SHA-256 password authentication everywhere. It creates a password role
``appliance`` (LOGIN REPLICATION) that owns a database ``appliance``.

As root, ``initdb``, ``pg_ctl`` and the server run as the ``postgres`` system
user (``runuser -u postgres --``), because PostgreSQL refuses to run as root;
the temporary folder then lives under ``/tmp`` and belongs to that user.
Otherwise everything runs as the current user. The machine's own cluster
(port 5432, ``/etc/postgresql``) is never read or touched.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.harness.certs import TestCA
from tests.harness.ports import LOOPBACK, free_port

#: The system user that runs the server when the test session runs as root.
SYSTEM_USER = "postgres"
#: Seconds allowed for ``initdb`` and for each ``pg_ctl`` call.
COMMAND_TIMEOUT = 120.0
#: Seconds ``pg_ctl -w`` waits for the server to start or stop.
SERVER_WAIT = 60
#: Settings written to ``postgresql.auto.conf`` (``port`` is added per start).
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": LOOPBACK,
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "fsync": "off",
    "full_page_writes": "off",
    "password_encryption": "scram-sha-256",
    "ssl": "on",
    "ssl_cert_file": "server.crt",
    "ssl_key_file": "server.key",
    "ssl_ca_file": "root.crt",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


def find_bin_dir() -> Path:
    """Return ``/usr/lib/postgresql/<newest version>/bin`` holding the server binaries."""
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "postgres").is_file() and (path / "initdb").is_file():
            version = tuple(int(p) for p in re.findall(r"\d+", path.parent.name))
            candidates.append((version, path))
    if not candidates:
        raise RuntimeError("no PostgreSQL server found in /usr/lib/postgresql/*/bin")
    return max(candidates)[1]


class PostgresServer:
    """A running throwaway PostgreSQL server; see the module docstring.

    Attributes: ``host`` (127.0.0.1), ``port``, ``user``/``password``/``dbname``
    (the ``appliance`` role and database), ``superuser``/``superuser_password``,
    ``socket_dir`` (the temporary folder, also as ``base_dir``), ``data_dir``, ``log_path``,
    ``ca_cert_path``, ``server_cert`` (the :class:`Issued` server certificate),
    ``bin_dir``. Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        ca: TestCA | None = None,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        require_tls: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """Create, configure and start the server.

        ``ca`` issues the server certificate (a private CA is made in the
        temporary folder when omitted). ``require_tls`` keeps only
        ``hostssl`` lines in ``pg_hba.conf`` so plain TCP is refused.
        ``settings`` adds or overrides ``postgresql.conf`` parameters.
        """
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.host = LOOPBACK
        self.port = 0
        self.user = "appliance"
        self.dbname = "appliance"
        self.password = secrets.token_urlsafe(18)
        self.superuser = "postgres"
        self.superuser_password = secrets.token_urlsafe(18)
        self._settings = {**BASE_SETTINGS, **(settings or {})}
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self._running = False
        self._closed = False
        base = tempfile.mkdtemp(prefix="appliance-pg-", dir="/tmp" if self._run_as else None)
        self.socket_dir = Path(base)
        self.base_dir = self.socket_dir
        self.data_dir = self.socket_dir / "data"
        self.log_path = self.socket_dir / "postgres.log"
        try:
            self._chown(self.socket_dir)
            self._ca = ca if ca is not None else TestCA(self.socket_dir / "ca")
            self.ca_cert_path = self._ca.cert_path
            self.server_cert = self._ca.issue(
                f"postgres-{secrets.token_hex(4)}", dns=("localhost",), ips=(LOOPBACK,)
            )
            self._initdb()
            self._write_hba(require_tls)
            self._first_start()
            self._create_appliance_role()
        except BaseException:
            self.close()
            raise

    # -- public API --------------------------------------------------------

    def dsn(self, **overrides: Any) -> str:
        """A libpq keyword string for ``appliance`` over TCP with ``sslmode=verify-full``.

        Keyword arguments override or add libpq parameters; ``None`` removes one.
        """
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca_cert_path),
            "connect_timeout": 10,
        }
        params.update(overrides)
        return make_conninfo("", **{k: v for k, v in params.items() if v is not None})

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """A libpq keyword string for the superuser over the unix socket."""
        return make_conninfo(
            "",
            host=str(self.socket_dir),
            port=self.port,
            user=self.superuser,
            password=self.superuser_password,
            dbname=dbname,
            connect_timeout=10,
        )

    def execute(
        self,
        query: str | sql.Composable,
        params: Sequence[Any] | None = None,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run ``query`` as the superuser in autocommit mode and return rows.

        Without ``params`` a string may hold several statements; the rows of
        the last one are returned (``[]`` when it returns none).
        """
        with psycopg.connect(self.superuser_dsn(dbname), autocommit=True) as conn:
            cursor = conn.execute(query, params)  # type: ignore[arg-type]
            rows = cursor.fetchall() if cursor.description else []
            while cursor.nextset():
                rows = cursor.fetchall() if cursor.description else []
            return rows

    def start(self) -> None:
        """Start the server again on the same port and data folder (no-op if running)."""
        if self._closed:
            raise RuntimeError("server is closed")
        if self._running:
            return
        self._write_settings()
        self._pg_ctl("start", "-l", str(self.log_path))
        self._running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); no-op if stopped."""
        if not self._running:
            return
        self._pg_ctl("stop", "-m", mode)
        self._running = False

    def close(self) -> None:
        """Stop the server and remove its temporary folder; safe to call twice."""
        if self._closed:
            return
        try:
            self.stop(mode="fast")
        except RuntimeError:
            self._force_stop()
        finally:
            self._closed = True
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the server was started and not stopped since."""
        return self._running

    def __enter__(self) -> Self:
        """Return the running server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the server."""
        self.close()

    def __repr__(self) -> str:
        """Show where the server listens."""
        return f"<PostgresServer {self.host}:{self.port} dir={self.socket_dir}>"

    # -- setup steps -------------------------------------------------------

    def _initdb(self) -> None:
        """Create the cluster with a SCRAM superuser password and no fsync."""
        pwfile = self.socket_dir / "pwfile"
        self._write(pwfile, self.superuser_password + "\n", 0o600)
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        shutil.copyfile(self.server_cert.chain_path, self.data_dir / "server.crt")
        shutil.copyfile(self.server_cert.key_path, self.data_dir / "server.key")
        shutil.copyfile(self.ca_cert_path, self.data_dir / "root.crt")
        for name, mode in (("server.crt", 0o644), ("server.key", 0o600), ("root.crt", 0o644)):
            os.chmod(self.data_dir / name, mode)
            self._chown(self.data_dir / name)

    def _write_hba(self, require_tls: bool) -> None:
        """Allow SCRAM logins on the socket and from 127.0.0.1 (TLS or, unless required, not)."""
        lines = [
            "# written by tests/harness/postgres.py",
            "local   all          all                   scram-sha-256",
            "local   replication  all                   scram-sha-256",
            "hostssl all          all   127.0.0.1/32    scram-sha-256",
            "hostssl replication  all   127.0.0.1/32    scram-sha-256",
        ]
        if not require_tls:
            lines += [
                "host    all          all   127.0.0.1/32    scram-sha-256",
                "host    replication  all   127.0.0.1/32    scram-sha-256",
            ]
        self._write(self.data_dir / "pg_hba.conf", "\n".join(lines) + "\n", 0o600)

    def _write_settings(self) -> None:
        """(Re)write ``postgresql.auto.conf`` with the settings and the current port."""
        settings = {
            **self._settings,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        lines = ["# written by tests/harness/postgres.py"]
        lines += [
            f"{key} = '{str(value).replace(chr(39), chr(39) * 2)}'"
            for key, value in settings.items()
        ]
        self._write(self.data_dir / "postgresql.auto.conf", "\n".join(lines) + "\n", 0o600)

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

    def _create_appliance_role(self) -> None:
        """Create the ``appliance`` login role and its database."""
        self.execute(
            sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
                sql.Identifier(self.user), sql.Literal(self.password)
            )
        )
        self.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(self.dbname), sql.Identifier(self.user)
            )
        )

    # -- process helpers ---------------------------------------------------

    def _pg_ctl(self, action: str, *extra: str) -> None:
        """Run ``pg_ctl -w`` for ``action``; raise with the log tail on failure."""
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                action,
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(SERVER_WAIT),
                *extra,
            ],
            what=f"pg_ctl {action}",
        )

    def _force_stop(self) -> None:
        """Kill the postmaster named in ``postmaster.pid`` (last resort)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 9)
        except (OSError, ValueError):
            pass
        self._running = False

    def _run(self, args: list[str], what: str) -> None:
        """Run a command as the server user from the base folder, with a timeout."""
        if self._run_as:
            args = ["runuser", "-u", self._run_as, "--", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        started = time.monotonic()
        try:
            result = subprocess.run(
                args,
                check=False,
                cwd=self.socket_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                start_new_session=True,  # Ctrl-C in pytest must not reach the server
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(
                f"{what} timed out after {COMMAND_TIMEOUT} s\n{self._log_tail()}"
            ) from error
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {result.returncode}, {time.monotonic() - started:.1f} s)\n"
                f"{result.stdout}{result.stderr}\n--- {self.log_path} ---\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, or a note that there is none."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _write(self, path: Path, text: str, mode: int) -> None:
        """Write a file readable by the server user only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(path, mode)
        self._chown(path)

    def _chown(self, path: Path) -> None:
        """Give ``path`` to the server user when running as root."""
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

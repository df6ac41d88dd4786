"""Tests proving the throwaway-server harness works with real clients."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pymysql
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tests.harness.certs import TestCA
from tests.harness.mariadb import MariaDBServer
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer, resp_command

STANDARD_PORTS = {5432, 3306, 6379}
pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """The environment without libpq variables that could redirect a client."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# -- certificates ------------------------------------------------------------


def test_issued_server_cert_verifies_against_ca(tmp_path: Path) -> None:
    """A server certificate verifies against its CA for its DNS name and IP."""
    ca = TestCA(tmp_path)
    issued = ca.issue("web", dns=("localhost",), ips=("127.0.0.1",))
    store = Store([ca.certificate])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = (
            PolicyBuilder().store(store).build_server_verifier(name).verify(issued.certificate, [])
        )
        assert chain[-1] == ca.certificate
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("example.com")).verify(
            issued.certificate, []
        )


def test_openssl_verify_accepts_issued_and_rejects_expired(tmp_path: Path) -> None:
    """`openssl verify` accepts a fresh certificate and rejects an expired one."""
    ca = TestCA(tmp_path)
    fresh = ca.issue("fresh", dns=("localhost",))
    expired = ca.issue(
        "expired", dns=("localhost",), not_after=datetime.now(UTC) - timedelta(hours=1)
    )

    def verify(cert: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca.cert_path), str(cert)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert verify(fresh.cert_path).returncode == 0
    result = verify(expired.cert_path)
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


def test_client_cert_has_spiffe_uri_client_usage_and_private_key(tmp_path: Path) -> None:
    """A client certificate carries its SPIFFE URI, clientAuth only, a 0600 key and a chain."""
    ca = TestCA(tmp_path)
    spiffe = "spiffe://example.org/ns/prod/sa/alice"
    issued = ca.issue("alice", uris=(spiffe,), client=True, server=False)
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    usage = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(issued.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert issued.chain_path.read_bytes() == issued.cert_pem + ca.cert_pem
    verified = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .build_client_verifier()
        .verify(issued.certificate, [])
    )
    assert x509.UniformResourceIdentifier(spiffe) in (verified.subjects or [])


# -- PostgreSQL ----------------------------------------------------------------


def test_postgres_tls_scram_login_as_appliance(postgres_server: PostgresServer) -> None:
    """`appliance` logs in over TCP with verify-full TLS and its password."""
    assert postgres_server.port not in STANDARD_PORTS
    with psycopg.connect(postgres_server.dsn()) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "appliance",
            "appliance",
        )
        assert conn.execute("SHOW ssl").fetchone() == ("on",)
        row = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row is not None and row[0] is True and row[1].startswith("TLS")
        assert conn.info.pgconn.ssl_in_use


def test_postgres_wrong_password_is_refused(postgres_server: PostgresServer) -> None:
    """A wrong password fails SCRAM authentication."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_server.dsn(password="wrong")).close()


def test_postgres_verify_full_rejects_an_unknown_ca(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """verify-full with another CA as root fails certificate verification."""
    other = TestCA(tmp_path)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(postgres_server.dsn(sslrootcert=str(other.cert_path))).close()


def test_postgres_require_tls_refuses_plain_tcp(test_ca: TestCA) -> None:
    """With require_tls only TLS logins work; by default plain TCP works too."""
    with PostgresServer(ca=test_ca, require_tls=True) as server:
        with psycopg.connect(server.dsn()) as conn:
            assert conn.info.pgconn.ssl_in_use
        with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
            psycopg.connect(server.dsn(sslmode="disable")).close()


def test_postgres_plain_tcp_allowed_by_default(postgres_server: PostgresServer) -> None:
    """The default server also accepts SCRAM logins without TLS."""
    with psycopg.connect(postgres_server.dsn(sslmode="disable", sslrootcert=None)) as conn:
        assert not conn.info.pgconn.ssl_in_use


def test_postgres_logical_wal_and_scram_settings(postgres_server: PostgresServer) -> None:
    """wal_level is logical and the stored password is a SCRAM-SHA-256 verifier."""
    assert postgres_server.execute("SHOW wal_level") == [("logical",)]
    assert postgres_server.execute("SHOW password_encryption") == [("scram-sha-256",)]
    rows = postgres_server.execute(
        "SELECT rolpassword, rolreplication FROM pg_authid WHERE rolname = 'appliance'"
    )
    assert rows[0][0].startswith("SCRAM-SHA-256$") and rows[0][1] is True


def test_postgres_appliance_creates_and_drops_pgoutput_slot(
    postgres_server: PostgresServer,
) -> None:
    """`appliance` creates and drops a logical replication slot with pgoutput."""
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('harness_sql_slot', 'pgoutput')")
        rows = conn.execute(
            "SELECT plugin, slot_type FROM pg_replication_slots "
            "WHERE slot_name = 'harness_sql_slot'"
        ).fetchall()
        assert rows == [("pgoutput", "logical")]
        conn.execute("SELECT pg_drop_replication_slot('harness_sql_slot')")
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def test_postgres_replication_protocol_with_pg_recvlogical(postgres_server: PostgresServer) -> None:
    """pg_recvlogical creates and drops a slot over a TLS replication connection."""
    tool = str(postgres_server.bin_dir / "pg_recvlogical")
    base = [tool, "-d", postgres_server.dsn(), "--slot", "harness_proto_slot"]
    for extra in (["--create-slot", "--plugin", "pgoutput"], ["--drop-slot"]):
        result = subprocess.run(
            base + extra, check=False, capture_output=True, text=True, timeout=60, env=_clean_env()
        )
        assert result.returncode == 0, result.stderr


def test_postgres_psql_cli_connects_with_tls(postgres_server: PostgresServer) -> None:
    """The psql CLI logs in as `appliance` with verify-full TLS."""
    result = subprocess.run(
        [
            str(postgres_server.bin_dir / "psql"),
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            postgres_server.dsn(),
            "-c",
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "appliance|t"


def test_postgres_restart_keeps_port_and_data(postgres_server: PostgresServer) -> None:
    """stop() then start() brings the server back on the same port with its data."""
    port = postgres_server.port
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE harness_restart (v int); INSERT INTO harness_restart VALUES (42)"
        )
    postgres_server.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_server.dsn(connect_timeout=2)).close()
    finally:
        postgres_server.start()
    assert postgres_server.port == port
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT v FROM harness_restart").fetchall() == [(42,)]
        conn.execute("DROP TABLE harness_restart")


# -- MariaDB -------------------------------------------------------------------


def test_mariadb_pymysql_login_and_query(mariadb_server: MariaDBServer) -> None:
    """PyMySQL logs in as `appliance` over TCP and reads back what it wrote."""
    assert mariadb_server.port not in STANDARD_PORTS
    conn = mariadb_server.connect(autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT CURRENT_USER(), DATABASE(), @@port")
            assert cursor.fetchone() == ("appliance@%", "appliance", mariadb_server.port)
            cursor.execute("CREATE TABLE harness_t (v INT)")
            cursor.execute("INSERT INTO harness_t VALUES (%s)", (7,))
            cursor.execute("SELECT v FROM harness_t")
            assert cursor.fetchall() == ((7,),)
            cursor.execute("DROP TABLE harness_t")
    finally:
        conn.close()


def test_mariadb_wrong_password_is_refused(mariadb_server: MariaDBServer) -> None:
    """A wrong password is refused with access denied (1045)."""
    with pytest.raises(pymysql.err.OperationalError) as caught:
        mariadb_server.connect(password="wrong").close()
    assert caught.value.args[0] == 1045


def test_mariadb_restart_keeps_port_and_data(mariadb_server: MariaDBServer) -> None:
    """stop() then start() brings MariaDB back on the same port with its data."""
    port = mariadb_server.port
    mariadb_server.execute("CREATE TABLE appliance.harness_restart (v INT)")
    mariadb_server.execute("INSERT INTO appliance.harness_restart VALUES (5)")
    mariadb_server.stop()
    try:
        with pytest.raises(pymysql.err.OperationalError):
            mariadb_server.connect(connect_timeout=2).close()
    finally:
        mariadb_server.start()
    assert mariadb_server.port == port
    assert mariadb_server.execute("SELECT v FROM appliance.harness_restart") == [(5,)]
    mariadb_server.execute("DROP TABLE appliance.harness_restart")


# -- Redis ---------------------------------------------------------------------


def test_redis_raw_ping(redis_server: RedisServer) -> None:
    """A raw-socket PING gets +PONG."""
    assert redis_server.port not in STANDARD_PORTS
    assert resp_command(redis_server.host, redis_server.port, ("PING",)) == [b"+PONG"]


def test_redis_stop_start_and_kill_on_same_port(redis_server: RedisServer) -> None:
    """Redis stopped or killed comes back on the same port with start()."""
    port = redis_server.port
    for take_down in (redis_server.stop, redis_server.kill):
        take_down()
        try:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((redis_server.host, port), timeout=2).close()
        finally:
            redis_server.start()
        assert redis_server.port == port
        assert resp_command(redis_server.host, port, ("PING",)) == [b"+PONG"]


def test_redis_requirepass() -> None:
    """With a password, PING needs AUTH first and a wrong password is refused."""
    with RedisServer(password="harness-secret") as server:
        assert resp_command(server.host, server.port, ("PING",))[0].startswith(b"-NOAUTH")
        assert resp_command(server.host, server.port, ("AUTH", "nope"))[0].startswith(b"-WRONGPASS")
        assert server.ping() == b"+PONG"

"""
Tests for shared TLS: config validation, real TLS clients (openssl s_client
and Python's ssl) against a running appliance, reload without dropping live
connections, mTLS with a SAN allowlist, hostile handshakes, and client
contexts that verify upstream hostnames.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

from appliance.host.config import load_config
from appliance.host.ini import ConfigError
from appliance.host.plugin import discover_plugins
from appliance.host.tls_config import parse_allowed_client
from tests.harness.certs import TestCA
from tests.harness.ports import free_port
from tests.inprocess import LineClient, port_of, start_appliance, stop
from tests.processes import ApplianceProcess, connect

PLUGINS = discover_plugins()


def install(issued: Any, directory: Path, stem: str) -> tuple[Path, Path]:
    """Copy an issued cert/key to stable paths (as a deploy would), atomically."""
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    for source, target in ((issued.cert_path, cert), (issued.key_path, key)):
        temporary = target.with_suffix(".tmp")
        shutil.copyfile(source, temporary)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    return cert, key


def client_context(ca: TestCA, issued: Any = None) -> ssl.SSLContext:
    """A Python TLS client trusting the test CA, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if issued is not None:
        context.load_cert_chain(str(issued.cert_path), str(issued.key_path))
    return context


def tls_connect(port: int, context: ssl.SSLContext, name: str = "localhost") -> ssl.SSLSocket:
    """Connect and finish the handshake."""
    return context.wrap_socket(connect(port, timeout=10), server_hostname=name)


def serial_of(sock: ssl.SSLSocket) -> int:
    """The serial number of the certificate the server presented."""
    from cryptography import x509

    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number


def echo_once(sock: socket.socket, line: bytes) -> bytes:
    """Send a line, read the echo."""
    sock.sendall(line)
    return sock.recv(1000)


# -- config -----------------------------------------------------------------


def test_bad_tls_material_is_reported_together(tmp_path: Path) -> None:
    """Mismatched key, expired cert, loose key mode, unknown reference: all in one run."""
    ca = TestCA(tmp_path / "ca")
    good = ca.issue("good", dns=("localhost",))
    other = ca.issue("other", dns=("localhost",))
    expired = ca.issue("expired", dns=("localhost",),
                       not_after=datetime.now(UTC) - timedelta(days=1))
    loose = tmp_path / "loose.key"
    shutil.copyfile(good.key_path, loose)
    os.chmod(loose, 0o644)
    path = tmp_path / "a.ini"
    path.write_text(textwrap.dedent(f"""
        [tls:mismatch]
        certificate = {good.cert_path}
        key = {other.key_path}
        [tls:old]
        certificate = {expired.cert_path}
        key = {expired.key_path}
        [tls:loose]
        certificate = {good.cert_path}
        key = {loose}
        [tls:noca]
        certificate = {good.cert_path}
        key = {good.key_path}
        allowed_clients = uri:spiffe://x/*, bogus
        min_version = 1.1
        [tls:missing]
        certificate = {tmp_path}/absent.crt
        key = {good.key_path}
        [echo]
        listen = tcp:0
        tls = nosuch
        """))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), PLUGINS, {})
    text = "\n".join(str(p) for p in caught.value.problems)
    assert "[tls:mismatch]: certificate" in text and "does not match its key" in text
    assert "[tls:old]: certificate" in text and "expired on" in text
    assert "[tls:loose]: key" in text and "accessible by others" in text
    assert "[tls:noca] allowed_clients: needs client_ca" in text
    assert "[tls:noca] allowed_clients: expected dns:NAME, uri:URI or ip:ADDRESS" in text
    assert "[tls:noca] min_version: expected one of 1.2, 1.3" in text
    assert "[tls:missing]: cannot read certificate" in text
    assert "[echo] tls: there is no [tls:nosuch] section" in text


def test_allowlist_entries() -> None:
    """Exact, prefix and network entries match the right SANs only."""
    spiffe = parse_allowed_client("uri:spiffe://example.org/ns/pay/*")
    assert spiffe.matches("uri", "spiffe://example.org/ns/pay/sa/api")
    assert not spiffe.matches("uri", "spiffe://example.org/ns/payroll")
    assert not spiffe.matches("dns", "spiffe://example.org/ns/pay/x")
    exact = parse_allowed_client("dns:Client.Example.com.")
    assert exact.matches("dns", "client.example.com")
    assert not exact.matches("dns", "client.example.com.evil.test")
    network = parse_allowed_client("ip:10.1.0.0/16")
    assert network.matches("ip", "10.1.2.3") and not network.matches("ip", "10.2.0.1")
    for bad in ("spiffe://x", "dns:", "ip:10.0.0.0/33", "ip:10.*", "email:a@b"):
        with pytest.raises(ValueError):
            parse_allowed_client(bad)


# -- a running appliance ----------------------------------------------------


@pytest.fixture
def tls_appliance(tmp_path: Path) -> Any:
    """An appliance subprocess with echo over TLS (server) and over mTLS with an allowlist."""
    ca = TestCA(tmp_path / "ca")
    cert, key = install(ca.issue("server-a", dns=("localhost",), ips=("127.0.0.1",)),
                        tmp_path, "server")
    admin, plain = free_port(), free_port()
    config = tmp_path / "appliance.ini"
    config.write_text(textwrap.dedent(f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        tls = mtls
        [tls:web]
        certificate = {cert}
        key = {key}
        handshake_timeout = 1s
        watch_interval = 200ms
        [tls:mtls]
        certificate = {cert}
        key = {key}
        client_ca = {ca.cert_path}
        allowed_clients = uri:spiffe://example.org/ns/good/*, dns:ops.example.org
        watch_interval = 0s
        [echo]
        listen = tcp:{plain}:interface=127.0.0.1
        tls = web
        """))
    process = ApplianceProcess(config, tmp_path)
    state = {"ca": ca, "process": process, "admin": admin, "echo": plain,
             "dir": tmp_path, "config": config}
    try:
        process.wait_until(lambda: _accepts(plain), what="the TLS echo port")
        yield state
    finally:
        process.stop()


def _accepts(port: int) -> bool:
    try:
        connect(port, timeout=1).close()
    except OSError:
        return False
    return True


def openssl_echo(port: int, ca: TestCA, line: bytes, *extra: str) -> bytes:
    """Send one line through a real openssl s_client and return the first line back."""
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(ca.cert_path), "-verify_return_error", "-verify_hostname", "localhost",
         "-quiet", *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(line)
        client.stdin.flush()
        return client.stdout.readline()
    finally:
        client.kill()
        client.wait(10)


def test_openssl_client_and_tls13_minimum(tls_appliance: Any) -> None:
    """openssl s_client verifies the chain and echoes over TLS 1.3; TLS 1.2 is refused."""
    ca, port = tls_appliance["ca"], tls_appliance["echo"]
    assert openssl_echo(port, ca, b"over tls\n") == b"over tls\n"
    refused = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
         "-CAfile", str(ca.cert_path)], input=b"", capture_output=True, timeout=20)
    assert refused.returncode != 0
    with tls_connect(port, client_context(ca)) as sock:
        assert sock.version() == "TLSv1.3"


def test_reload_keeps_old_connections_and_serves_new_cert(tls_appliance: Any) -> None:
    """A new certificate (file watch and SIGHUP) is used for new connections while an
    old connection stays up on the old one."""
    ca, port, directory = tls_appliance["ca"], tls_appliance["echo"], tls_appliance["dir"]
    process: ApplianceProcess = tls_appliance["process"]
    old = tls_connect(port, client_context(ca))
    first_serial = serial_of(old)
    assert echo_once(old, b"before\n") == b"before\n"
    install(ca.issue("server-b", dns=("localhost",)), directory, "server")
    process.wait_until(lambda: _serial(port, ca) != first_serial, what="file-watch reload")
    second_serial = _serial(port, ca)
    assert echo_once(old, b"still up\n") == b"still up\n"
    assert serial_of(old) == first_serial
    install(ca.issue("server-c", dns=("localhost",)), directory, "server")
    process.signal(signal.SIGHUP)
    process.wait_until(lambda: _serial(port, ca) not in (first_serial, second_serial),
                       what="SIGHUP reload")
    assert echo_once(old, b"and still\n") == b"and still\n"
    old.close()


def _serial(port: int, ca: TestCA) -> int:
    with tls_connect(port, client_context(ca)) as sock:
        return serial_of(sock)


def test_bad_new_certificate_keeps_the_old_one(tls_appliance: Any) -> None:
    """A replaced key that does not match is refused and the old certificate stays."""
    ca, port, directory = tls_appliance["ca"], tls_appliance["echo"], tls_appliance["dir"]
    process: ApplianceProcess = tls_appliance["process"]
    before = _serial(port, ca)
    wrong = ca.issue("wrong", dns=("localhost",))
    shutil.copyfile(wrong.key_path, directory / "server.key.tmp")
    os.chmod(directory / "server.key.tmp", 0o600)
    os.replace(directory / "server.key.tmp", directory / "server.key")
    process.wait_until(lambda: "cannot be used, keeping the old certificate" in
                       process.output(), what="refusal")
    assert _serial(port, ca) == before


def test_mtls_allowlist(tls_appliance: Any) -> None:
    """Allowed SANs get through; a SAN not on the list, no certificate, or another CA
    are refused, each logged once without the peer's data."""
    ca, admin, directory = tls_appliance["ca"], tls_appliance["admin"], tls_appliance["dir"]
    process: ApplianceProcess = tls_appliance["process"]
    good = ca.issue("good", uris=("spiffe://example.org/ns/good/sa/api",), client=True,
                    server=False)
    ops = ca.issue("ops", dns=("ops.example.org",), client=True, server=False)
    evil = ca.issue("evil", uris=("spiffe://example.org/ns/evil/sa/api",),
                    dns=("ops.example.org.evil.test",), client=True, server=False)
    stranger_ca = TestCA(directory / "other-ca")
    stranger = stranger_ca.issue("stranger", uris=("spiffe://example.org/ns/good/x",),
                                 client=True, server=False)
    for allowed in (good, ops):
        with tls_connect(admin, client_context(ca, allowed)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert b"200 OK" in sock.recv(1000)
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{admin}", "-CAfile", str(ca.cert_path),
         "-cert", str(evil.cert_path), "-key", str(evil.key_path), "-quiet"],
        input=b"GET /healthz HTTP/1.0\r\n\r\n", capture_output=True, timeout=20)
    assert b"200 OK" not in result.stdout
    for refused in (evil, None, stranger):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with tls_connect(admin, client_context(ca, refused)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if not sock.recv(1000):
                    raise ConnectionResetError("closed")
    process.wait_until(lambda: "not on the allowlist" in process.output()
                       and "not signed by the configured CA" in process.output()
                       and "TLS protocol error" in process.output(),
                       what="every kind of refusal logged")
    lines = [line for line in process.log_lines()
             if line["message"].startswith("tls:mtls: handshake refused")]
    assert any("not signed by the configured CA" in line["message"] for line in lines)
    assert not any("evil" in line["message"] for line in lines)
    # Two allowlist refusals (s_client and the evil client), one line so far:
    # repeats are counted exactly and summarised once per interval.
    assert sum("not on the allowlist" in line["message"] for line in lines) == 1
    with tls_connect(admin, client_context(ca, good)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        metrics = b""
        while chunk := sock.recv(65536):
            metrics += chunk
    assert (b'appliance_tls_handshake_failures_total{context="mtls",reason="not_allowed"} 2.0'
            in metrics)


def test_garbage_and_stalled_handshakes(tls_appliance: Any) -> None:
    """Garbage and a truncated handshake are refused; other connections carry on."""
    ca, port = tls_appliance["ca"], tls_appliance["echo"]
    process: ApplianceProcess = tls_appliance["process"]
    with tls_connect(port, client_context(ca)) as good:
        with connect(port) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + bytes(range(256)))
            assert closed_after_at_most_an_alert(garbage)
        with connect(port) as stalled:
            stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # truncated hello
            assert closed_after_at_most_an_alert(stalled)  # by the 1s handshake deadline
        assert echo_once(good, b"unaffected\n") == b"unaffected\n"
    process.wait_until(lambda: "handshake not finished in time" in process.output(),
                       what="timeout logged")
    assert "TLS protocol error" in process.output()


def closed_after_at_most_an_alert(sock: socket.socket) -> bool:
    """Whether the server closes (or resets) the connection, sending at most a TLS alert."""
    sock.settimeout(5)
    received = b""
    try:
        while chunk := sock.recv(1000):
            received += chunk
    except ConnectionResetError:
        pass
    return len(received) <= 7  # a TLS alert record is 7 bytes


# -- client contexts --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_contexts_verify_hostnames(reactor: Any, tmp_path: Path) -> None:
    """Upstream TLS verifies the hostname against the configured CA; a wrong name or the
    system trust store fails; the expiry gauge is exported."""
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("upstream", dns=("upstream.test",))
    root = start_appliance(reactor, tmp_path, textwrap.dedent(f"""
        [admin]
        listen = tcp:0:interface=127.0.0.1
        [tls:web]
        certificate = {server.cert_path}
        key = {server.key_path}
        [tls-client:internal]
        ca = {ca.cert_path}
        [echo]
        listen = tcp:0:interface=127.0.0.1
        tls = web
        """))
    port = port_of(root, "echo")
    tls = root.runtime.tls
    try:
        client = LineClient()
        endpoint = wrapClientTLS(tls.client("internal").for_host("upstream.test"),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        client.transport.write(b"verified\n")
        assert await client.wait_for(b"verified\n")
        client.transport.loseConnection()
        for creator in (tls.client("internal").for_host("other.test"),
                        tls.client().for_host("upstream.test")):
            refused = LineClient()
            endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
            await connectProtocol(endpoint, refused)
            refused.transport.write(b"should not pass\n")
            assert await refused.closed == b""
        from prometheus_client import generate_latest

        text = generate_latest(root.runtime.metrics).decode()
        assert 'appliance_tls_certificate_expiry_seconds{context="web"}' in text
    finally:
        await stop(root)

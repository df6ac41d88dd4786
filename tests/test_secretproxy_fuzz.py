"""
End-to-end fuzzing of the secret proxy: a real twistd process in front of a
real HTTP upstream process, driven over real TCP with blocking sockets, so
hypothesis can send any bytes through the whole pipeline (head parsing,
routing, authentication, request IDs, policy, injection) example by example.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.ports import free_port
from tests.processes import ApplianceProcess, connect
from tests.test_secretproxy import SESSION, make_store

SECRET = "fuzz-upstream-key-0123456789abcdef"
ANSWERS = (200, 400, 401, 403, 404, 408, 413, 414, 429, 431, 501, 505)
"""Deliberate answers; 500 (a bug) and 502-504 (the upstream is up) are not among them."""


def _send(port: int, request: bytes) -> bytes:
    """Send, then read until the proxy closes (Connection: close or an error)."""
    with connect(port, timeout=10) as sock:
        try:
            sock.sendall(request)  # no half-close: the proxy takes that as the client leaving
        except OSError:
            pass  # the proxy may refuse and close before reading everything
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return answer
            if not data:
                return answer
            answer += data


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The appliance (secretproxy) and a plain HTTP upstream, each its own process."""
    work = tmp_path_factory.mktemp("fuzz")
    (work / "site" / "v1").mkdir(parents=True)
    (work / "site" / "v1" / "x").write_text("upstream body\n")
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(upstream_port), "--bind", "127.0.0.1",
         "--directory", str(work / "site")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store, key = make_store(work, {"upstream-key": SECRET})
    session = work / "session"
    session.write_text(SESSION)
    session.chmod(0o600)
    admin, port = free_port(), free_port()
    config = work / "appliance.ini"
    config.write_text(textwrap.dedent(f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        [secretproxy]
        listen = tcp:{port}:interface=127.0.0.1
        store_path = {store}
        store_key_file = {key}
        header_timeout = 2s
        [secretproxy.session:billing]
        secret = file:{session}
        [secretproxy.upstream:api]
        hosts = api.upstream.test
        path_prefix = /via-prefix
        scheme = http
        address = 127.0.0.1
        port = {upstream_port}
        secret = upstream-key
        allow = loopback
        [secretproxy.rule:billing]
        identity = billing
        path = /v1/**
        """))
    process = ApplianceProcess(config, work)
    try:
        process.wait_healthy(admin)
        good = (b"GET /v1/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
                b"X-Upstream-Host: api.upstream.test\r\nX-Session-Secret: "
                + SESSION.encode() + b"\r\n\r\n")
        process.wait_until(lambda: _send(port, good).startswith(b"HTTP/1.1 200 "),
                           what="a first proxied request")
        yield {"port": port, "process": process, "good": good}
    finally:
        process.stop()
        upstream.terminate()
        upstream.wait(timeout=10)


_BYTES = st.binary(max_size=40)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from([b"GET", b"POST", b"DELETE"]) | _BYTES,
       path=_BYTES, route=st.sampled_from([b"api.upstream.test"]) | _BYTES,
       session=st.sampled_from([SESSION.encode()]) | _BYTES,
       request_id=_BYTES, authorization=_BYTES)
def test_any_request_bytes_get_a_deliberate_answer(proxy: Any, method: bytes, path: bytes,
                                                   route: bytes, session: bytes,
                                                   request_id: bytes,
                                                   authorization: bytes) -> None:
    """
    Whatever bytes a client puts in the method, the path, the routing header,
    the session secret, the request ID or its own Authorization, the answer
    is a complete response with a deliberate status (never an internal
    error), the secret is never echoed, and a good request still works.
    """
    request = (method + b" /" + path + b" HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
               b"X-Upstream-Host: " + route + b"\r\nX-Session-Secret: " + session + b"\r\n"
               b"X-Request-Id: " + request_id + b"\r\nAuthorization: " + authorization
               + b"\r\n\r\n")
    answer = _send(proxy["port"], request)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    assert status in ANSWERS, answer[:300]
    assert SECRET.encode() not in answer


def test_the_fuzzing_left_the_proxy_serving_and_logged_no_bug(proxy: Any) -> None:
    """After the examples above: good requests still work, and no internal error was logged."""
    assert _send(proxy["port"], proxy["good"]).startswith(b"HTTP/1.1 200 ")
    output = proxy["process"].output()
    assert "failed unexpectedly" not in output and "Traceback" not in output
    assert SECRET not in output

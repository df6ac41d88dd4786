"""
End-to-end tests of the pow service over real TCP against a running
appliance (twistd subprocess): every bad-input case, replay, limits, the
client CLI, Redis shared by two appliances, and the quote API fallback.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.pow.challenge import Challenge, ChallengeSigner
from appliance.pow.frames import HEADER, FrameDecoder, MessageType, encode
from appliance.pow.solver import solve
from tests.harness.ports import free_port
from tests.harness.redis import RedisServer
from tests.processes import ApplianceProcess, connect, http_get, run_command

pytestmark = pytest.mark.slow

KEY = "pow-test-key-" + "x" * 40


def start(tmp_path: Path, extra: str = "", redis_port: int | None = None,
          name: str = "a") -> dict[str, Any]:
    """Start an appliance with a pow service; return its ports and process."""
    admin, port = free_port(), free_port()
    key = tmp_path / f"pow-{name}.key"
    key.write_text(KEY)
    key.chmod(0o600)
    appliance = ""
    if redis_port is not None:
        appliance = f"[appliance]\nredis = redis://127.0.0.1:{redis_port}/0\n"
    config = tmp_path / f"{name}.ini"
    config.write_text(
        f"{appliance}[admin]\nlisten = tcp:{admin}:interface=127.0.0.1\n"
        f"[pow]\nlisten = tcp:{port}:interface=127.0.0.1\ndifficulty = 10\n"
        f"min_difficulty = 8\nfirst_byte_timeout = 2s\nframe_timeout = 500ms\n"
        f"{extra}\n[pow.key:k1]\nsecret = file:{key}\n")
    process = ApplianceProcess(config, tmp_path)
    process.wait_healthy(admin)
    return {"admin": admin, "port": port, "process": process}


def read_frame(sock: socket.socket) -> Any:
    """Read one frame (or None on close)."""
    decoder = FrameDecoder(1024 * 1024)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def ask(port: int, source: str | None = None) -> tuple[socket.socket, dict]:
    """Open a connection and get a challenge."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0) if source else None)
    sock.sendall(encode(MessageType.CHALLENGE_REQUEST, {}))
    frame = read_frame(sock)
    assert frame is not None and frame.type == MessageType.CHALLENGE, frame
    return sock, frame.payload


def solution(payload: dict) -> dict:
    """A correct SOLUTION payload for a challenge payload."""
    return {"challenge": payload["challenge"], "signature": payload["signature"],
            "nonces": solve(Challenge.from_json(payload["challenge"]))[0]}


def submit(port: int, payload: dict, source: str | None = None) -> Any:
    """Send a SOLUTION on a new connection; return the answer frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(encode(MessageType.SOLUTION, payload))
        return read_frame(sock)


def code_of(frame: Any) -> str:
    """The error code of a frame, or its type name."""
    return frame.payload["code"] if frame.type == MessageType.ERROR else frame.type.name


def good_client_works(port: int) -> bool:
    """A well-behaved client still gets a quote."""
    sock, payload = ask(port)
    with sock:
        sock.sendall(encode(MessageType.SOLUTION, solution(payload)))
        frame = read_frame(sock)
    return frame is not None and frame.type == MessageType.QUOTE


@pytest.fixture(scope="module")
def pow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One pow appliance for the bad-input tests."""
    server = start(tmp_path_factory.mktemp("pow"), "max_connections_per_client = 6\n"
                   "rate_limit = 1000/s\n")
    yield server
    server["process"].stop()


@pytest.mark.parametrize("data,code", [
    (HEADER.pack(1, 3, 50_000_000), "too_large"),
    (HEADER.pack(1, 9, 2) + b"{}", "unknown_type"),
    (HEADER.pack(1, 1, 9) + b"not json!", "bad_frame"),
    (HEADER.pack(7, 1, 0), "bad_frame"),
])
def test_malformed_frames(pow_server: Any, data: bytes, code: str) -> None:
    """Oversized length, unknown type, invalid JSON, wrong version: typed error, close."""
    with connect(pow_server["port"]) as sock:
        sock.sendall(data)
        frame = read_frame(sock)
        assert code_of(frame) == code
        assert read_frame(sock) is None
    assert good_client_works(pow_server["port"])


def test_truncated_frame_then_silence(pow_server: Any) -> None:
    """Half a frame and silence: a timeout error when the frame deadline passes."""
    with connect(pow_server["port"]) as sock:
        sock.sendall(HEADER.pack(1, 1, 100) + b'{"a":')
        assert code_of(read_frame(sock)) == "timeout"
    assert good_client_works(pow_server["port"])


def test_verification_errors(pow_server: Any) -> None:
    """Tampered signature, another address, expired, too little work, replayed."""
    port = pow_server["port"]
    sock, payload = ask(port)
    sock.close()
    good = solution(payload)
    tampered = {**good, "challenge": {**good["challenge"], "difficulty": 2}}
    assert code_of(submit(port, tampered)) == "bad_signature"
    assert code_of(submit(port, good, source="127.0.0.2")) == "wrong_address"
    signer = ChallengeSigner({"k1": KEY.encode()}, "k1")
    old, signature = signer.issue("127.0.0.1", 4, now_ms=1_000, lifetime_ms=1_000)
    assert code_of(submit(port, {"challenge": old.to_json(), "signature": signature,
                                 "nonces": solve(old)[0]})) == "expired"
    bad_nonces = {**good, "nonces": [n ^ 0xFFFF for n in good["nonces"]]}
    assert code_of(submit(port, bad_nonces)) == "insufficient_work"
    assert code_of(submit(port, good)) == "QUOTE"
    assert code_of(submit(port, good)) == "replayed"
    assert good_client_works(port)


def test_simultaneous_submissions(pow_server: Any) -> None:
    """The same solution on two connections at once: exactly one quote."""
    port = pow_server["port"]
    sock, payload = ask(port)
    sock.close()
    data = encode(MessageType.SOLUTION, solution(payload))
    pair = [connect(port), connect(port)]
    for each in pair:
        each.sendall(data)
    answers = sorted(code_of(read_frame(each)) for each in pair)
    for each in pair:
        each.close()
    assert answers == ["QUOTE", "replayed"]


def test_too_many_connections_from_one_address(pow_server: Any) -> None:
    """Past max_connections_per_client an address is told busy; others are served."""
    port = pow_server["port"]
    held = [connect(port) for _ in range(6)]
    try:
        with connect(port) as extra:
            assert code_of(read_frame(extra)) == "busy"
        sock, payload = ask(port, source="127.0.0.3")
        with sock:
            sock.sendall(encode(MessageType.SOLUTION, solution(payload)))
            assert read_frame(sock).type == MessageType.QUOTE
    finally:
        for sock in held:
            sock.close()


def test_client_cli_fetches_quotes(pow_server: Any) -> None:
    """appliance-pow fetches several quotes (reconnecting after each round) as JSON."""
    result = run_command("appliance-pow", f"127.0.0.1:{pow_server['port']}", "--count", "3",
                         "--json", "--workers", "2")
    assert result.returncode == 0, result.stderr
    quotes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(quotes) == 3 and all(q["quote"] and q["hashes"] > 0 for q in quotes)
    text = run_command("appliance-pow", f"127.0.0.1:{pow_server['port']}")
    assert text.returncode == 0 and "    - " in text.stdout


def test_client_cli_explains_errors(tmp_path: Path) -> None:
    """The client names the error: rate limited, and cannot connect."""
    server = start(tmp_path, "rate_limit = 1/m\n")
    try:
        result = run_command("appliance-pow", f"127.0.0.1:{server['port']}", "--count", "2")
        assert result.returncode == 1
        assert "rate_limited: too many challenges from this address" in result.stderr
    finally:
        server["process"].stop()
    refused = run_command("appliance-pow", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 3 and "cannot connect" in refused.stderr


def test_two_appliances_share_replay_and_limits_in_redis(tmp_path: Path) -> None:
    """With Redis, a solution redeemed on one appliance is a replay on the other, and
    the per-client bucket is shared."""
    redis = RedisServer()
    a = b = None
    try:
        a = start(tmp_path, "rate_limit = 4/m\n", redis_port=redis.port, name="a")
        b = start(tmp_path, "rate_limit = 4/m\n", redis_port=redis.port, name="b")
        sock, payload = ask(a["port"])
        sock.close()
        good = solution(payload)
        assert code_of(submit(b["port"], good)) == "QUOTE"
        assert code_of(submit(a["port"], good)) == "replayed"
        # Four challenges per minute across both: one used above, three more, then refused.
        answers = []
        for port in (a["port"], b["port"], a["port"], b["port"]):
            with connect(port) as sock:
                sock.sendall(encode(MessageType.CHALLENGE_REQUEST, {}))
                answers.append(code_of(read_frame(sock)))
        assert answers == ["CHALLENGE", "CHALLENGE", "CHALLENGE", "rate_limited"]
    finally:
        for server in (a, b):
            if server is not None:
                server["process"].stop()
        redis.close()


class QuoteAPIHandler(BaseHTTPRequestHandler):
    """A quote API in the common shape: a JSON list of {q, a} objects."""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        body = json.dumps([{"q": "An API quote.", "a": "The API"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def test_quote_api_and_fallback(tmp_path: Path) -> None:
    """Quotes come from the API while it answers and from the file once it is gone."""
    api = ThreadingHTTPServer(("127.0.0.1", 0), QuoteAPIHandler)
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    server = start(tmp_path, f"quotes_url = http://127.0.0.1:{api.server_port}/quotes\n"
                   "quotes_refresh = 1s\nquotes_cache_ttl = 1s\nquotes_timeout = 500ms\n"
                   "rate_limit = 1000/s\n")
    process: ApplianceProcess = server["process"]
    admin = server["admin"]

    def metric(name: str) -> float:
        for line in http_get(admin, "/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def quote() -> str:
        sock, payload = ask(server["port"])
        with sock:
            sock.sendall(encode(MessageType.SOLUTION, solution(payload)))
            return read_frame(sock).payload["quote"]

    try:
        process.wait_until(lambda: metric('appliance_pow_quote_api_fetches_total{result="ok"}')
                           >= 1, what="a fetch from the quote API")
        assert quote() == "An API quote."
        api.shutdown()
        api.server_close()
        process.wait_until(lambda: metric(
            'appliance_pow_quote_api_fetches_total{result="failed"}') >= 1,
            what="a failed fetch")
        process.wait_until(lambda: quote() != "An API quote.", what="fallback to the file")
        assert metric('appliance_pow_quotes_served_total{source="file"}') >= 1
    finally:
        process.stop()

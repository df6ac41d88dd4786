"""Tests for the admin port over real HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from tests.canary import CANARY, CANARY_ENV, check_text
from tests.inprocess import port_of, start_appliance, stop

TOKEN_ADMIN = ("[admin]\nlisten = tcp:0:interface=127.0.0.1\ntoken = ${env:" + CANARY_ENV + "}\n"
               "[echo]\nlisten = tcp:0:interface=127.0.0.1\n")


async def get(port: int, path: str, **kwargs: Any) -> tuple[int, bytes, Any]:
    """GET a path on the admin port; return status, body and headers."""
    response = await treq.get(f"http://127.0.0.1:{port}{path}", timeout=5, **kwargs)
    body = await response.content()
    return response.code, body, response.headers


@pytest_twisted.ensureDeferred
async def test_probes_status_and_metrics(reactor: Any, tmp_path: Path) -> None:
    """healthz, readyz, status and metrics answer; unknown paths are 404, POST is 405."""
    root = start_appliance(reactor, tmp_path, "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
                           "[echo]\nlisten = tcp:0:interface=127.0.0.1\n")
    port = port_of(root, "admin")
    try:
        assert (await get(port, "/healthz"))[:2] == (200, b"ok\n")
        code, body, _ = await get(port, "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "reason": ""}
        code, body, _ = await get(port, "/status")
        status = json.loads(body)
        assert status["services"]["echo"]["listeners"][0]["address"].startswith("127.0.0.1:")
        assert status["dependencies"]["redis"] == {"state": "disabled"}
        code, body, headers = await get(port, "/metrics")
        assert code == 200
        assert headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
        text = body.decode()
        for name in ("process_resident_memory_bytes", "appliance_reactor_lag_seconds_bucket",
                     'appliance_service_ready{service="echo"} 1.0', "appliance_info{",
                     "appliance_echo_lines_total"):
            assert name in text, name
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/healthz/extra"))[0] == 404
        response = await treq.post(f"http://127.0.0.1:{port}/readyz", b"", timeout=5)
        assert response.code == 405
        await response.content()
    finally:
        await stop(root)


@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_while_draining(reactor: Any, tmp_path: Path) -> None:
    """Once draining starts /readyz answers 503 with the reason."""
    root = start_appliance(reactor, tmp_path, "[appliance]\nshutdown_delay = 300ms\n"
                           "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
                           "[echo]\nlisten = tcp:0:interface=127.0.0.1\n")
    port = port_of(root, "admin")
    stopping = root.stopService()
    code, body, _ = await get(port, "/readyz")
    assert code == 503 and json.loads(body) == {"ready": False, "reason": "draining"}
    await stopping


@pytest_twisted.ensureDeferred
async def test_bearer_token_guards_metrics_and_status(reactor: Any, tmp_path: Path) -> None:
    """With a token, /metrics and /status need it; probes stay open; nothing echoes it."""
    root = start_appliance(reactor, tmp_path, TOKEN_ADMIN)
    port = port_of(root, "admin")
    try:
        for path in ("/metrics", "/status"):
            code, body, headers = await get(port, path)
            assert code == 401 and headers.getRawHeaders("www-authenticate")
            code, _, _ = await get(port, path, headers={"Authorization": "Bearer wrong"})
            assert code == 401
            code, body, _ = await get(port, path,
                                      headers={"Authorization": f"Bearer {CANARY}"})
            assert code == 200
            assert CANARY not in body.decode()
            check_text(body.decode(), f"admin {path}")
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz"))[0] == 200
    finally:
        await stop(root)


@pytest_twisted.ensureDeferred
async def test_promtool_accepts_metrics(reactor: Any, tmp_path: Path) -> None:
    """promtool check metrics finds no problem in the exposition."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs it)")
    root = start_appliance(reactor, tmp_path, "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
                           "[echo]\nlisten = tcp:0:interface=127.0.0.1\n")
    try:
        _, body, _ = await get(port_of(root, "admin"), "/metrics")
    finally:
        await stop(root)
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""

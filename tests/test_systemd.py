"""
Tests for the systemd units (systemd-analyze verify) and for socket
activation with systemd's own systemd-socket-activate.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.ports import free_port
from tests.processes import BIN, ROOT, ApplianceProcess, connect, environment, http_get

pytestmark = pytest.mark.slow


def test_units_verify_cleanly(tmp_path: Path) -> None:
    """Both units pass systemd-analyze verify with no warning at all."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs systemd)")
    for name in ("appliance.service", "appliance.socket"):
        text = (ROOT / "systemd" / name).read_text()
        # Point the unit at this checkout's venv so the ExecStart checks run.
        (tmp_path / name).write_text(text.replace("/opt/appliance/venv", str(BIN.parent)))
    result = subprocess.run([analyze, "verify", str(tmp_path / "appliance.service"),
                             str(tmp_path / "appliance.socket")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_service_unit_settings() -> None:
    """The service is Type=notify, reloads with SIGHUP, waits past the drain, is hardened."""
    unit = (ROOT / "systemd" / "appliance.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "TimeoutStopSec=45",
                 "User=appliance", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "PrivateTmp=yes", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "WatchdogSec=30", "RestartPreventExitStatus=78"):
        assert f"\n{line}\n" in unit, line
    shipped_timeout = 30  # [appliance] shutdown_timeout in etc/appliance.ini
    assert "shutdown_timeout = 30s" in (ROOT / "etc" / "appliance.ini").read_text()
    assert 45 > shipped_timeout


def test_socket_activation(tmp_path: Path) -> None:
    """Listeners configured as systemd:domain=INET:name=... adopt sockets systemd passed."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    admin, echo = free_port(), free_port()
    config = tmp_path / "appliance.ini"
    config.write_text(textwrap.dedent("""
        [admin]
        listen = systemd:domain=INET:name=admin
        [echo]
        listen = systemd:domain=INET:name=echo
        """))
    output = tmp_path / "activated.log"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{admin}", "-l", f"127.0.0.1:{echo}",
             "--fdname=admin:echo", "-E", "PYTHONPATH",
             str(BIN / "twistd"), "-n", "--pidfile=", "appliance", "--config", str(config)],
            stdout=sink, stderr=subprocess.STDOUT, env=environment(), cwd=tmp_path)
    try:
        # The first connection makes systemd-socket-activate exec the appliance.
        with connect_when_bound(process, echo) as client:
            client.sendall(b"activated\n")
            assert client.recv(100) == b"activated\n"
        assert http_get(admin, "/readyz")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "appliance stopped" in output.read_text()


def connect_when_bound(process: subprocess.Popen[bytes], port: int,
                       timeout: float = 15.0) -> socket.socket:
    """Connect once systemd-socket-activate has bound the port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(port, timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            try:
                process.wait(0.05)  # returns early only if it died
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError("systemd-socket-activate exited early") from None


def test_systemd_endpoint_without_activation_fails_start(tmp_path: Path) -> None:
    """Without inherited sockets, a systemd: listener fails the start clearly."""
    config = tmp_path / "appliance.ini"
    config.write_text(f"[admin]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
                      "[echo]\nlisten = systemd:domain=INET:name=echo\n")
    process = ApplianceProcess(config, tmp_path)
    try:
        assert process.wait() == 1
    finally:
        process.stop()
    assert "cannot start echo: cannot listen on systemd:domain=INET:name=echo" in process.output()

"""
End-to-end tests of the real process: C{twistd -n appliance} and the
C{appliance} command, run as subprocesses.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from tests.canary import CANARY, CANARY_ENV
from tests.harness.ports import free_port
from tests.processes import (
    BIN,
    ROOT,
    ApplianceProcess,
    connect,
    environment,
    http_get,
    run_command,
)

pytestmark = pytest.mark.slow


def test_plugin_is_discoverable() -> None:
    """Twisted's plugin system finds the appliance service maker."""
    names = [maker.tapname for maker in getPlugins(IServiceMaker)]
    assert "appliance" in names
    result = run_command("twistd", "--help")
    assert "appliance" in result.stdout


def test_shipped_config_smoke(tmp_path: Path) -> None:
    """The shipped config runs: probes and metrics answer, SIGTERM exits 0."""
    process = ApplianceProcess(ROOT / "etc" / "appliance.ini", tmp_path)
    try:
        process.wait_healthy(9470)
        assert http_get(9470, "/readyz")[0] == 200
        code, metrics = http_get(9470, "/metrics")
        assert code == 200 and b"appliance_service_ready{service=\"echo\"} 1.0" in metrics
        with connect(9471) as client:
            client.sendall(b"smoke\n")
            assert client.recv(100) == b"smoke\n"
        quote = run_command("appliance-pow", "127.0.0.1:9472", "--json", "--workers", "2")
        assert quote.returncode == 0 and json.loads(quote.stdout)["difficulty"] == 20
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
        assert any(line["message"] == "appliance stopped" for line in process.log_lines())
    finally:
        process.stop()


def write_config(tmp_path: Path, body: str) -> Path:
    """Write a config file for a subprocess test."""
    path = tmp_path / "appliance.ini"
    path.write_text(textwrap.dedent(body))
    return path


def test_sigterm_drains_in_flight_work(tmp_path: Path) -> None:
    """SIGTERM mid-work: the work completes, new connections are refused,
    /readyz answers 503 during the drain, systemd hears READY then STOPPING,
    and the exit status is 0."""
    admin, echo = free_port(), free_port()
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    config = write_config(tmp_path, f"""
        [appliance]
        shutdown_timeout = 20s
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        [echo]
        listen = tcp:{echo}:interface=127.0.0.1
        delay = 2s
        """)
    process = ApplianceProcess(config, tmp_path, env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        assert notify.recv(4096).startswith(b"READY=1")
        assert http_get(admin, "/readyz")[0] == 200  # READY came after binding
        client = connect(echo, timeout=10)
        client.sendall(b"in-flight\n")
        process.wait_until(lambda: b'"connections": 1' in http_get(admin, "/status")[1],
                           what="the connection to be tracked")
        process.signal(signal.SIGTERM)
        assert notify.recv(4096).startswith(b"STOPPING=1")
        code, body = http_get(admin, "/readyz")
        assert code == 503 and json.loads(body)["reason"] == "draining"
        with pytest.raises(ConnectionRefusedError):
            connect(echo).close()
        assert client.recv(100) == b"in-flight\n"
        assert client.recv(100) == b""  # then the server closes it
        assert process.wait() == 0
    finally:
        process.stop()
        notify.close()


def test_broken_config_is_reported_whole(tmp_path: Path) -> None:
    """A config with several problems: all reported, exit 78, nothing started."""
    admin = free_port()
    config = write_config(tmp_path, f"""
        [appliance]
        shutdown_timeout = soon
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = not-a-reference
        [echo]
        listen = tcp:what
        colour = blue
        """)
    for command in (["appliance", "check-config", str(config)],
                    ["twistd", "-n", "--pidfile=", "appliance", "--config", str(config)],
                    ["twistd", "appliance", "--check", "--config", str(config)]):
        result = run_command(*command)
        assert result.returncode == 78, result
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 4, result.stderr
        assert f"error: {config}: [echo] colour: unknown key" in errors
        assert "4 problems found; nothing was started" in result.stderr
        assert "Traceback" not in result.stderr
    assert http_get(admin, "/healthz")[0] == 0


def test_check_config_accepts_good_config() -> None:
    """check-config prints a summary and exits 0 for the shipped file."""
    result = run_command("appliance", "check-config", str(ROOT / "etc" / "appliance.ini"))
    assert result.returncode == 0
    assert "OK" in result.stdout and "services: echo, pow" in result.stdout
    result = run_command("twistd", "appliance", "--check", "--config",
                         str(ROOT / "etc" / "appliance.ini"))
    assert result.returncode == 0 and "OK" in result.stdout


def test_port_taken_fails_start_cleanly(tmp_path: Path) -> None:
    """A taken port stops the start with a clear message and a non-zero exit."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    admin = free_port()
    config = write_config(tmp_path, f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        [echo]
        listen = tcp:{taken}:interface=127.0.0.1
        """)
    process = ApplianceProcess(config, tmp_path)
    try:
        assert process.wait() == 1
    finally:
        process.stop()
        blocker.close()
    output = process.output()
    assert f"cannot start echo: cannot listen on tcp:{taken}:interface=127.0.0.1" in output
    assert "Address already in use" in output and "Traceback" not in output
    assert http_get(admin, "/healthz")[0] == 0


def test_sighup_reloads_or_keeps_config(tmp_path: Path) -> None:
    """SIGHUP applies a valid change and logs and ignores an invalid one."""
    admin, echo = free_port(), free_port()
    base = f"[admin]\nlisten = tcp:{admin}:interface=127.0.0.1\n" \
           f"[echo]\nlisten = tcp:{echo}:interface=127.0.0.1\n"
    config = write_config(tmp_path, base)
    process = ApplianceProcess(config, tmp_path)
    try:
        process.wait_healthy(admin)
        config.write_text(base + "max_line_length = 4\n")
        process.signal(signal.SIGHUP)
        process.wait_until(lambda: any(line["message"] == "reload done"
                                       for line in process.log_lines()), what="reload")
        with connect(echo) as client:
            client.sendall(b"too long\n")
            assert client.recv(100) == b"ERR line too long\n"
        config.write_text(base + "max_line_length = huge\n")
        process.signal(signal.SIGHUP)
        process.wait_until(lambda: any("keeping the running one" in line["message"]
                                       for line in process.log_lines()), what="refusal")
        assert any("[echo] max_line_length: expected a size" in line["message"]
                   for line in process.log_lines())
        with connect(echo) as client:
            client.sendall(b"ok\n")
            assert client.recv(100) == b"ok\n"
        status = json.loads(http_get(admin, "/status")[1])
        assert status["config"]["reloads"] == {"applied": 1, "invalid": 1, "failed": 0}
        process.signal(signal.SIGINT)
        assert process.wait() == 0
    finally:
        process.stop()


def test_third_party_service_plugin(tmp_path: Path) -> None:
    """A module dropped into twisted/plugins/ on sys.path adds a service."""
    plugins = tmp_path / "thirdparty" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "greeter_plugin.py").write_text(textwrap.dedent("""
        from appliance.host.plugin import ServicePlugin
        greeter = ServicePlugin(name="greeter", module="greeter_service", order=50,
                                description="says hello")
        """))
    (tmp_path / "thirdparty" / "greeter_service.py").write_text(textwrap.dedent("""
        from twisted.internet.protocol import Factory, Protocol
        from appliance.host.hosted import HostedService
        from appliance.host.values import parse_endpoint

        class Greet(Protocol):
            def connectionMade(self):
                self.transport.write(b"hello\\n")
                self.transport.loseConnection()

        def parse(section):
            return section.get("listen", parse_endpoint)

        def build(listen, runtime):
            service = HostedService("greeter", runtime)
            service.listen(listen, Factory.forProtocol(Greet))
            return service
        """))
    admin, greeter = free_port(), free_port()
    config = write_config(tmp_path, f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        [greeter]
        listen = tcp:{greeter}:interface=127.0.0.1
        """)
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path / 'thirdparty'}"}
    result = run_command("appliance", "check-config", str(config), env=env)
    assert result.returncode == 0 and "services: greeter" in result.stdout, result
    process = ApplianceProcess(config, tmp_path, env=env)
    try:
        process.wait_healthy(admin)
        with connect(greeter) as client:
            assert client.recv(100) == b"hello\n"
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
    finally:
        process.stop()


def test_canary_secret_stays_out_of_everything(tmp_path: Path) -> None:
    """A secret from ${env:...} never shows in logs, /metrics, /status or errors."""
    admin, echo = free_port(), free_port()
    config = write_config(tmp_path, f"""
        [appliance]
        log_level = debug
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = ${{env:{CANARY_ENV}}}
        [echo]
        listen = tcp:{echo}:interface=127.0.0.1
        """)
    process = ApplianceProcess(config, tmp_path)
    try:
        process.wait_healthy(admin)
        bearer = {"Authorization": f"Bearer {CANARY}"}
        for path in ("/metrics", "/status"):
            code, body = http_get(admin, path, bearer)
            assert code == 200 and CANARY.encode() not in body
            code, body = http_get(admin, path, {"Authorization": f"Bearer {CANARY}x"})
            assert code == 401 and CANARY.encode() not in body
        with connect(echo) as client:  # a client echoing the secret is its own business,
            client.sendall(b"hello\n")  # but the appliance must not log it either
            assert client.recv(100) == b"hello\n"
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
    finally:
        process.stop()
    assert CANARY not in process.output()
    broken = write_config(tmp_path, f"""
        [admin]
        token = ${{env:{CANARY_ENV}}}
        listen = tcp:bad
        """)
    result = run_command("appliance", "check-config", str(broken))
    assert result.returncode == 78 and CANARY not in result.stdout + result.stderr


def test_audit_log_records_lifecycle_and_verifies(tmp_path: Path) -> None:
    """With [audit], start, reloads and stop are audited in a chain audit-verify accepts;
    an edited line is named."""
    admin = free_port()
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    config = write_config(tmp_path, f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        [audit]
        path = {audit_dir}/audit.jsonl
        fsync = always
        """)
    process = ApplianceProcess(config, tmp_path)
    try:
        process.wait_healthy(admin)
        process.signal(signal.SIGHUP)
        process.wait_until(lambda: any(line["message"] == "reload done"
                                       for line in process.log_lines()), what="reload")
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
    finally:
        process.stop()
    path = audit_dir / "audit.jsonl"
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["appliance.started", "config.reload", "appliance.stopping",
                      "appliance.stopped"]
    result = run_command("appliance", "audit-verify", str(path))
    assert result.returncode == 0 and "chain intact" in result.stdout
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"applied"', '"invalid"')
    path.write_text("\n".join(lines) + "\n")
    result = run_command("appliance", "audit-verify", str(path))
    assert result.returncode == 1 and ":2:" in result.stderr, result.stderr


def test_secrets_command_manages_the_store(tmp_path: Path) -> None:
    """appliance secrets init/put/list work through the main command; values come from
    stdin and never show in its output."""
    store, key = str(tmp_path / "store.json"), str(tmp_path / "store.key")
    common = ("--store", store, "--key-file", key)
    assert run_command("appliance", "secrets", "init", *common).returncode == 0
    put = subprocess.run([str(BIN / "appliance"), "secrets", "put", "api", *common],
                         input=CANARY, capture_output=True, text=True, timeout=60,
                         env=environment())
    assert put.returncode == 0 and CANARY not in put.stdout + put.stderr
    listed = run_command("appliance", "secrets", "list", *common)
    assert listed.returncode == 0 and "api" in listed.stdout and CANARY not in listed.stdout

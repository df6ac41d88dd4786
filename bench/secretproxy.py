"""
secretproxy: the secret proxy with every feature on (session-secret
authentication, builtin policy with a decision audit log, a cached secret
from the encrypted file store, header injection, rate limits, bulkhead,
egress vetting, metrics) in front of a local nginx returning a small body,
against nginx itself as the peer proxy: C{proxy_pass} to a keep-alive
upstream block with C{proxy_set_header Authorization}. wrk -c32, req/s and
p99 for both. With C{--reference}, L{bench.leanproxy} (the leanest Twisted
proxy: no features) runs in each round too, to read ours against what the
reactor itself reaches here.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.common import Cleanup, Result, free_port, python_env, say, temp_dir
from bench.machine import version_of
from bench.procs import cpu_plan, require_binary
from bench.servers import start_appliance, start_nginx, start_python_server
from bench.wrk import Contender, add_wrk_arguments, side_by_side

NAME = "secretproxy"
SUMMARY = "secretproxy (all features) vs nginx proxy_pass with header injection (wrk, req/s)"
PACKAGES = ("nginx", "wrk")

BODY = '{"id":"ch_123","object":"charge","amount":2000,"currency":"eur","paid":true}'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_wrk_arguments(parser)
    parser.add_argument("--reference", action="store_true",
                        help="also run the leanest Twisted proxy (bench.leanproxy) in each "
                             "round and print ours as a ratio of it")


def start_lean_proxy(cleanup: Cleanup, workdir: Path, upstream_port: int, injected: str,
                     cpus: str | None) -> int:
    """Start L{bench.leanproxy}; return its port once it listens."""
    _, port = start_python_server(
        cleanup, "bench.leanproxy", ["--upstream-port", str(upstream_port), "--inject", injected],
        workdir, "lean-proxy", cpus)
    return port


def _nginx_locations(upstream_port: int, injected: str) -> str:
    """The peer proxy's location: keep-alive upstream, the key injected."""
    return f"""
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host api.upstream.test;
            proxy_set_header Authorization "Bearer {injected}";
        }}
    """


def run(args: argparse.Namespace) -> Result:
    server_cpus, load_cpus = cpu_plan(args.pin)
    say(f"peer: {version_of([require_binary('nginx'), '-v'])}; "
        f"load: {version_of([require_binary('wrk'), '-v'])}")
    with Cleanup() as cleanup:
        work = temp_dir(cleanup, "secretproxy")
        api_key = "sk_bench_" + secrets.token_hex(16)
        session = "bench-session-" + secrets.token_hex(16)
        upstream = start_nginx(cleanup, f"""
            location / {{
                default_type application/json;
                return 200 '{BODY}';
            }}
        """, ready_path="/", cpus=server_cpus)
        peer = start_nginx(cleanup, _nginx_locations(upstream.port, api_key),
                           ready_path="/", cpus=server_cpus,
                           http_extra=f"upstream bench_upstream {{ server 127.0.0.1:"
                                      f"{upstream.port}; keepalive 64; }}")
        store, key = work / "store.json", work / "store.key"
        cli = [sys.executable, "-m", "appliance.secretproxy.secrets.cli", "--store",
               str(store), "--key-file", str(key)]
        env = python_env()
        subprocess.run(cli + ["init"], check=True, capture_output=True, env=env, timeout=60)
        subprocess.run(cli + ["put", "api-key"], input=api_key.encode(), check=True,
                       capture_output=True, env=env, timeout=60)
        session_file = work / "session"
        session_file.write_text(session)
        session_file.chmod(0o600)
        audit_dir = work / "audit"
        audit_dir.mkdir()

        def service() -> str:
            port = free_port()
            service.port = port  # type: ignore[attr-defined]
            return textwrap.dedent(f"""
                [audit]
                path = {audit_dir}/audit.jsonl
                fsync = interval
                [secretproxy]
                listen = tcp:{port}:interface=127.0.0.1
                store_path = {store}
                store_key_file = {key}
                rate_limit = 1000000/s
                identity_rate_limit = 1000000/s
                [secretproxy.session:bench]
                secret = file:{session_file}
                [secretproxy.upstream:api]
                hosts = api.upstream.test
                scheme = http
                host = api.upstream.test
                address = 127.0.0.1
                port = {upstream.port}
                secret = api-key
                allow = loopback
                rate_limit = 1000000/s
                max_concurrent = 256
                [secretproxy.rule:no-admin]
                effect = deny
                path = /admin/**
                [secretproxy.rule:bench]
                identity = bench
                upstream = api
                method = GET, POST
                path = /v1/**
                """)

        appliance = start_appliance(cleanup, cpus=server_cpus, extra_config=service)
        proxy_url = f"http://127.0.0.1:{service.port}/v1/charges/ch_123"  # type: ignore
        say(f"upstream nginx pid {upstream.process.pid}, peer nginx pid {peer.process.pid}, "
            f"appliance pid {appliance.process.pid}")
        references = []
        if args.reference:
            lean_port = start_lean_proxy(cleanup, work, upstream.port,
                                         f"Authorization: Bearer {api_key}", server_cpus)
            references.append(Contender("lean-twisted",
                                        f"http://127.0.0.1:{lean_port}/v1/charges/ch_123"))
        result = side_by_side(
            args, NAME, references=references,
            ours=Contender("secretproxy", proxy_url,
                           headers=("X-Upstream-Host: api.upstream.test",
                                    f"X-Session-Secret: {session}")),
            peer=Contender("nginx", peer.url("/v1/charges/ch_123")),
            wrk_cpus=load_cpus,
        )
        audited = sum(1 for _ in open(audit_dir / "audit.jsonl", "rb"))
        say(f"audit lines written: {audited}")
        return result

"""
The appliance configuration: the host's own sections and every enabled
service's section, validated in one pass that reports every problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from appliance.host.audit import AuditConfig, parse_audit
from appliance.host.ini import ConfigError, ConfigProblem, ConfigReader, Section, read_ini
from appliance.host.plugin import IServicePlugin
from appliance.host.secret import Secret
from appliance.host.tls_config import (
    ClientTLSConfig,
    ServerTLSConfig,
    parse_client_tls,
    parse_server_tls,
)
from appliance.host.values import (
    one_of,
    parse_bool,
    parse_duration,
    parse_endpoint,
)

EX_CONFIG = 78
"""Exit status for an invalid configuration (sysexits.h)."""

DEFAULT_ADMIN_LISTEN = "tcp:9470:interface=127.0.0.1"


@frozen
class RedisConfig:
    """
    Where the shared Redis is and how long to wait for it.
    """

    host: str
    port: int
    db: int
    password: Secret | None
    timeout: float
    required: bool

    @property
    def address(self) -> str:
        """host:port/db, for status pages (no password)."""
        return f"{self.host}:{self.port}/{self.db}"


@frozen
class HostConfig:
    """
    The C{[appliance]} section.
    """

    shutdown_timeout: float
    shutdown_delay: float
    log_level: str
    redis: RedisConfig | None


@frozen
class AdminConfig:
    """
    The C{[admin]} section: the operations HTTP port.
    """

    listen: str
    token: Secret | None
    tls: str | None = None


@frozen
class ServiceConfig:
    """
    One enabled service: its plugin and its parsed config.
    """

    plugin: IServicePlugin
    config: Any

    @property
    def name(self) -> str:
        """The service's section name."""
        return str(self.plugin.name)


@frozen
class ApplianceConfig:
    """
    The whole validated configuration.
    """

    path: str
    files: tuple[str, ...]
    host: HostConfig
    admin: AdminConfig
    services: tuple[ServiceConfig, ...]
    tls_servers: tuple[ServerTLSConfig, ...] = ()
    tls_clients: tuple[ClientTLSConfig, ...] = ()
    audit: AuditConfig | None = None

    def service(self, name: str) -> ServiceConfig | None:
        """The enabled service called C{name}, if any."""
        for service in self.services:
            if service.name == name:
                return service
        return None


def load_config(
    path: str,
    plugins: Sequence[IServicePlugin],
    environ: Mapping[str, str] | None = None,
) -> ApplianceConfig:
    """
    Read and validate C{path} and its includes.

    Raises L{ConfigError} listing every problem found.
    """
    problems: list[ConfigProblem] = []
    raw = read_ini(path, problems)
    reader = ConfigReader(raw, problems, environ)
    host = _parse_host(reader.section("appliance"))
    admin = _parse_admin(reader.section("admin"))
    tls_servers = tuple(parse_server_tls(name, section)
                        for name, section in reader.labelled("tls"))
    tls_clients = tuple(parse_client_tls(name, section)
                        for name, section in reader.labelled("tls-client"))
    audit = parse_audit(reader.section("audit")) if reader.present("audit") else None
    services = []
    for plugin in plugins:
        if not reader.present(plugin.name):
            continue
        section = reader.section(plugin.name)
        if not section.get("enabled", parse_bool, True):
            _claim_all(reader, plugin.name)
            continue
        before = len(problems)
        config = plugin.parse(section)
        if len(problems) == before:
            services.append(ServiceConfig(plugin, config))
    reader.finish()
    _suggest(problems, reader, plugins)
    if problems:
        raise ConfigError(problems)
    return ApplianceConfig(
        path=raw.main_file,
        files=tuple(raw.files),
        host=host,
        admin=admin,
        services=tuple(services),
        tls_servers=tls_servers,
        tls_clients=tls_clients,
        audit=audit,
    )


def secret_or_none(section: Section, key: str) -> Secret | None:
    """Read an optional secret reference from C{section}."""
    return section.secret(key, None)  # type: ignore[no-any-return]


def _parse_host(section: Section) -> HostConfig:
    return HostConfig(
        shutdown_timeout=section.get("shutdown_timeout", parse_duration, 30.0),
        shutdown_delay=section.get("shutdown_delay", parse_duration, 0.0),
        log_level=section.get("log_level", one_of("debug", "info", "warn", "error"), "info"),
        redis=_parse_redis(section),
    )


def _parse_redis(section: Section) -> RedisConfig | None:
    url = section.get("redis", str, "").strip()
    password = secret_or_none(section, "redis_password")
    timeout = section.get("redis_timeout", parse_duration, 2.0)
    required = section.get("redis_required", parse_bool, True)
    if not url:
        if password is not None:
            section.problem("redis_password", "is set but [appliance] redis is not")
        return None
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        port = -1
    db_text = parts.path.lstrip("/") or "0"
    if (parts.scheme != "redis" or not parts.hostname or port <= 0
            or parts.password or parts.username or not db_text.isdigit()
            or parts.query or parts.fragment):
        section.problem(
            "redis",
            "expected redis://HOST:PORT/DB without a password "
            "(set redis_password = ${env:NAME} or file:/path)",
        )
        return None
    return RedisConfig(
        host=parts.hostname, port=port, db=int(db_text),
        password=password, timeout=timeout, required=required,
    )


def _parse_admin(section: Section) -> AdminConfig:
    return AdminConfig(
        listen=section.get("listen", parse_endpoint, DEFAULT_ADMIN_LISTEN),
        token=secret_or_none(section, "token"),
        tls=section.reference("tls", "tls", None),
    )


def _claim_all(reader: ConfigReader, name: str) -> None:
    """A disabled service's sections are known but not validated."""
    for section_name in list(reader.raw.sections):
        if section_name == name or section_name.startswith(name + "."):
            section = reader.section(section_name)
            for key in section.keys():
                section.mark_read(key)


_UNKNOWN = re.compile(r"^unknown (key|section)$")


def _suggest(problems: list[ConfigProblem], reader: ConfigReader,
             plugins: Sequence[IServicePlugin]) -> None:
    """Add 'did you mean' hints to unknown-name problems."""
    sections = ["appliance", "admin", "audit", "tls:NAME", "tls-client:NAME"] + [
        str(p.name) for p in plugins]
    for index, problem in enumerate(problems):
        match = _UNKNOWN.match(problem.message)
        if match is None:
            continue
        if match.group(1) == "section" and problem.section is not None:
            guess = difflib.get_close_matches(problem.section, sections, n=1)
            hint = f"; did you mean [{guess[0]}]?" if guess else (
                f"; known sections: {', '.join('[' + s + ']' for s in sections)}")
        elif problem.key is not None and problem.section is not None:
            known = sorted(reader.section(problem.section).known_keys())
            guess = difflib.get_close_matches(problem.key, known, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
        else:
            hint = ""
        problems[index] = ConfigProblem(problem.file, problem.section, problem.key,
                                        problem.message + hint)


__all__ = [
    "AdminConfig", "ApplianceConfig", "ConfigError", "ConfigProblem", "EX_CONFIG",
    "HostConfig", "RedisConfig", "ServiceConfig", "load_config", "secret_or_none",
]

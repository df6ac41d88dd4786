"""
C{[tls:NAME]} (server) and C{[tls-client:NAME]} (upstream client) sections,
and loading their certificate files into validated key material.

Loading reads files: call it at config load (startup) or from a thread
(reload), never from a reactor callback.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from appliance.host.ini import Section
from appliance.host.secret import Secret
from appliance.host.values import in_range, one_of, parse_duration, parse_list

TLS_VERSIONS = ("1.2", "1.3")


class TLSMaterialError(ValueError):
    """Certificate files that cannot be used; the message says why."""


@frozen
class AllowedClient:
    """
    One allowlist entry: a SAN kind (dns, uri, ip) and a value; C{prefix}
    entries (written with a trailing C{*}) match any value starting with it;
    C{ip} entries may be networks.
    """

    kind: str
    value: str
    prefix: bool = False

    def matches(self, kind: str, value: str) -> bool:
        """Whether a SAN of C{kind} with C{value} is allowed by this entry."""
        if kind != self.kind:
            return False
        if self.kind == "ip":
            try:
                return ipaddress.ip_address(value) in ipaddress.ip_network(self.value)
            except ValueError:
                return False
        if self.kind == "dns":
            value = value.lower().rstrip(".")
        return value.startswith(self.value) if self.prefix else value == self.value


def parse_allowed_client(text: str) -> AllowedClient:
    """
    Parse C{dns:name}, C{dns:prefix*}, C{uri:spiffe://td/ns/x}, C{uri:prefix*},
    C{ip:10.0.0.5} or C{ip:10.0.0.0/8}.
    """
    kind, sep, value = text.strip().partition(":")
    kind = kind.lower()
    if not sep or not value or kind not in ("dns", "uri", "ip"):
        raise ValueError(f"expected dns:NAME, uri:URI or ip:ADDRESS[/BITS], got {text!r}")
    prefix = value.endswith("*")
    value = value[:-1] if prefix else value
    if kind == "ip":
        if prefix:
            raise ValueError(f"ip entries take a network (10.0.0.0/8), not *: {text!r}")
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"expected an IP address or network, got {text!r}") from None
        value = str(ipaddress.ip_network(value, strict=False))
    if kind == "dns":
        value = value.lower().rstrip(".")
    if not value:
        raise ValueError(f"an allowlist entry needs a value before *, got {text!r}")
    return AllowedClient(kind, value, prefix)


@frozen
class ServerMaterial:
    """Validated key material for a server context."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes = field(repr=False)
    client_cas: tuple[x509.Certificate, ...]
    fingerprint: tuple[tuple[str, float, int, int], ...]

    @property
    def not_after(self) -> datetime:
        """When the leaf certificate expires."""
        return self.chain[0].not_valid_after_utc


@frozen
class ServerTLSConfig:
    """A C{[tls:NAME]} section."""

    name: str
    certificate: str
    key: str
    key_password: Secret | None
    client_ca: str | None
    client_auth: str
    allowed_clients: tuple[AllowedClient, ...]
    min_version: str
    alpn: tuple[str, ...]
    handshake_timeout: float
    watch_interval: float
    material: ServerMaterial | None = field(eq=False, repr=False, default=None)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file the context is built from."""
        return tuple(p for p in (self.certificate, self.key, self.client_ca) if p)


@frozen
class ClientTLSConfig:
    """A C{[tls-client:NAME]} section: how to verify and authenticate to upstreams."""

    name: str
    ca: str | None
    certificate: str | None
    key: str | None
    min_version: str
    ca_certificates: tuple[x509.Certificate, ...] = field(eq=False, repr=False, default=())


def parse_server_tls(name: str, section: Section) -> ServerTLSConfig:
    """Read and validate a C{[tls:NAME]} section, loading its files."""
    base = os.path.dirname(section.file)
    key_password = section.secret("key_password", None)
    certificate = section.get("certificate", _path(base))
    key = section.get("key", _path(base))
    client_ca = section.get("client_ca", _path(base), None)
    default_auth = "require" if client_ca else "none"
    client_auth = section.get("client_auth", one_of("require", "request", "none"), default_auth)
    config = ServerTLSConfig(
        name=name,
        certificate=certificate,
        key=key,
        key_password=key_password,
        client_ca=client_ca,
        client_auth=client_auth,
        allowed_clients=tuple(_entries(section, "allowed_clients")),
        min_version=section.get("min_version", one_of(*TLS_VERSIONS), "1.3"),
        alpn=section.get("alpn", parse_list, ()),
        handshake_timeout=section.get("handshake_timeout", in_range(parse_duration, 0.01), 10.0),
        watch_interval=section.get("watch_interval", in_range(parse_duration, 0), 10.0),
    )
    if client_auth != "none" and not client_ca:
        section.problem("client_auth", "needs client_ca (the CA that signs client certificates)")
    if config.allowed_clients and client_auth == "none":
        section.problem("allowed_clients", "needs client_ca: without client certificates "
                        "there is no identity to check")
    if _complete(certificate, key, client_ca, client_auth, key_password):
        try:
            material = load_server_material(config)
        except TLSMaterialError as error:
            section.problem(None, str(error))
        else:
            config = _with_material(config, material)
    return config


def parse_client_tls(name: str, section: Section) -> ClientTLSConfig:
    """Read and validate a C{[tls-client:NAME]} section."""
    base = os.path.dirname(section.file)
    ca = section.get("ca", _path(base), None)
    certificate = section.get("certificate", _path(base), None)
    key = section.get("key", _path(base), None)
    if (certificate is None) != (key is None):
        section.problem("key" if key is None else "certificate",
                        "a client certificate needs both certificate and key")
    config = ClientTLSConfig(name=name, ca=ca, certificate=certificate, key=key,
                             min_version=section.get("min_version", one_of(*TLS_VERSIONS), "1.2"))
    try:
        cas = _load_certificates(ca, "CA bundle") if isinstance(ca, str) else ()
        if isinstance(certificate, str) and isinstance(key, str):
            chain = _load_certificates(certificate, "certificate")
            _check_key(chain[0], _load_key(key, None), certificate)
            _check_dates(chain[0], certificate)
    except TLSMaterialError as error:
        section.problem(None, str(error))
        return config
    return ClientTLSConfig(name=name, ca=ca, certificate=certificate, key=key,
                           min_version=config.min_version, ca_certificates=cas)


def load_server_material(config: ServerTLSConfig) -> ServerMaterial:
    """
    Read the certificate chain, key and client CAs and check they fit:
    the key matches the leaf, the leaf is currently valid, files are readable
    and the key is not readable by others.
    """
    chain = _load_certificates(config.certificate, "certificate")
    password = config.key_password.reveal().encode() if config.key_password else None
    key = _load_key(config.key, password)
    _check_key(chain[0], key, config.certificate)
    _check_dates(chain[0], config.certificate)
    cas = _load_certificates(config.client_ca, "client CA bundle") if config.client_ca else ()
    return ServerMaterial(chain=chain, key=key, client_cas=cas,
                          fingerprint=file_fingerprint(config.paths))


def file_fingerprint(paths: tuple[str, ...]) -> tuple[tuple[str, float, int, int], ...]:
    """(path, mtime, size, inode) of each file, to notice replacements."""
    prints = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            prints.append((path, 0.0, -1, -1))
        else:
            prints.append((path, info.st_mtime, info.st_size, info.st_ino))
    return tuple(prints)


def _with_material(config: ServerTLSConfig, material: ServerMaterial) -> ServerTLSConfig:
    from attrs import evolve

    return evolve(config, material=material)


def _complete(*values: object) -> bool:
    from appliance.host.ini import INVALID

    return not any(value is INVALID for value in values)


def _path(base: str):  # type: ignore[no-untyped-def]
    def convert(text: str) -> str:
        path = text.strip()
        if not path:
            raise ValueError("expected a file path")
        return os.path.normpath(os.path.join(base, path))

    return convert


def _entries(section: Section, key: str) -> list[AllowedClient]:
    entries = []
    for text in section.get(key, parse_list, ()):
        try:
            entries.append(parse_allowed_client(text))
        except ValueError as error:
            section.problem(key, str(error))
    return entries


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise TLSMaterialError(f"cannot read {what} {path}: {error.strerror}") from None


def _load_certificates(path: str, what: str) -> tuple[x509.Certificate, ...]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSMaterialError(f"{what} {path} holds no PEM certificate") from None
    return tuple(certificates)


def _load_key(path: str, password: bytes | None) -> PrivateKeyTypes:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as error:
        raise TLSMaterialError(f"cannot read key {path}: {error.strerror}") from None
    if mode & 0o007:
        raise TLSMaterialError(f"key {path} is accessible by others (mode {mode:04o}); "
                               "chmod 600 or 640 it")
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as error:
        reason = "it is encrypted: set key_password" if "encrypted" in str(error).lower() else (
            "not a usable PEM private key")
        raise TLSMaterialError(f"cannot load key {path}: {reason}") from None


def _check_key(leaf: x509.Certificate, key: PrivateKeyTypes, path: str) -> None:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    leaf_public = leaf.public_key().public_bytes(serialization.Encoding.DER, fmt)
    key_public = key.public_key().public_bytes(serialization.Encoding.DER, fmt)
    if leaf_public != key_public:
        raise TLSMaterialError(f"certificate {path} does not match its key")


def _check_dates(leaf: x509.Certificate, path: str) -> None:
    now = datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        raise TLSMaterialError(
            f"certificate {path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise TLSMaterialError(
            f"certificate {path} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")

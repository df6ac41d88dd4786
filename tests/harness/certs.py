"""A small test PKI: a self-signed CA that issues server and client certificates.

Everything is written as PEM files into the CA's directory so that servers
(PostgreSQL, nginx, the appliance) and clients (libpq, curl, openssl) can use
the paths directly::

    ca = TestCA(tmp_path)
    server = ca.issue("pg", dns=("localhost",), ips=("127.0.0.1",))
    client = ca.issue("alice", uris=("spiffe://example.org/alice",),
                      client=True, server=False)
    expired = ca.issue("old", dns=("localhost",),
                       not_after=datetime.now(UTC) - timedelta(days=1))

Keys are EC P-256 by default (fast to generate); RSA 2048 is available with
``key_type="rsa"``. Private keys are unencrypted PKCS#8 PEM files with mode
0600; certificates are mode 0644.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: How far in the past ``not_before`` defaults to, to tolerate clock skew.
CLOCK_SKEW = timedelta(minutes=5)
#: Default lifetime of an issued certificate.
DEFAULT_LIFETIME = timedelta(days=7)
#: Lifetime of the CA certificate.
CA_LIFETIME = timedelta(days=365)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Issued:
    """A certificate issued by a :class:`TestCA`, with the paths of its files.

    ``cert_path`` holds only the leaf certificate, ``chain_path`` the leaf
    followed by the CA certificate (what a server may send as its chain),
    ``key_path`` the unencrypted PKCS#8 private key (mode 0600).
    """

    name: str
    cert_path: Path
    key_path: Path
    chain_path: Path
    certificate: x509.Certificate
    private_key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The leaf certificate as PEM bytes."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM bytes."""
        return _key_pem(self.private_key)

    def server_context(self) -> ServerContext:
        """A TLS server context presenting this certificate (for C{listenSSL})."""
        return ServerContext(self)


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """
    A TLS server context for test servers, built from the cryptography
    objects (C{ssl.CertificateOptions} wants pyOpenSSL's deprecated X509 and
    PKey types). C{listenSSL} takes it in either role.
    """

    def __init__(self, issued: Issued) -> None:
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(issued.certificate)
        self._context.use_privatekey(issued.private_key)

    def getContext(self) -> SSL.Context:  # noqa: N802 (Twisted naming)
        return self._context

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:  # noqa: N802
        return SSL.Connection(self._context, None)


class TestCA:
    """A self-signed certificate authority that writes its files to ``directory``.

    Attributes: ``directory``, ``cert_path`` (``ca.crt``), ``key_path``
    (``ca.key``, mode 0600), ``certificate``, ``private_key``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        directory: str | os.PathLike[str],
        common_name: str = "Appliance Test CA",
        key_type: KeyType = "ec",
    ) -> None:
        """Create the CA key and certificate in ``directory`` (created if missing)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.common_name = common_name
        self.private_key: PrivateKey = _new_key(key_type)
        now = datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Appliance tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        public_key = self.private_key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )
        self.cert_path = self.directory / "ca.crt"
        self.key_path = self.directory / "ca.key"
        _write(self.cert_path, self.cert_pem, 0o644)
        _write(self.key_path, _key_pem(self.private_key), 0o600)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM bytes."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        name: str,
        dns: Iterable[str] = (),
        ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        uris: Iterable[str] = (),
        client: bool = False,
        server: bool = True,
        not_after: datetime | None = None,
        not_before: datetime | None = None,
        common_name: str | None = None,
        key_type: KeyType = "ec",
    ) -> Issued:
        """Issue a leaf certificate and write ``<name>.crt``, ``<name>.key``, ``<name>.chain.crt``.

        ``dns``, ``ips`` and ``uris`` (e.g. SPIFFE IDs) become subjectAltName
        entries; ``server``/``client`` select the extended key usages
        (serverAuth/clientAuth). ``not_after`` defaults to 7 days from now and
        may lie in the past to make an expired certificate; ``not_before``
        defaults to 5 minutes ago (or a day before a past ``not_after``).
        Datetimes without a timezone are taken as UTC. The subject CN is
        ``common_name`` or ``name``. Raises ``FileExistsError`` if ``name``
        was already issued by this CA, ``ValueError`` on a bad name or period.
        """
        if not _NAME_RE.match(name) or name == "ca":
            raise ValueError(f"bad certificate name {name!r}")
        cert_path = self.directory / f"{name}.crt"
        key_path = self.directory / f"{name}.key"
        chain_path = self.directory / f"{name}.chain.crt"
        if cert_path.exists():
            raise FileExistsError(cert_path)
        now = datetime.now(UTC)
        after = _utc(not_after) if not_after is not None else now + DEFAULT_LIFETIME
        if not_before is not None:
            before = _utc(not_before)
        else:
            before = min(now - CLOCK_SKEW, after - timedelta(days=1))
        if before >= after:
            raise ValueError("not_before must be earlier than not_after")

        key = _new_key(key_type)
        public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        alt_names += [x509.UniformResourceIdentifier(u) for u in uris]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self.private_key, hashes.SHA256())

        leaf_pem = certificate.public_bytes(serialization.Encoding.PEM)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, leaf_pem, 0o644)
        _write(chain_path, leaf_pem + self.cert_pem, 0o644)
        return Issued(name, cert_path, key_path, chain_path, certificate, key)


def _new_key(key_type: KeyType) -> PrivateKey:
    """Generate a private key of the given type."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial() -> int:
    """A random positive 159-bit serial number."""
    return secrets.randbits(159) | 1


def _utc(moment: datetime) -> datetime:
    """Treat a naive datetime as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (never briefly wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)

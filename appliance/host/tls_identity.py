"""
The identity in a client certificate: its DNS names, URIs (SPIFFE IDs) and
IP addresses from the subjectAltName extension.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen
from cryptography import x509

from appliance.host.tls_config import AllowedClient


@frozen
class PeerIdentity:
    """What a verified client certificate says about its holder."""

    dns: tuple[str, ...]
    uris: tuple[str, ...]
    ips: tuple[str, ...]
    common_name: str | None

    def sans(self) -> Iterable[tuple[str, str]]:
        """Every subjectAltName as (kind, value)."""
        yield from (("dns", value) for value in self.dns)
        yield from (("uri", value) for value in self.uris)
        yield from (("ip", value) for value in self.ips)

    def allowed_by(self, allowlist: Iterable[AllowedClient]) -> bool:
        """Whether any SAN matches any allowlist entry."""
        entries = tuple(allowlist)
        return any(entry.matches(kind, value)
                   for kind, value in self.sans() for entry in entries)

    @property
    def primary(self) -> str:
        """A display name: the first URI, DNS name or IP, else the CN."""
        for values in (self.uris, self.dns, self.ips):
            if values:
                return values[0]
        return self.common_name or ""


def identity_of(certificate: x509.Certificate) -> PeerIdentity:
    """Extract the SANs and CN of a certificate."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = extension.value
        dns = tuple(name.lower().rstrip(".") for name in names.get_values_for_type(x509.DNSName))
        uris = tuple(names.get_values_for_type(x509.UniformResourceIdentifier))
        ips = tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, uris, ips = (), (), ()
    common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(common[0].value) if common else None
    return PeerIdentity(dns=dns, uris=uris, ips=ips, common_name=common_name)

"""
The encrypted store file, without any I/O: parse and encode the JSON
document, seal and open entries.

    {"format": "appliance-secrets", "format_version": 1,
     "key_id": "<16 hex: which key encrypted this file>",
     "secrets": [{"name": "STRIPE_KEY", "version": 3,
                  "nonce": "<base64, 12 bytes>",
                  "ciphertext": "<base64, AES-256-GCM ciphertext + 16-byte tag>",
                  "updated_at": "2026-11-02T10:00:00Z"}, ...]}

Each entry is sealed with AES-256-GCM under a sub-key of the key file
(HKDF "file store encryption"), with its own random 96-bit nonce and the
secret's name (UTF-8) as associated data: an entry moved under another
name, or any changed byte, fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from datetime import UTC, datetime
from typing import Any

from attrs import frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.secretproxy.secrets.base import (
    MAX_VALUE,
    SecretNotFound,
    StoreIntegrityError,
    check_name,
)
from appliance.secretproxy.secrets.crypto import NONCE_BYTES, derive

FORMAT = "appliance-secrets"
FORMAT_VERSION = 1
MAX_DOCUMENT = 16 * 1024 * 1024
"""Largest store file read (bytes)."""

_TAG = 16
_ENTRY_KEYS = frozenset({"name", "version", "nonce", "ciphertext", "updated_at"})
_TOP_KEYS = frozenset({"format", "format_version", "key_id", "secrets"})


class StoreFormatError(ValueError):
    """The store file is not a valid store document; the message says why."""


@frozen
class Entry:
    """One sealed secret as kept in the file."""

    name: str
    version: int
    nonce: bytes
    ciphertext: bytes
    updated_at: str


@frozen
class Document:
    """A parsed store file: the key id and the entries by name, in file order."""

    key_id: str
    entries: dict[str, Entry]


@frozen
class StoreKey:
    """The sub-keys of one key file used by the file store."""

    aead: AESGCM
    key_id: str

    @classmethod
    def from_key(cls, key: bytes) -> StoreKey:
        """Derive the encryption key and key id from a 32-byte key file key."""
        return cls(AESGCM(derive(key, "file store encryption")),
                   derive(key, "file store key id")[:8].hex())


def empty_document(key: StoreKey) -> Document:
    """A store with no secret."""
    return Document(key_id=key.key_id, entries={})


def seal(key: StoreKey, name: str, version: int, value: str,
         now: datetime | None = None) -> Entry:
    """Encrypt C{value} for C{name} at C{version} with a fresh random nonce."""
    check_name(name)
    data = value.encode("utf-8")
    if not data or len(data) > MAX_VALUE:
        raise ValueError(f"a secret value must be 1 to {MAX_VALUE} bytes")
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = key.aead.encrypt(nonce, data, name.encode("utf-8"))
    return Entry(name=name, version=version, nonce=nonce, ciphertext=ciphertext,
                 updated_at=_timestamp(now))


def open_entry(key: StoreKey, entry: Entry) -> str:
    """
    Decrypt C{entry}.

    @raise StoreIntegrityError: if it fails authentication (tampered,
        swapped with another entry, or another key).
    """
    try:
        data = key.aead.decrypt(entry.nonce, entry.ciphertext, entry.name.encode("utf-8"))
        return data.decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        raise StoreIntegrityError(
            f"store entry {entry.name!r} failed authentication "
            "(tampered, moved from another entry, or encrypted with another key)") from None


def check_key(key: StoreKey, document: Document, where: str) -> None:
    """
    @raise StoreIntegrityError: if C{document} was written with another key.
    """
    if document.key_id != key.key_id:
        raise StoreIntegrityError(
            f"{where} was encrypted with another key (key id {document.key_id}, "
            f"the key file gives {key.key_id})")


def parse_document(data: bytes) -> Document:
    """
    Parse a store file.

    @raise StoreFormatError: for anything that is not a valid document.
    """
    if len(data) > MAX_DOCUMENT:
        raise StoreFormatError(f"larger than {MAX_DOCUMENT} bytes")
    try:
        top = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StoreFormatError("not a JSON document") from None
    if not isinstance(top, dict) or set(top) != _TOP_KEYS:
        raise StoreFormatError(f"expected an object with exactly {sorted(_TOP_KEYS)}")
    if top["format"] != FORMAT or top["format_version"] != FORMAT_VERSION:
        raise StoreFormatError(f"not a {FORMAT} document of format_version {FORMAT_VERSION}")
    key_id = top["key_id"]
    if not isinstance(key_id, str) or len(key_id) != 16:
        raise StoreFormatError("key_id must be 16 hex digits")
    if not isinstance(top["secrets"], list):
        raise StoreFormatError("secrets must be a list")
    entries: dict[str, Entry] = {}
    for index, item in enumerate(top["secrets"]):
        entry = _parse_entry(item, index)
        if entry.name in entries:
            raise StoreFormatError(f"secret {entry.name!r} appears twice")
        entries[entry.name] = entry
    return Document(key_id=key_id, entries=entries)


def encode_document(document: Document) -> bytes:
    """The file content for C{document} (indented JSON, one entry per block)."""
    secrets = [{"name": e.name, "version": e.version,
                "nonce": base64.b64encode(e.nonce).decode("ascii"),
                "ciphertext": base64.b64encode(e.ciphertext).decode("ascii"),
                "updated_at": e.updated_at} for e in document.entries.values()]
    top = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "key_id": document.key_id, "secrets": secrets}
    return (json.dumps(top, indent=1) + "\n").encode("utf-8")


def _parse_entry(item: Any, index: int) -> Entry:
    where = f"secrets[{index}]"
    if not isinstance(item, dict) or set(item) != _ENTRY_KEYS:
        raise StoreFormatError(f"{where}: expected an object with exactly "
                               f"{sorted(_ENTRY_KEYS)}")
    name = item["name"]
    try:
        check_name(name)
    except SecretNotFound:
        raise StoreFormatError(f"{where}: invalid name") from None
    version = item["version"]
    if type(version) is not int or not 1 <= version < 2**63:
        raise StoreFormatError(f"{where}: version must be a positive integer")
    nonce = _b64(item["nonce"], where, "nonce")
    if len(nonce) != NONCE_BYTES:
        raise StoreFormatError(f"{where}: nonce must be {NONCE_BYTES} bytes")
    ciphertext = _b64(item["ciphertext"], where, "ciphertext")
    if not _TAG < len(ciphertext) <= MAX_VALUE + _TAG:
        raise StoreFormatError(f"{where}: ciphertext has an impossible length")
    updated_at = item["updated_at"]
    if not isinstance(updated_at, str) or len(updated_at) > 40:
        raise StoreFormatError(f"{where}: updated_at must be a timestamp")
    try:
        datetime.fromisoformat(updated_at)
    except ValueError:
        raise StoreFormatError(f"{where}: updated_at must be a timestamp") from None
    return Entry(name=name, version=version, nonce=nonce, ciphertext=ciphertext,
                 updated_at=updated_at)


def _b64(value: Any, where: str, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_VALUE:
        raise StoreFormatError(f"{where}: {what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise StoreFormatError(f"{where}: {what} must be base64 text") from None


def _timestamp(now: datetime | None) -> str:
    moment = now if now is not None else datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

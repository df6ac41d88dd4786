"""
The fallback cache: the last value fetched for each secret, kept on disk
(encrypted) so that the proxy keeps working for a while when the store is
down, even across a restart.

 - One file per secret, named by HMAC-SHA256 (under a sub-key of the key
   file) of the store name and secret name: the folder does not reveal
   which secrets exist.
 - Content: C{ASPF1} + 12-byte random nonce + AES-256-GCM ciphertext of
   C{{"name", "value", "version", "fetched_at"}}, with the magic and the
   file's hash as associated data (a file renamed to another secret's hash
   fails authentication; the name inside is checked too).
 - Files are mode 0600 in a 0700 folder, written atomically in the
   reactor's thread pool; nothing here blocks the reactor.

Whether an entry is still acceptable (C{max_stale}) is decided by the
caller from C{fetched_at}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.secretproxy.secrets.base import MAX_VALUE, SecretValue
from appliance.secretproxy.secrets.crypto import NONCE_BYTES, atomic_write, derive, private_dir

MAGIC = b"ASPF1"
SUFFIX = ".secret"
MAX_FILE = 4 * MAX_VALUE + 4096
_FILE_NAME = re.compile(r"^[0-9a-f]{64}\.secret$")


class FallbackCache:
    """
    Encrypted last-known values on disk; see the module docstring.

    L{index} maps the secret names known to have a file to their
    C{fetched_at} (filled by L{scan}, L{write} and L{read}).
    """

    log = Logger()

    def __init__(self, directory: str, key: bytes, reactor: Any, store_name: str) -> None:
        """
        @param directory: the folder (created 0700 if missing).
        @param key: the 32-byte key from the fallback key file.
        @param reactor: provides the thread pool.
        @param store_name: mixed into file names (stores may share a folder).
        @raise ValueError: if the folder is unsafe (group/other access).
        """
        private_dir(directory)
        self.directory = directory
        self.store_name = store_name
        self.index: dict[str, float] = {}
        self._aead = AESGCM(derive(key, "fallback encryption"))
        self._name_key = derive(key, "fallback names")
        self._reactor = reactor
        self._pending: set[Deferred[Any]] = set()

    def file_id(self, name: str) -> str:
        """The hex HMAC naming C{name}'s file."""
        message = f"{self.store_name}\0{name}".encode()
        return hmac.new(self._name_key, message, hashlib.sha256).hexdigest()

    def path(self, name: str) -> str:
        """The file holding C{name}'s fallback value."""
        return os.path.join(self.directory, self.file_id(name) + SUFFIX)

    def write(self, name: str, value: SecretValue) -> Deferred[None]:
        """Save C{value} for C{name} (in a thread); failures are logged, not raised."""
        plain = json.dumps({"name": name, "value": value.value, "version": value.version,
                            "fetched_at": value.fetched_at}).encode("utf-8")
        file_id = self.file_id(name)
        nonce = os.urandom(NONCE_BYTES)

        def work() -> None:
            sealed = self._aead.encrypt(nonce, plain, MAGIC + file_id.encode("ascii"))
            atomic_write(os.path.join(self.directory, file_id + SUFFIX),
                         MAGIC + nonce + sealed, 0o600)

        def done(_: None) -> None:
            self.index[name] = value.fetched_at

        return self._track(work, done, "write", name)

    def read(self, name: str) -> Deferred[SecretValue | None]:
        """C{name}'s saved value, or None (no file, unreadable, or tampered)."""
        file_id = self.file_id(name)

        def work() -> SecretValue | None:
            value = self._open(file_id)
            if value is not None and value[0] != name:
                raise ValueError("the file holds another secret")
            return value[1] if value is not None else None

        def failed(failure: Failure) -> None:
            self.log.warn("fallback cache: cannot use the file for secret {secret}: {error}",
                          secret=name, error=str(failure.value))
            self.index.pop(name, None)
            return None

        d = self._in_thread(work)
        d.addCallbacks(lambda value: self._note(name, value), failed)
        return d

    def remove(self, name: str) -> Deferred[None]:
        """Delete C{name}'s file (the store says the secret no longer exists)."""
        self.index.pop(name, None)
        path = self.path(name)

        def work() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

        return self._track(work, lambda _: None, "remove", name)

    def scan(self) -> Deferred[int]:
        """Index the files already in the folder (at start); fires with how many."""

        def work() -> list[tuple[str, float]]:
            found = []
            for entry in os.scandir(self.directory):
                if not _FILE_NAME.match(entry.name):
                    continue
                try:
                    value = self._open(entry.name[:-len(SUFFIX)])
                except ValueError:
                    continue
                if value is not None:
                    found.append((value[0], value[1].fetched_at))
            return found

        def indexed(found: list[tuple[str, float]]) -> int:
            for name, fetched_at in found:
                self.index[name] = fetched_at
            return len(found)

        return self._in_thread(work).addCallback(indexed)

    def newest(self) -> float | None:
        """The most recent C{fetched_at} among indexed entries, or None."""
        return max(self.index.values(), default=None)

    def wait(self) -> Deferred[None]:
        """Fires when the writes and removals started so far are done."""
        if not self._pending:
            return succeed(None)
        return DeferredList(list(self._pending)).addCallback(lambda _: None)

    def _open(self, file_id: str) -> tuple[str, SecretValue] | None:
        path = os.path.join(self.directory, file_id + SUFFIX)
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ValueError(f"cannot read: {error.strerror}") from None
        if len(data) > MAX_FILE or not data.startswith(MAGIC):
            raise ValueError("not a fallback file")
        nonce = data[len(MAGIC):len(MAGIC) + NONCE_BYTES]
        try:
            plain = self._aead.decrypt(nonce, data[len(MAGIC) + NONCE_BYTES:],
                                       MAGIC + file_id.encode("ascii"))
            fields = json.loads(plain.decode("utf-8"))
            value = SecretValue(value=str(fields["value"]), version=fields["version"],
                                fetched_at=float(fields["fetched_at"]), from_fallback=True)
            return str(fields["name"]), value
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise ValueError("failed authentication (tampered, renamed or another key)"
                             ) from None

    def _note(self, name: str, value: SecretValue | None) -> SecretValue | None:
        if value is None:
            self.index.pop(name, None)
        else:
            self.index[name] = value.fetched_at
        return value

    def _track(self, work: Callable[[], Any], done: Callable[[Any], None], what: str,
               name: str) -> Deferred[None]:
        d = self._in_thread(work)
        self._pending.add(d)

        def finished(result: Any) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                self.log.warn("fallback cache: {what} for secret {secret} failed: {error}",
                              what=what, secret=name, error=str(result.value))
            else:
                done(result)

        d.addBoth(finished)
        return d

    def _in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

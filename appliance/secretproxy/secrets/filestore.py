"""
The embedded default store: one encrypted JSON file (see
L{appliance.secretproxy.secrets.fileformat}) and a key file.

L{StoreFile} does the blocking work (read, and locked read-modify-write
for the CLI); L{FileStore} is the L{SecretStore} the service uses: it reads
in the reactor's thread pool, keeps the parsed document until the file
changes (inode, size, mtime), and decrypts one entry per fetch.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool

from appliance.secretproxy.secrets.base import (
    SecretNotFound,
    SecretValue,
    StoreIntegrityError,
    StoreUnavailable,
    check_name,
    wall_clock,
)
from appliance.secretproxy.secrets.crypto import atomic_write
from appliance.secretproxy.secrets.fileformat import (
    MAX_DOCUMENT,
    Document,
    Entry,
    StoreFormatError,
    StoreKey,
    check_key,
    empty_document,
    encode_document,
    open_entry,
    parse_document,
    seal,
)

DEFAULT_STORE_PATH = "/var/lib/appliance/secrets.json"
"""Where the store file lives unless configured."""

DEFAULT_KEY_FILE = "/etc/appliance/secrets.key"
"""Where its key lives unless configured (apart from the data, on purpose)."""


class StoreFile:
    """
    Blocking access to one store file with one key.

    Reads are lock-free (writers replace the file atomically); writes take
    an exclusive C{flock} on C{PATH.lock} around read-modify-write, so two
    CLI runs never lose each other's changes.
    """

    def __init__(self, path: str, key: bytes) -> None:
        """
        @param path: the store file.
        @param key: the 32-byte key from the key file.
        """
        self.path = path
        self.key = StoreKey.from_key(key)
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, ...], Document] | None = None

    def read(self) -> Document:
        """
        The current document (cached while the file is unchanged).

        @raise StoreUnavailable: the file is missing or unreadable.
        @raise StoreIntegrityError: malformed, group/other-writable, or
            written with another key.
        """
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise StoreUnavailable(f"store file {self.path} does not exist "
                                   "(create it with `appliance secrets init`)") from None
        except OSError as error:
            raise StoreUnavailable(f"cannot read store file {self.path}: "
                                   f"{error.strerror}") from None
        with handle:
            info = os.fstat(handle.fileno())
            if info.st_mode & 0o022:
                raise StoreIntegrityError(
                    f"store file {self.path} is writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
            fingerprint = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                           info.st_ctime_ns)
            with self._lock:
                cached = self._cached
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            data = handle.read(MAX_DOCUMENT + 1)
        try:
            document = parse_document(data)
        except StoreFormatError as error:
            raise StoreIntegrityError(f"store file {self.path}: {error}") from None
        check_key(self.key, document, f"store file {self.path}")
        with self._lock:
            self._cached = (fingerprint, document)
        return document

    def get(self, name: str) -> tuple[str, Entry]:
        """
        The value and entry of C{name}.

        @raise SecretNotFound: no such entry.
        @raise StoreIntegrityError: it fails authentication.
        """
        entry = self.read().entries.get(check_name(name))
        if entry is None:
            raise SecretNotFound(name)
        return open_entry(self.key, entry), entry

    def create(self) -> None:
        """
        Write an empty store.

        @raise FileExistsError: if the store file exists.
        """
        with self._locked():
            if os.path.exists(self.path):
                raise FileExistsError(self.path)
            atomic_write(self.path, encode_document(empty_document(self.key)))

    def put(self, name: str, value: str) -> Entry:
        """
        Add a new secret at version 1.

        @raise ValueError: if it exists (use L{rotate}) or the value is empty
            or too large.
        """
        with self._locked():
            document = self.read()
            if name in document.entries:
                raise ValueError(f"secret {name!r} exists; use rotate to change it")
            entry = seal(self.key, name, 1, value)
            self._write(document, {**document.entries, name: entry})
            return entry

    def rotate(self, name: str, value: str) -> Entry:
        """
        Replace the value of an existing secret and bump its version.

        @raise SecretNotFound: if it does not exist.
        """
        with self._locked():
            document = self.read()
            old = document.entries.get(check_name(name))
            if old is None:
                raise SecretNotFound(name)
            entry = seal(self.key, name, old.version + 1, value)
            self._write(document, {**document.entries, name: entry})
            return entry

    def delete(self, name: str) -> None:
        """
        Remove a secret.

        @raise SecretNotFound: if it does not exist.
        """
        with self._locked():
            document = self.read()
            if check_name(name) not in document.entries:
                raise SecretNotFound(name)
            entries = {k: v for k, v in document.entries.items() if k != name}
            self._write(document, entries)

    def verify(self) -> list[str]:
        """Names of the entries that fail authentication (an integrity check)."""
        bad = []
        for entry in self.read().entries.values():
            try:
                open_entry(self.key, entry)
            except StoreIntegrityError:
                bad.append(entry.name)
        return bad

    def _write(self, document: Document, entries: dict[str, Entry]) -> None:
        atomic_write(self.path, encode_document(evolve(document, entries=entries)))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class FileStore:
    """
    The L{SecretStore} over a L{StoreFile}: reads in the reactor's thread
    pool; versions are the entries' version numbers.
    """

    def __init__(self, path: str, key: bytes, reactor: Any, name: str = "file") -> None:
        """
        @param path: the store file.
        @param key: the 32-byte key from the key file.
        @param reactor: provides the thread pool (C{getThreadPool}).
        @param name: the store's name in metrics and logs.
        """
        self.name = name
        self.file = StoreFile(path, key)
        self._reactor = reactor

    def fetch(self, secret_name: str) -> Deferred[SecretValue]:
        """Read and decrypt C{secret_name} in a thread."""
        try:
            check_name(secret_name)
        except SecretNotFound:
            return fail()
        return self._in_thread(self._fetch, secret_name)

    def check(self) -> Deferred[None]:
        """Fires when the file reads, parses and matches the key."""
        return self._in_thread(self._check)

    def close(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)

    def _fetch(self, secret_name: str) -> SecretValue:
        value, entry = self.file.get(secret_name)
        return SecretValue(value=value, version=str(entry.version), fetched_at=wall_clock())

    def _check(self) -> None:
        self.file.read()

    def _in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

"""
Keys and files for the encrypted stores: key files (32 random bytes, raw or
base64, readable by the owner only), sub-keys derived with HKDF, and atomic
writes of private files (temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tempfile

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
"""AES-256 keys: 32 bytes."""

NONCE_BYTES = 12
"""AES-GCM nonces: 96 bits, random per encryption."""

MAX_KEY_FILE = 1024


class KeyFileError(ValueError):
    """A key file is missing, unsafe or malformed; the message says which."""


def load_key_file(path: str) -> bytes:
    """
    Read a key file: exactly 32 bytes, or their base64 form (surrounding
    whitespace allowed). The file must be a regular file with no group or
    other permission bits (0600 or 0400).

    @raise KeyFileError: naming the path and the problem (never the key).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise KeyFileError(f"cannot open key file {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    return parse_key(data, path)


def parse_key(data: bytes, where: str = "key") -> bytes:
    """
    The 32-byte key in C{data} (raw, or base64 with optional whitespace).

    @raise KeyFileError: on any other content.
    """
    if len(data) == KEY_BYTES:
        return data
    if len(data) <= MAX_KEY_FILE:
        try:
            decoded = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if len(decoded) == KEY_BYTES:
            return decoded
    raise KeyFileError(f"{where}: expected {KEY_BYTES} random bytes, raw or base64 "
                       "(create one with `head -c 32 /dev/urandom | base64`)")


def new_key_file(path: str) -> bytes:
    """
    Create C{path} (mode 0600, never overwriting) holding a new random key
    in base64; return the key.

    @raise FileExistsError: if C{path} exists.
    """
    key = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return key


def derive(key: bytes, purpose: str) -> bytes:
    """A 32-byte sub-key of C{key} for one C{purpose} (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"appliance secretproxy " + purpose.encode("ascii")).derive(key)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} atomically: a temp file (created with
    C{mode}) in the same folder is written, fsynced and renamed over
    C{path}, then the folder is fsynced. Readers see the old or the new
    content, never a mix; a crash leaves at most a stray temp file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def private_dir(path: str) -> None:
    """
    Make sure C{path} is a folder only its owner can enter: create it with
    mode 0700 if missing.

    @raise ValueError: if it exists with group or other permission bits, or
        is not a folder.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise ValueError(f"cannot create folder {path}: {error.strerror}") from None
    else:
        os.chmod(path, 0o700)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a folder")
    if info.st_mode & 0o077:
        raise ValueError(f"folder {path} is accessible by group or others "
                         f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 700 it")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

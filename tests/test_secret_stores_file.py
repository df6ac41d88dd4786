"""
Tests for the encrypted file store: key files, the file format (with a
hypothesis fuzz of the parser), encryption and authentication on disk, the
thread-backed FileStore, and the `appliance secrets` CLI as a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.secretproxy.secrets import (
    FileStore,
    SecretNotFound,
    StoreFile,
    StoreIntegrityError,
    StoreUnavailable,
)
from appliance.secretproxy.secrets.cli import main
from appliance.secretproxy.secrets.crypto import KeyFileError, load_key_file, parse_key
from appliance.secretproxy.secrets.fileformat import StoreFormatError, parse_document

ROOT = Path(__file__).resolve().parent.parent
VALUE = "sk_live_" + "Q" * 24 + "file-store-value"


def make_key(path: Path, mode: int = 0o600, raw: bool = False) -> bytes:
    """Write a random key file (base64 unless raw) with C{mode}; return the key."""
    key = os.urandom(32)
    path.write_bytes(key if raw else base64.b64encode(key) + b"\n")
    path.chmod(mode)
    return key


def make_store(tmp_path: Path, **secrets: str) -> tuple[StoreFile, bytes]:
    """A fresh store file holding C{secrets}."""
    key = make_key(tmp_path / "store.key")
    store = StoreFile(str(tmp_path / "secrets.json"), key)
    store.create()
    for name, value in secrets.items():
        store.put(name, value)
    return store, key


async def failure_of(d: Any) -> BaseException:
    """The exception a Deferred fails with (the test fails if it succeeds)."""
    try:
        result = await d
    except Exception as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


# -- key files ---------------------------------------------------------------


def test_key_file_raw_or_base64(tmp_path: Path) -> None:
    """A key file holds 32 bytes raw or in base64; anything else is refused."""
    raw = make_key(tmp_path / "raw.key", raw=True)
    assert load_key_file(str(tmp_path / "raw.key")) == raw
    b64 = make_key(tmp_path / "b64.key", mode=0o400)
    assert load_key_file(str(tmp_path / "b64.key")) == b64
    for bad in (b"", b"short", os.urandom(31), base64.b64encode(os.urandom(16))):
        with pytest.raises(KeyFileError, match="32 random bytes"):
            parse_key(bad)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_with_loose_mode_refused(tmp_path: Path, mode: int) -> None:
    """A key file readable or writable by group or others is refused, naming the mode."""
    path = tmp_path / "loose.key"
    make_key(path, mode=mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_key_file(str(path))
    with pytest.raises(KeyFileError, match="cannot open"):
        load_key_file(str(tmp_path / "missing.key"))


# -- format and encryption ---------------------------------------------------


def test_ciphertext_on_disk_does_not_reveal_the_value(tmp_path: Path) -> None:
    """The store file holds names and versions but neither the value nor its base64."""
    store, _ = make_store(tmp_path, STRIPE_KEY=VALUE)
    data = Path(store.path).read_bytes()
    assert b"STRIPE_KEY" in data
    assert VALUE.encode() not in data
    assert base64.b64encode(VALUE.encode())[:20] not in data
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.get("STRIPE_KEY")[0] == VALUE
    # Each put uses a fresh nonce: the same value twice gives different ciphertexts.
    store.put("OTHER", VALUE)
    entries = store.read().entries
    assert entries["OTHER"].ciphertext != entries["STRIPE_KEY"].ciphertext
    assert entries["OTHER"].nonce != entries["STRIPE_KEY"].nonce


def test_tampered_ciphertext_fails_authentication(tmp_path: Path) -> None:
    """Changing one ciphertext byte makes that entry fail; the others still open."""
    store, key = make_store(tmp_path, A_KEY="value-of-a-1234", B_KEY="value-of-b-5678")
    document = json.loads(Path(store.path).read_text())
    raw = bytearray(base64.b64decode(document["secrets"][0]["ciphertext"]))
    raw[3] ^= 0x01
    document["secrets"][0]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    Path(store.path).write_text(json.dumps(document))
    fresh = StoreFile(store.path, key)
    with pytest.raises(StoreIntegrityError, match="A_KEY.*failed authentication"):
        fresh.get("A_KEY")
    assert fresh.get("B_KEY")[0] == "value-of-b-5678"
    assert fresh.verify() == ["A_KEY"]


def test_swapped_entries_fail_authentication(tmp_path: Path) -> None:
    """Moving one entry's sealed value under another name fails (the name is the AAD)."""
    store, key = make_store(tmp_path, A_KEY="value-of-a-1234", B_KEY="value-of-b-5678")
    document = json.loads(Path(store.path).read_text())
    first, second = document["secrets"]
    for field in ("nonce", "ciphertext"):
        first[field], second[field] = second[field], first[field]
    Path(store.path).write_text(json.dumps(document))
    fresh = StoreFile(store.path, key)
    for name in ("A_KEY", "B_KEY"):
        with pytest.raises(StoreIntegrityError, match="failed authentication"):
            fresh.get(name)


def test_another_key_is_refused_by_key_id(tmp_path: Path) -> None:
    """Opening a store with another key says so instead of failing entry by entry."""
    store, _ = make_store(tmp_path, A_KEY="value-of-a-1234")
    other = StoreFile(store.path, os.urandom(32))
    with pytest.raises(StoreIntegrityError, match="encrypted with another key"):
        other.get("A_KEY")


def test_group_writable_store_file_refused(tmp_path: Path) -> None:
    """A store file others could rewrite (rollback, deletion) is refused."""
    store, _ = make_store(tmp_path, A_KEY="value-of-a-1234")
    os.chmod(store.path, 0o620)
    with pytest.raises(StoreIntegrityError, match="writable by group or others"):
        store.read()


def test_put_rotate_delete_versions_and_atomic_writes(tmp_path: Path) -> None:
    """put starts at version 1, rotate bumps it, delete removes; no temp file is left."""
    store, _ = make_store(tmp_path)
    assert store.put("API_KEY", "first-value").version == 1
    with pytest.raises(ValueError, match="exists; use rotate"):
        store.put("API_KEY", "again")
    assert store.rotate("API_KEY", "second-value").version == 2
    assert store.get("API_KEY")[0] == "second-value"
    with pytest.raises(SecretNotFound):
        store.rotate("MISSING", "x-value")
    store.delete("API_KEY")
    with pytest.raises(SecretNotFound):
        store.get("API_KEY")
    with pytest.raises(ValueError, match="1 to"):
        store.put("EMPTY", "")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_parser_rejects_malformed_documents() -> None:
    """Each structural mistake gives a StoreFormatError saying what is wrong."""
    good = {"format": "appliance-secrets", "format_version": 1, "key_id": "0" * 16,
            "secrets": [{"name": "A", "version": 1, "nonce": base64.b64encode(b"n" * 12).decode(),
                         "ciphertext": base64.b64encode(b"c" * 20).decode(),
                         "updated_at": "2026-11-02T10:00:00Z"}]}
    assert "A" in parse_document(json.dumps(good).encode()).entries
    cases = [
        (b"\xff\xfe", "not a JSON"),
        (b"[]", "exactly"),
        (json.dumps({**good, "format_version": 2}).encode(), "format_version 1"),
        (json.dumps({**good, "secrets": [good["secrets"][0]] * 2}).encode(), "appears twice"),
        (json.dumps({**good, "secrets": [{**good["secrets"][0], "version": 0}]}).encode(),
         "positive integer"),
        (json.dumps({**good, "secrets": [{**good["secrets"][0], "version": True}]}).encode(),
         "positive integer"),
        (json.dumps({**good, "secrets": [{**good["secrets"][0], "nonce": "!!"}]}).encode(),
         "base64"),
        (json.dumps({**good, "secrets": [{**good["secrets"][0], "name": "a b"}]}).encode(),
         "invalid name"),
        (json.dumps({**good, "secrets": [{**good["secrets"][0], "updated_at": "x"}]}).encode(),
         "timestamp"),
    ]
    for data, message in cases:
        with pytest.raises(StoreFormatError, match=message):
            parse_document(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_parser_fuzz_random_bytes(data: bytes) -> None:
    """Random bytes parse to a document or fail with StoreFormatError, nothing else."""
    try:
        parse_document(data)
    except StoreFormatError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "version", "nonce", "ciphertext",
                                        "updated_at", "extra"]), _json))
def test_parser_fuzz_entries(entry: dict[str, Any]) -> None:
    """Near-valid documents with random entry fields never raise anything but StoreFormatError."""
    document = {"format": "appliance-secrets", "format_version": 1, "key_id": "0" * 16,
                "secrets": [entry]}
    try:
        parse_document(json.dumps(document).encode())
    except StoreFormatError:
        pass


# -- FileStore (threads) -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_store_fetch_in_thread(reactor: Any, tmp_path: Path) -> None:
    """fetch decrypts in the thread pool; versions follow rotation; missing names fail."""
    store, key = make_store(tmp_path, STRIPE_KEY=VALUE)
    files = FileStore(store.path, key, reactor)
    value = await files.fetch("STRIPE_KEY")
    assert value.value == VALUE and value.version == "1" and "<hidden>" in repr(value)
    assert VALUE not in repr(value)
    store.rotate("STRIPE_KEY", VALUE + "-rotated")
    value = await files.fetch("STRIPE_KEY")  # the changed file is read again
    assert value.value == VALUE + "-rotated" and value.version == "2"
    assert isinstance(await failure_of(files.fetch("NOPE")), SecretNotFound)
    assert isinstance(await failure_of(files.fetch("bad name")), SecretNotFound)
    await files.check()
    os.unlink(store.path)
    error = await failure_of(files.fetch("STRIPE_KEY"))
    assert isinstance(error, StoreUnavailable) and "appliance secrets init" in str(error)


@pytest_twisted.ensureDeferred
async def test_file_store_reports_tampering(reactor: Any, tmp_path: Path) -> None:
    """A tampered entry is a StoreIntegrityError (a StoreUnavailable) through FileStore."""
    store, key = make_store(tmp_path, A_KEY="value-of-a-1234")
    document = json.loads(Path(store.path).read_text())
    document["secrets"][0]["nonce"] = base64.b64encode(os.urandom(12)).decode()
    Path(store.path).write_text(json.dumps(document))
    error = await failure_of(FileStore(store.path, key, reactor).fetch("A_KEY"))
    assert isinstance(error, StoreIntegrityError) and isinstance(error, StoreUnavailable)


# -- the CLI -----------------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI module as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "appliance.secretproxy.secrets.cli", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_round_trip_as_subprocess(tmp_path: Path) -> None:
    """init, put (stdin), rotate, list, delete, verify; values never in argv or output."""
    paths = ["--store", str(tmp_path / "secrets.json"), "--key-file", str(tmp_path / "k.key")]
    value, rotated = VALUE + "-cli", VALUE + "-cli-rotated"
    init = run_cli("init", *paths)
    assert init.returncode == 0, init.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    put = run_cli("put", "STRIPE_KEY", *paths, stdin=value + "\n")
    assert put.returncode == 0 and "version 1" in put.stdout, put.stderr
    assert run_cli(*paths, "put", "GITHUB_TOKEN", stdin="ghp-" + "x" * 30).returncode == 0
    rotate = run_cli("rotate", "STRIPE_KEY", *paths, stdin=rotated)
    assert rotate.returncode == 0 and "version 2" in rotate.stdout, rotate.stderr
    listing = run_cli("list", *paths)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "UPDATED"]
    assert [line.split()[:2] for line in lines[1:]] == [["GITHUB_TOKEN", "1"],
                                                        ["STRIPE_KEY", "2"]]
    outputs = "".join(r.stdout + r.stderr for r in (init, put, rotate, listing))
    assert value not in outputs and rotated not in outputs
    key = load_key_file(str(tmp_path / "k.key"))
    assert StoreFile(str(tmp_path / "secrets.json"), key).get("STRIPE_KEY")[0] == rotated
    assert run_cli("verify", *paths).returncode == 0
    assert run_cli("delete", "GITHUB_TOKEN", *paths).returncode == 0
    listing = run_cli("list", *paths)
    assert "GITHUB_TOKEN" not in listing.stdout and "STRIPE_KEY" in listing.stdout
    again = run_cli("init", *paths)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_cli_refuses_values_on_the_command_line(tmp_path: Path) -> None:
    """An extra argument (a pasted value) is refused without being echoed."""
    paths = ["--store", str(tmp_path / "s.json"), "--key-file", str(tmp_path / "k.key")]
    assert main(["init", *paths], stdout=io.StringIO()) == 0
    leaked = "sk_live_pasted_on_the_command_line"
    result = run_cli("put", "STRIPE_KEY", leaked, *paths, stdin="x")
    assert result.returncode == 2
    assert leaked not in result.stderr + result.stdout
    assert "read from stdin" in result.stderr


def test_cli_errors(tmp_path: Path) -> None:
    """Empty stdin, an existing name, a missing name and a loose key file all exit 1."""
    paths = ["--store", str(tmp_path / "s.json"), "--key-file", str(tmp_path / "k.key")]
    out, err = io.StringIO(), io.StringIO()
    assert main(["init", *paths], stdout=out, stderr=err) == 0
    assert main(["put", "A_KEY", *paths], stdin=io.StringIO(""), stdout=out, stderr=err) == 1
    assert "empty value" in err.getvalue()
    assert main(["put", "A_KEY", *paths], stdin=io.StringIO("v-1234\r\n"), stdout=out) == 0
    key = load_key_file(str(tmp_path / "k.key"))
    assert StoreFile(str(tmp_path / "s.json"), key).get("A_KEY")[0] == "v-1234"
    err = io.StringIO()
    assert main(["put", "A_KEY", *paths], stdin=io.StringIO("v"), stdout=out, stderr=err) == 1
    assert "use rotate" in err.getvalue()
    err = io.StringIO()
    assert main(["delete", "NOPE", *paths], stdout=out, stderr=err) == 1
    assert "not found" in err.getvalue()
    os.chmod(tmp_path / "k.key", 0o644)
    err = io.StringIO()
    assert main(["list", *paths], stdout=out, stderr=err) == 1
    assert "chmod 600" in err.getvalue()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200)
       .filter(lambda v: not v.endswith(("\n", "\r"))))
def test_cli_values_survive_exactly(tmp_path: Path, value: str) -> None:
    """Any text value (minus one trailing newline) comes back byte for byte."""
    folder = tmp_path / os.urandom(4).hex()
    folder.mkdir()
    paths = ["--store", str(folder / "s.json"), "--key-file", str(folder / "k.key")]
    assert main(["init", *paths], stdout=io.StringIO()) == 0
    assert main(["put", "V", *paths], stdin=io.StringIO(value + "\n"), stdout=io.StringIO(),
                stderr=io.StringIO()) == 0
    key = load_key_file(str(folder / "k.key"))
    assert StoreFile(str(folder / "s.json"), key).get("V")[0] == value

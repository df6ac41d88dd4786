"""Tests for request-path, query, header-value and upstream-host normalisation."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from appliance.http.errors import HTTPError
from appliance.http.normalize import (
    MAX_PATH_LENGTH,
    BadRequest,
    NormalizedPath,
    header_value_is_safe,
    normalize_path,
    normalize_target,
    normalize_upstream_host,
    sanitize_query,
    split_target,
)

WIRE = re.compile(rb"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*$")


def reason(call: object, *args: object) -> str:
    """The reason of the BadRequest that C{call(*args)} raises."""
    with pytest.raises(BadRequest) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.reason


# -- paths -------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "path", "wire"), [
    (b"/", "/", b"/"),
    (b"/v1/customers/cus_123/charges", "/v1/customers/cus_123/charges",
     b"/v1/customers/cus_123/charges"),
    (b"/public/..%2Fadmin", "/admin", b"/admin"),
    (b"/public/..%2fadmin", "/admin", b"/admin"),
    (b"/public/%2e%2e/admin", "/admin", b"/admin"),
    (b"/public/%2E%2E%2Fadmin", "/admin", b"/admin"),
    (b"/public/.%2e/admin", "/admin", b"/admin"),
    (b"/public/..;/admin", "/admin", b"/admin"),
    (b"/public/..;x=1/admin", "/admin", b"/admin"),
    (b"/public/..%3B/admin", "/admin", b"/admin"),
    (b"/public/..\\admin", "/admin", b"/admin"),
    (b"/public/..%5Cadmin", "/admin", b"/admin"),
    (b"/public\\..\\..\\admin", "/admin", b"/admin"),
    (b"/a;x=1/b", "/a/b", b"/a/b"),
    (b"/a;x=1;y=2/b;z/", "/a/b/", b"/a/b/"),
    (b"/a/;x/b", "/a/b", b"/a/b"),
    (b"//a//b//", "/a/b/", b"/a/b/"),
    (b"//evil.example/x", "/evil.example/x", b"/evil.example/x"),
    (b"/a/./b/.", "/a/b/", b"/a/b/"),
    (b"/a/b/..", "/a/", b"/a/"),
    (b"/a/b/../", "/a/", b"/a/"),
    (b"/..", "/", b"/"),
    (b"/../../../etc/passwd", "/etc/passwd", b"/etc/passwd"),
    (b"/a/../..", "/", b"/"),
    (b"/a/...", "/a/...", b"/a/..."),
    (b"/.well-known/x", "/.well-known/x", b"/.well-known/x"),
    (b"/a%20b", "/a b", b"/a%20b"),
    (b"/a%3Fb%23c", "/a?b#c", b"/a%3Fb%23c"),
    (b"/caf%c3%a9", "/caf\u00e9", b"/caf%C3%A9"),
    (b"/caf\xc3\xa9", "/caf\u00e9", b"/caf%C3%A9"),
    (b"/%7Euser/%41", "/~user/A", b"/~user/A"),
    (b"/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", b"/a:b@c!$&'()*+,="),
    (b'/a"<>[]{}|^`', '/a"<>[]{}|^`', b"/a%22%3C%3E%5B%5D%7B%7D%7C%5E%60"),
])
def test_normalize_path(raw: bytes, path: str, wire: bytes) -> None:
    """Each tricky path becomes one canonical decoded path and its wire form."""
    assert normalize_path(raw) == NormalizedPath(path, wire)


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "not origin-form"),
    (b"*", "asterisk-form target"),
    (b"http://api.example.com/x", "absolute-form target"),
    (b"https://api.example.com", "absolute-form target"),
    (b"api.example.com:443", "not origin-form"),
    (b"\\\\evil.example\\x", "not origin-form"),
    (b"%2Fadmin", "not origin-form"),
    (b"/a?b", "query in path"),
    (b"/a#frag", "fragment in path"),
    (b"/a%", "invalid percent escape"),
    (b"/a%2", "invalid percent escape"),
    (b"/a%zz", "invalid percent escape"),
    (b"/a%%32%46", "invalid percent escape"),
    (b"/a%252F", "double encoding"),
    (b"/a%252e%252e/", "double encoding"),
    (b"/100%25", "double encoding"),
    (b"/a%00", "control character"),
    (b"/a\x00", "control character"),
    (b"/a%0d%0aX-Injected:%20yes", "control character"),
    (b"/a%0A", "control character"),
    (b"/a%09", "control character"),
    (b"/a%7f", "control character"),
    (b"/a%C2%85", "control character"),
    (b"/a%ff", "invalid utf-8"),
    (b"/%c0%ae%c0%ae/admin", "invalid utf-8"),
    (b"/%ed%a0%80", "invalid utf-8"),
])
def test_refused_paths(raw: bytes, why: str) -> None:
    """Ambiguous, injected or malformed paths are refused with a fixed reason."""
    assert reason(normalize_path, raw) == why


def test_bad_request_is_a_400() -> None:
    """BadRequest is the HTTP layer's 400, so the engine answers it unchanged."""
    error = BadRequest("double encoding")
    assert isinstance(error, HTTPError) and error.status == 400
    assert error.reason == "double encoding"


def test_overlong_paths() -> None:
    """The raw path and its wire form are both bounded (8 KiB, or as configured)."""
    assert normalize_path(b"/" + b"a" * (MAX_PATH_LENGTH - 1)).wire[-1:] == b"a"
    assert reason(normalize_path, b"/" + b"a" * MAX_PATH_LENGTH) == "path too long"
    assert reason(normalize_path, b"/abcd", 4) == "path too long"
    assert normalize_path(b"/abc", 4).path == "/abc"
    # Short enough raw, but the re-encoded form would be too long.
    expanding = b"/" + "\u00e9".encode() * 3000
    assert len(expanding) <= MAX_PATH_LENGTH
    assert reason(normalize_path, expanding) == "path too long"


def test_policy_and_upstream_see_the_same_path() -> None:
    """A /public/ prefix rule cannot be passed by a path the upstream reads as /admin."""
    for raw in (b"/public/..%2Fadmin", b"/public/%2e%2e/admin", b"/public/..;/admin",
                b"/public/..\\admin", b"/public//../admin"):
        normalized = normalize_path(raw)
        assert not normalized.path.startswith("/public/")
        assert unquote_to_bytes(normalized.wire).decode() == normalized.path == "/admin"


def test_split_and_sanitize_query() -> None:
    """The query is split at the first ?, kept byte-exact, and refused only for controls."""
    assert split_target(b"/a/b") == (b"/a/b", None)
    assert split_target(b"/a?") == (b"/a", b"")
    assert split_target(b"/a?x=1?y=%2F&z") == (b"/a", b"x=1?y=%2F&z")
    for query in (b"", b"limit=10", b"a=%00%0d%0a", b"q=caf\xc3\xa9&x=/../", b"a=1#f"):
        assert sanitize_query(query) is query
    for query in (b"a=1\r\nX: y", b"a\n", b"a\x00", b"a b", b"a\tb", b"a\x7f"):
        assert reason(sanitize_query, query) == "control character in query"


def test_normalize_target_and_rebuild() -> None:
    """normalize_target normalises the path, keeps the query, and target() joins them."""
    normalized, query = normalize_target(b"/v1/./customers/cus_123/charges?limit=10")
    assert normalized.path == "/v1/customers/cus_123/charges" and query == b"limit=10"
    assert normalized.target(query) == b"/v1/customers/cus_123/charges?limit=10"
    assert normalized.target() == b"/v1/customers/cus_123/charges"
    assert normalize_target(b"/a?")[0].target(b"") == b"/a?"
    assert reason(normalize_target, b"/a?x\r\n") == "control character in query"
    assert reason(normalize_target, b"/a%2?x") == "invalid percent escape"


@pytest.mark.parametrize(("value", "safe"), [
    (b"Bearer sk_live_abc", True), (b"", True), (b"a\tb \x7f\xff", True),
    (b"a\rb", False), (b"a\nb", False), (b"a\x00b", False), (b"x\r\nX-Evil: 1", False),
    ("Bearer \u00e9", True), ("a\r\n", False), ("a\x00", False),
])
def test_header_value_is_safe(value: bytes | str, safe: bool) -> None:
    """Only CR, LF and NUL make a header value unsafe."""
    assert header_value_is_safe(value) is safe


# -- path properties ----------------------------------------------------------

PIECES = st.sampled_from([
    b"/", b"//", b"\\", b".", b"..", b"%2e", b"%2E%2e", b"%2F", b"%2f", b"%5C", b";",
    b";x=1", b"%3B", b"%25", b"%", b"%2", b"%00", b"%0a", b"a", b"b", b"cus_123", b"~",
    b"%41", b"%C3%A9", b"\xc3\xa9", b"%ff", b" ", b"?", b"#", b"@", b":", b"%3F", b"%23",
])
STRUCTURED = st.lists(PIECES, max_size=24).map(lambda parts: b"/" + b"".join(parts))
RAW = st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"/" + b),
                STRUCTURED)


def check_normalized(normalized: NormalizedPath) -> None:
    """Every structural promise a normalised path makes."""
    path, wire = normalized
    assert path.startswith("/") and "//" not in path and "\\" not in path
    assert ";" not in path and "%" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    assert WIRE.match(wire)
    assert unquote_to_bytes(wire) == path.encode("utf-8")
    assert normalize_path(wire) == normalized


@settings(max_examples=600)
@given(RAW)
@example(b"/public/..%2Fadmin")
@example(b"/%2e%2e%2f%2e%2e%2f")
def test_paths_normalise_or_are_refused(raw: bytes) -> None:
    """Any bytes give a 400 or a canonical path: idempotent, and wire decodes to path."""
    try:
        normalized = normalize_path(raw)
    except BadRequest:
        return
    check_normalized(normalized)


@given(st.text(max_size=60))
def test_any_decoded_text_round_trips(text: str) -> None:
    """Whatever a client encodes, what policy sees is what the wire form decodes to."""
    raw = b"/" + b"".join(b"%%%02x" % byte for byte in text.encode("utf-8"))
    try:
        normalized = normalize_path(raw)
    except BadRequest as error:
        assert error.reason in ("control character", "double encoding", "invalid utf-8")
        return
    check_normalized(normalized)


@given(st.binary(max_size=100))
def test_queries_are_kept_or_refused(query: bytes) -> None:
    """A query is returned byte-exact or refused; never altered."""
    try:
        assert sanitize_query(query) == query
    except BadRequest:
        assert any(byte <= 0x20 or byte == 0x7F for byte in query)


# -- upstream hosts ------------------------------------------------------------

@pytest.mark.parametrize(("value", "canonical"), [
    ("api.example.com", "api.example.com"),
    (b"api.example.com", "api.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("api.example.com.", "api.example.com"),
    ("api.example.com:443", "api.example.com"),
    ("api.example.com.:443", "api.example.com"),
    ("api.example.com:8443", "api.example.com:8443"),
    ("api.example.com:80", "api.example.com:80"),
    ("api.example.com:65535", "api.example.com:65535"),
    ("api.example.com:1", "api.example.com:1"),
    ("localhost", "localhost"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.c0", "a-b.c0"),
    ("1a.example", "1a.example"),
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1:443", "127.0.0.1"),
    ("10.1.2.3:8443", "10.1.2.3:8443"),
    ("[::1]", "[::1]"),
    ("[::1]:8443", "[::1]:8443"),
    ("[0:0:0:0:0:0:0:1]:443", "[::1]"),
    ("[2001:DB8::A]", "[2001:db8::a]"),
    ("[::ffff:127.0.0.1]", "[::ffff:7f00:1]"),
    ("a" * 63 + ".example", "a" * 63 + ".example"),
    (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
])
def test_upstream_hosts(value: str | bytes, canonical: str) -> None:
    """Accepted values take one canonical form (default port dropped)."""
    assert normalize_upstream_host(value) == canonical
    assert normalize_upstream_host(canonical) == canonical


def test_default_ports_follow_the_scheme() -> None:
    """Only the scheme's own default port is dropped; unknown schemes are a bug."""
    assert normalize_upstream_host("api.example.com:80", scheme="http") == "api.example.com"
    assert normalize_upstream_host("api.example.com:443", scheme="http") == "api.example.com:443"
    assert normalize_upstream_host("h:8080", "x", {"x": 8080}) == "h"
    with pytest.raises(ValueError):
        normalize_upstream_host("api.example.com", scheme="ftp")


@pytest.mark.parametrize(("value", "why"), [
    ("", "empty host"),
    (b"", "empty host"),
    (".", "empty host"),
    (":443", "empty host"),
    ("api.example.com@evil.test", "userinfo in host"),
    ("user:pass@api.example.com", "userinfo in host"),
    ("evil.test#api.example.com", "fragment in host"),
    ("api.example.com%2eevil.test", "percent in host"),
    ("[fe80::1%25eth0]", "percent in host"),
    ("api.example.com/x", "path in host"),
    ("api.example.com?x", "query in host"),
    ("api.example.com\\@evil.test", "backslash in host"),
    ("api.example.com,evil.test", "more than one host"),
    ("api.example.com evil.test", "whitespace or control in host"),
    (" api.example.com", "whitespace or control in host"),
    ("api.example.com\t", "whitespace or control in host"),
    ("api.example.com\r\nX: y", "whitespace or control in host"),
    ("api.example.com\x00", "whitespace or control in host"),
    ("api.example.com\x7f", "whitespace or control in host"),
    ("\u0430pi.example.com", "non-ascii host"),
    ("b\u00fccher.example", "non-ascii host"),
    ("b\u00fccher.example".encode(), "non-ascii host"),
    ("api_v1.example.com", "invalid character in host"),
    ("api.example.com:+443", "invalid character in host"),
    ("api*.example.com", "invalid character in host"),
    ("api..example.com", "empty label in host"),
    ("api.example.com..", "empty label in host"),
    (".api.example.com", "empty label in host"),
    ("a" * 64 + ".example", "label too long in host"),
    (".".join(["a" * 63] * 4), "host too long"),
    ("a" * 400, "host too long"),
    ("-api.example.com", "hyphen at label edge in host"),
    ("api-.example.com", "hyphen at label edge in host"),
    ("api.example.com:", "empty port"),
    ("api.example.com:0", "port out of range"),
    ("api.example.com:65536", "port out of range"),
    ("api.example.com:99999", "port out of range"),
    ("api.example.com:123456", "invalid port"),
    ("api.example.com:0443", "port with leading zero"),
    ("api.example.com:https", "invalid port"),
    ("api.example.com:443:443", "unbracketed IPv6 literal"),
    ("::1", "unbracketed IPv6 literal"),
    ("[::1", "unclosed bracket in host"),
    ("[::1]x", "misplaced bracket in host"),
    ("[::1]]", "misplaced bracket in host"),
    ("[[::1]]", "misplaced bracket in host"),
    ("api[1].example.com", "misplaced bracket in host"),
    ("[127.0.0.1]", "invalid IPv6 literal"),
    ("[api.example.com]", "invalid IPv6 literal"),
    ("[]", "invalid IPv6 literal"),
    ("127.1", "ambiguous numeric host"),
    ("0x7f.0.0.1", "ambiguous numeric host"),
    ("127.0.0.0x1", "ambiguous numeric host"),
    ("017.0.0.1", "ambiguous numeric host"),
    ("2130706433", "ambiguous numeric host"),
    ("1.2.3.4.5", "ambiguous numeric host"),
    ("256.0.0.1", "ambiguous numeric host"),
    ("example.0x", "ambiguous numeric host"),
])
def test_refused_upstream_hosts(value: str | bytes, why: str) -> None:
    """Anything but one plain host (and port) is refused with a fixed reason."""
    assert reason(normalize_upstream_host, value) == why


CONFIGURED = {normalize_upstream_host(name) for name in ("api.example.com", "API.example.com.")}


@pytest.mark.parametrize("value", [
    "api.example.com.evil.test",
    "api.example.com@evil.test",
    "api.example.com:443@evil.test",
    "evil.test@api.example.com",
    "127.0.0.1.nip.io",
    "api.example.com.127.0.0.1.nip.io",
    "xapi.example.com",
    "api.example.co",
    "api.example.comm",
    "api-example.com",
    "api.example.com:80",
    "api.example.com:8443",
    "api.example.com,evil.test",
    "api.example.com evil.test",
    "api.example.com#.evil.test",
    "api.example.com%00.evil.test",
    "api.example.com\\.evil.test",
    "api.example.com/.evil.test",
    "api.example.com..",
    "\u0430pi.example.com",
    "api.\uff45xample.com",
    "api.example.com\u3002",
])
def test_look_alike_hosts_do_not_match(value: str) -> None:
    """Look-alikes of a configured host are refused or normalise to something else."""
    assert CONFIGURED == {"api.example.com"}
    try:
        assert normalize_upstream_host(value) not in CONFIGURED
    except BadRequest:
        pass


@pytest.mark.parametrize("value", ["api.example.com", "API.EXAMPLE.COM", "api.example.com.",
                                   "api.example.com:443", b"Api.Example.Com.:443"])
def test_genuine_spellings_match(value: str | bytes) -> None:
    """Harmless spellings of the configured host match it exactly."""
    assert normalize_upstream_host(value) in CONFIGURED


HOST_ALPHABET = st.sampled_from(list("aZ09-.:[]@#%/?\\, \t\x00\u00e9f") + ["xn--", "::1"])


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80),
                 st.lists(HOST_ALPHABET, max_size=30).map("".join)))
def test_hosts_normalise_or_are_refused(value: str | bytes) -> None:
    """Any value gives a 400 or a canonical host that normalises to itself."""
    try:
        canonical = normalize_upstream_host(value)
    except BadRequest:
        return
    assert canonical == canonical.lower() and canonical.isascii()
    assert not any(char in canonical for char in "@#%/?\\, \t")
    assert normalize_upstream_host(canonical) == canonical


def test_host_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted hosts are memoised, the memo never outgrows its bound, refusals are not kept."""
    from appliance.http import normalize

    monkeypatch.setattr(normalize, "HOST_MEMO_SIZE", 3)
    monkeypatch.setattr(normalize, "_host_memo", {})
    for index in range(10):
        assert normalize_upstream_host(f"h{index}.example:443") == f"h{index}.example"
        assert len(normalize._host_memo) <= 3
    assert normalize_upstream_host("h9.example:443") == "h9.example"
    assert reason(normalize_upstream_host, "a@b") == "userinfo in host"
    assert all("@" not in key[0] for key in normalize._host_memo)
    assert normalize_upstream_host(bytearray(b"H.example")) == "h.example"
    assert normalize_upstream_host("h.example:443", scheme="http") == "h.example:443"


def test_bytearray_paths_give_bytes() -> None:
    """A bytearray path is accepted and its wire form is immutable bytes."""
    for raw in (bytearray(b"/a/b"), bytearray(b"/a/../b%20")):
        assert type(normalize_path(raw).wire) is bytes

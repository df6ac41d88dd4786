"""
HTTP errors the proxy answers itself, with short bodies that reveal nothing
about configured hosts, secrets or internals.
"""

from __future__ import annotations

from http import HTTPStatus


class HTTPError(Exception):
    """
    A request the proxy answers itself with C{status}; C{reason} is for
    logs and metrics, the client sees only the standard phrase.
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []


_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def phrase(status: int) -> bytes:
    """The standard reason phrase for a status code."""
    return _PHRASES.get(status, b"Unknown")


def error_response(status: int, extra_headers: list[tuple[bytes, bytes]] | None = None,
                   close: bool = True, head_only: bool = False) -> bytes:
    """A complete small response: status line, headers, a one-line body."""
    body = b"" if head_only else b"%d %s\n" % (status, phrase(status))
    lines = [b"HTTP/1.1 %d %s" % (status, phrase(status)),
             b"Content-Type: text/plain; charset=utf-8",
             b"Content-Length: %d" % len(body if not head_only else
                                        b"%d %s\n" % (status, phrase(status))),
             b"Cache-Control: no-store"]
    if close:
        lines.append(b"Connection: close")
    for name, value in extra_headers or ():
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body

"""
What the secret proxy records about a request: its ID, the audited policy
decision, and the optional access-log line.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.audit import encode_fields
from appliance.host.redact import redact

REQUEST_ID = b"x-request-id"
REQUEST_ID_FIELD = b"X-Request-Id"
_PLAIN_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_DURATION_MARK = 987654.125  # a placeholder no real duration prints as
_REQUEST_ID_MARK = "request-id-placeholder-5f1c"
_PARTS_MAX = 10_000
# Module level: as a class attribute a Logger takes the class's namespace.
ACCESS_LOG = Logger(namespace="appliance.secretproxy.access")


class RequestIds:
    """The caller's request ID when it is usable, else a new one."""

    def __init__(self) -> None:
        # A random per-process prefix and a counter: a random read per
        # request would be a system call each.
        self._prefix = os.urandom(8).hex().encode("ascii") + b"-"
        self._counter = itertools.count(1)

    def for_request(self, head: Any) -> bytes:
        """
        The caller's X-Request-Id when it is short and plain, sent once, and
        holds no known secret (it goes to the audit log as it is); else a
        new one.
        """
        given = head.fields.get(REQUEST_ID)
        if given is not None and REQUEST_ID not in head.repeated and _PLAIN_ID.fullmatch(given):
            text = given.decode("ascii")
            if redact(text) == text:
                return given
        return self.mint()

    def mint(self) -> bytes:
        """A new ID, unique in this process and, by its random prefix, beyond."""
        return b"%s%x" % (self._prefix, next(self._counter))


class DecisionAudit:
    """
    Writes one audit record per policy decision. The fields repeat from
    request to request but for the request ID and the duration, so their
    checked, redacted encoding is cached around two markers and only those
    two are spliced in (a request ID is plain by construction).
    """

    def __init__(self, audit: Any, on_error: Callable[[Failure], object]) -> None:
        self.audit = audit
        self.on_error = on_error
        self._parts: dict[Any, tuple[bytes, bytes, bytes]] = {}

    def record(self, request_id: bytes, identity: str, upstream: str, method: bytes,
               verdict: str, reason: str, source: str, duration: float) -> bool:
        """
        Audit one decision: whether the log took it (False: refused at once,
        e.g. its queue is full or it stopped after a disk error). A later
        write failure reaches C{on_error}.
        """
        key = (identity, upstream, method, verdict, reason, source)
        parts = self._parts.get(key)
        if parts is None:
            encoded = encode_fields({
                "event": "secretproxy.decision", "request_id": _REQUEST_ID_MARK,
                "identity": identity, "upstream": upstream, "method": method.decode("ascii"),
                "decision": verdict, "reason": reason, "source": source,
                "duration": _DURATION_MARK})
            # Sorted fields: the duration comes before the request ID.
            before, _, rest = encoded.partition(repr(_DURATION_MARK).encode("ascii"))
            middle, _, after = rest.partition(_REQUEST_ID_MARK.encode("ascii"))
            parts = (before, middle, after)
            if len(self._parts) >= _PARTS_MAX:
                self._parts.clear()
            self._parts[key] = parts
        return self.audit.record_encoded(
            b"%s%.6f%s%s%s" % (parts[0], duration, parts[1], request_id, parts[2]),
            self.on_error)


def log_access(method: bytes, path: str, status: int, upstream: str, identity: str,
               decision: str, duration: float, upstream_seconds: float, response_bytes: int,
               client: bytes, request_id: bytes) -> None:
    """One access-log line (C{access_log = true}): the path never has its query."""
    ACCESS_LOG.info(
        "{method} {path} {status} {upstream} {identity} {duration_ms:.1f}ms "
        "request_id={request_id}",
        method=method.decode("ascii"), path=path, status=status, upstream=upstream,
        identity=identity, duration_ms=duration * 1000, upstream_ms=upstream_seconds * 1000,
        response_bytes=response_bytes, decision=decision, client=client.decode("ascii"),
        request_id=request_id.decode("ascii"))

"""
The wire side of OPA's Data API: the canonical input document, the answer
parser, and small HTTP helpers (a body producer that needs no cooperator, a
bounded body reader that can be cancelled).
"""

from __future__ import annotations

import json
import json.encoder
import re
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from appliance.policy.model import PolicyDecision, PolicyInput

MAX_ANSWER_BYTES = 64 * 1024
"""Longest answer body read from OPA; a longer one is a failure."""

_SAFE_REASON = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:-]{0,63}")


class OPAError(Exception):
    """OPA answered, but not with something usable (status, size, shape)."""


@frozen
class Answer:
    """One OPA answer as a fresh decision and as the same decision from the cache."""

    fresh: PolicyDecision
    cached: PolicyDecision

    @classmethod
    def of(cls, allowed: bool, reason: str) -> Answer:
        """The answer C{allowed} with C{reason}, in both forms."""
        return cls(PolicyDecision(allowed, reason, "opa"),
                   PolicyDecision(allowed, reason, "cache"))


ALLOWED = Answer.of(True, "allowed by opa")
DENIED = Answer.of(False, "denied by opa")
UNDEFINED = Answer.of(False, "opa result undefined")


_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def canonical_json(input: PolicyInput) -> str:
    """
    C{input.as_document()} as canonical JSON (sorted keys, no spaces, ASCII):
    the cache key and the body of the question. Written out field by field,
    which is several times faster than C{json.dumps} on the cache-hit path
    (a property test checks that both agree).
    """
    try:
        attributes = ",".join(_string(k) + ":" + _string(v)
                              for k, v in sorted(input.attributes.items()))
        return "".join((
            '{"attributes":{', attributes,
            '},"identity":', _string(input.identity),
            ',"method":', _string(input.method),
            ',"namespace":', "null" if input.namespace is None else _string(input.namespace),
            ',"path":', _string(input.path),
            ',"service_account":', "null" if input.service_account is None
            else _string(input.service_account),
            ',"upstream":', _string(input.upstream), "}"))
    except TypeError:  # a value that is not a string, against the type hints
        return json.dumps(input.as_document(), sort_keys=True, separators=(",", ":"))


def parse_answer(body: bytes, input: PolicyInput) -> Answer:
    """
    Read an OPA Data API answer; raises L{OPAError} when it is not one.

    A reason OPA gives is kept only if it is short plain text that contains
    none of the request's values; otherwise the fixed reason is used.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise OPAError("OPA answered malformed JSON") from None
    if not isinstance(payload, dict):
        raise OPAError("OPA answered JSON that is not an object")
    if "result" not in payload:
        return UNDEFINED
    result = payload["result"]
    if result is True:
        return ALLOWED
    if result is False:
        return DENIED
    if not isinstance(result, dict):
        raise OPAError("OPA's result is neither a boolean nor an object")
    if "allow" not in result:
        return UNDEFINED
    allow = result["allow"]
    if not isinstance(allow, bool):
        raise OPAError("OPA's result.allow is not a boolean")
    reason = _safe_reason(result.get("reason"), input)
    if reason is None:
        return ALLOWED if allow else DENIED
    return Answer.of(allow, reason)


def _safe_reason(reason: Any, input: PolicyInput) -> str | None:
    if not isinstance(reason, str) or _SAFE_REASON.fullmatch(reason) is None:
        return None
    values = [input.identity, input.namespace, input.service_account,
              *input.attributes.values(), *input.path.split("/")]
    for value in values:
        if value is not None and len(value) >= 4 and value in reason:
            return None
    return reason


@implementer(IBodyProducer)
class BytesProducer:
    """A request body written at once (treq's default uses the global cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        """Write the whole body."""
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is already written."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _BodyReader(Protocol):
    """Collects a response body up to a limit; cancelling closes the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.errback(OPAError(f"OPA's answer is larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def read_body(response: Any, limit: int = MAX_ANSWER_BYTES) -> Deferred[bytes]:
    """A response's body, failing with L{OPAError} beyond C{limit} bytes."""
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    return reader.done

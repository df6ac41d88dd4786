"""
The pow wire format, sans-IO: a 6-byte header (version, message type,
payload length, big-endian) followed by a JSON object.

L{FrameDecoder.feed} turns bytes into frames and raises L{ProtocolError}
with a typed code for anything else; L{encode} does the reverse.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any, NamedTuple

VERSION = 1
HEADER = struct.Struct(">BBI")
DEFAULT_MAX_FRAME = 16 * 1024


class MessageType(IntEnum):
    """Message types; each payload is a JSON object."""

    CHALLENGE_REQUEST = 1
    CHALLENGE = 2
    SOLUTION = 3
    QUOTE = 4
    ERROR = 5


class ErrorCode:
    """The error codes an ERROR frame carries (then the server closes)."""

    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    WRONG_ADDRESS = "wrong_address"
    INSUFFICIENT_WORK = "insufficient_work"
    REPLAYED = "replayed"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    TIMEOUT = "timeout"

    ALL = (BAD_FRAME, TOO_LARGE, UNKNOWN_TYPE, BAD_SIGNATURE, EXPIRED, WRONG_ADDRESS,
           INSUFFICIENT_WORK, REPLAYED, RATE_LIMITED, BUSY, TIMEOUT)


class ProtocolError(Exception):
    """A peer broke the protocol; C{code} is one of L{ErrorCode}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Frame(NamedTuple):
    """One decoded message (a tuple: the cheapest immutable record to build)."""

    type: MessageType
    payload: dict[str, Any]


_TYPES = {member.value: member for member in MessageType}
# The C encoder behind json.dumps, built once: JSONEncoder.encode builds it
# anew on every call, which was half the cost of encoding a small frame.
# No circular-reference markers: payloads are plain trees built here.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ENCODE = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False,
    True,
) if json.encoder.c_make_encoder is not None else None  # type: ignore[attr-defined]


def _to_json(payload: dict[str, Any]) -> str:
    if _ENCODE is None:
        return _ENCODER.encode(payload)
    return "".join(_ENCODE(payload, 0))


def encode(message_type: MessageType, payload: dict[str, Any]) -> bytes:
    """Serialise one frame."""
    return encode_text(message_type, _to_json(payload))


def encode_text(message_type: MessageType, payload_json: str) -> bytes:
    """Serialise one frame whose payload is already JSON text."""
    body = payload_json.encode("utf-8")
    return HEADER.pack(VERSION, message_type, len(body)) + body


def error_frame(code: str, message: str) -> bytes:
    """An ERROR frame."""
    return encode(MessageType.ERROR, {"code": code, "message": message})


class FrameDecoder:
    """
    Incremental decoder. After a L{ProtocolError} the decoder is poisoned:
    the connection is to be closed, so no resynchronisation is attempted.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        """Whether part of a frame is buffered (the frame deadline runs)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every complete frame."""
        if not self._buffer and len(data) >= HEADER.size:
            # The common case, one whole frame in one read: no buffer copies.
            version, type_code, length = HEADER.unpack_from(data)
            message_type = _TYPES.get(type_code)
            if (version == VERSION and length <= self.max_frame and message_type is not None
                    and len(data) == HEADER.size + length):
                return [Frame(message_type, _decode_payload(data[HEADER.size:]))]
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            version, type_code, length = HEADER.unpack_from(self._buffer)
            if version != VERSION:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"unsupported version {version}")
            if length > self.max_frame:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"frame of {length} bytes exceeds {self.max_frame}")
            message_type = _TYPES.get(type_code)
            if message_type is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {type_code}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            frames.append(Frame(message_type, _decode_payload(body)))
        return frames


_DECODER = json.JSONDecoder()


def _decode_payload(body: bytes) -> dict[str, Any]:
    if body == b"{}":  # every CHALLENGE_REQUEST
        return {}
    try:
        payload = _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_FRAME, "payload is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "payload must be a JSON object")
    return payload

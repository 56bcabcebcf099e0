"""Length-prefixed CBOR frames between the node and its executor workers.

A 4-byte big-endian length then a CBOR map: no pickle, so a compromised or
confused worker can hand the node nothing but data, and tensors ride along as
``.npz`` byte strings without base64 inflation.
"""

from __future__ import annotations

import struct
from typing import IO, Any

import cbor2

from storage.car import cbor_head

HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 32) - 1


class FrameError(Exception):
    """The peer sent something that is not a frame; the channel is unusable."""


BIG_BYTES = 1 << 20
"""A top-level byte string from this size on is written as is, not copied into the CBOR."""


def _head(major: int, length: int) -> bytes:
    """storage.car's CBOR item head, failing with this channel's one error type."""
    try:
        return cbor_head(major, length)
    except ValueError:
        raise FrameError(f"a CBOR length of {length} does not fit") from None


def encode_parts(message: dict[str, Any]) -> list[bytes]:
    """The frame as parts to write one after another: header, then the payload.

    The payload is the bytes ``cbor2.dumps(message)`` gives, but a top-level
    value that is a byte string of BIG_BYTES or more (a job's tensor bundle)
    is a part of its own instead of being copied into the encoder's buffer and
    out of it again: for the 96 MB output of an OCR batch those two copies took
    about 130 ms of the worker's time.
    """
    parts: list[bytes] = [_head(5, len(message))]
    small: list[bytes] = []
    for key, value in message.items():
        if isinstance(value, bytes) and len(value) >= BIG_BYTES:
            if small:
                parts.append(b"".join(small))
                small = []
            parts.append(cbor2.dumps(key) + _head(2, len(value)))
            parts.append(value)
        else:
            small.append(cbor2.dumps(key) + cbor2.dumps(value))
    if small:
        parts.append(b"".join(small))
    length = sum(len(part) for part in parts)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the 4 GiB limit")
    return [HEADER.pack(length), *parts]


def decode_payload(payload: bytes | memoryview) -> dict[str, Any]:
    try:
        message = cbor2.loads(payload)
    except Exception as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError(f"frame is a {type(message).__name__}, expected a map")
    return message


def write_frame(stream: IO[bytes], message: dict[str, Any]) -> None:
    for part in encode_parts(message):
        stream.write(part)
    stream.flush()


def read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    """Blocking read for the worker side; None on a clean end of stream."""
    header = stream.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise FrameError("stream ended inside a frame header")
    (length,) = HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise FrameError(f"stream ended after {len(payload)} of {length} payload bytes")
    return decode_payload(payload)


# A line the worker writes to stderr after each job, before its reply frame.
END_OF_JOB_STDERR = "meshrun-worker: end of job stderr"

"""Length-prefixed CBOR frames between the node and its executor workers.

A 4-byte big-endian length then a CBOR map: no pickle, so a compromised or
confused worker can hand the node nothing but data, and tensors ride along as
``.npz`` byte strings without base64 inflation.
"""

from __future__ import annotations

import struct
from typing import IO, Any

import cbor2

HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 32) - 1


class FrameError(Exception):
    """The peer sent something that is not a frame; the channel is unusable."""


def encode_frame(message: dict[str, Any]) -> tuple[bytes, bytes]:
    """Header and payload separately, so a large payload is never copied to prepend 4 bytes."""
    payload = cbor2.dumps(message)
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the 4 GiB limit")
    return HEADER.pack(len(payload)), payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        message = cbor2.loads(payload)
    except Exception as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError(f"frame is a {type(message).__name__}, expected a map")
    return message


def write_frame(stream: IO[bytes], message: dict[str, Any]) -> None:
    header, payload = encode_frame(message)
    stream.write(header)
    stream.write(payload)
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

"""The worker pipe's frames: the parts written without copying big byte strings are,
joined, exactly what cbor2 encodes, and read back whole."""

from __future__ import annotations

import io
import os

import cbor2
import pytest

from node.executor.framing import (
    BIG_BYTES,
    HEADER,
    FrameError,
    _head,
    decode_payload,
    encode_parts,
    read_frame,
    write_frame,
)

BIG = os.urandom(BIG_BYTES + 17)


@pytest.mark.parametrize(
    "length", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
)
def test_a_head_is_what_cbor2_writes(length: int) -> None:
    assert _head(0, length) == cbor2.dumps(length)


def test_a_length_past_64_bits_is_refused() -> None:
    with pytest.raises(FrameError):
        _head(2, 2**64)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"type": "pong"},
        {"type": "result", "outputs": BIG, "timings": {"run_ms": 1.5}},
        {"outputs": BIG},
        {"a": BIG, "b": b"small", "c": BIG[:BIG_BYTES], "d": [1, 2, {"x": b"y"}]},
        {f"k{i}": i for i in range(40)},
        {"text": "x" * (BIG_BYTES + 5), "bytes": bytearray(b"not bytes, copied")},
    ],
)
def test_the_parts_join_to_cbor2s_encoding(message: dict) -> None:
    header, *parts = encode_parts(message)
    payload = b"".join(parts)
    assert payload == cbor2.dumps(message)
    assert HEADER.unpack(header) == (len(payload),)
    assert decode_payload(memoryview(bytearray(payload))) == message


def test_a_big_byte_string_is_its_own_part_not_a_copy() -> None:
    parts = encode_parts({"type": "result", "outputs": BIG, "n": 3})
    assert any(part is BIG for part in parts)


def test_a_frame_written_in_parts_reads_back_whole() -> None:
    stream = io.BytesIO()
    write_frame(stream, {"type": "result", "outputs": BIG})
    write_frame(stream, {"type": "pong"})
    stream.seek(0)
    assert read_frame(stream) == {"type": "result", "outputs": BIG}
    assert read_frame(stream) == {"type": "pong"}
    assert read_frame(stream) is None

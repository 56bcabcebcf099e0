"""Hostile inputs built by hand, cheaply: a peer's attack, not a library's output."""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib

import numpy as np

_MIB = 1 << 20


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def zip_archive(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, stored bytes, method, crc, declared uncompressed size) entries.

    Written field by field, so the declared size and CRC can be whatever a test wants.
    """
    out = bytearray()
    central = bytearray()
    for name, stored, method, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(stored), size, len(raw), 0
        )
        out += raw + stored
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(stored),
            size,
            len(raw),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += raw
    count = len(members)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(out), 0)
    return bytes(out + central + end)


def deflated_zeros(prefix: bytes, mib: int) -> bytes:
    """A raw deflate stream of `prefix` then `mib` MiB of zeros, built in milliseconds."""
    zeros = bytes(_MIB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor starts afresh, so every MiB of zeros
    # deflates to the same bytes and the stream is that block repeated.
    assert deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) == block
    return head + block * mib + deflate.flush()


def header_bomb(mib: int = 1024) -> bytes:
    """An .npy member whose format-2.0 header says it is `mib` MiB long (zeros follow).

    numpy reads a header whole before checking its length; the CRC is wrong,
    which only a reader that got to the end would notice.
    """
    prefix = b"\x93NUMPY\x02\x00" + struct.pack("<I", mib * _MIB)
    stream = deflated_zeros(prefix, mib)
    return zip_archive([("x.npy", stream, zipfile.ZIP_DEFLATED, 0, len(prefix) + mib * _MIB)])


@functools.cache
def zip_bomb(mib: int = 2048, members: int = 1) -> bytes:
    """A real .npz bomb: `members` float32 tensors of `mib` MiB of zeros each, ~1 KiB per MiB.

    Valid in every respect (sizes, CRC): ``np.load`` would expand all of it.
    """
    header = npy_header((mib * _MIB // 4,))
    stream = deflated_zeros(header, mib)
    crc = zlib.crc32(header)
    zeros = bytes(_MIB)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    size = len(header) + mib * _MIB
    return zip_archive(
        [(f"x{i}.npy", stream, zipfile.ZIP_DEFLATED, crc, size) for i in range(members)]
    )

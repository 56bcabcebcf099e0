"""CARv1 archives: a DAG as one file that `ipfs dag import` / `dag export` understand.

Written by hand rather than with a CAR library: the format is a varint-framed
DAG-CBOR header (`{"roots": [CID], "version": 1}`) followed by
varint-framed `CID bytes + block bytes` sections, about sixty lines either way,
and none of the Python CAR packages is typed or streams both ways. Doing it
here keeps the writer a generator (a CAR of any size goes out in constant
memory, one block at a time) and lets the reader hash every block before
anyone stores it, which a third-party iterator would not promise.

The header is emitted byte for byte as go-car and js `@ipld/car` write it
(canonical DAG-CBOR: "roots" before "version", CIDs as tag 42 over a 0x00
prefixed binary CID), and blocks go out in depth-first pre-order without
duplicates, the order `ipfs dag export` uses, so an exported CAR of a DAG is
the same file Kubo would produce.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import cbor2

from storage.cid import Cid, VarintError, decode_uvarint, encode_uvarint
from storage.errors import ContentTooLarge, CorruptBlock, InvalidCid, MalformedBlock
from storage.unixfs import GetBlock, block_links, fetch_verified

__all__ = [
    "CAR_MEDIA_TYPE",
    "MAX_BLOCK_BYTES",
    "MAX_HEADER_BYTES",
    "CarImport",
    "CarReader",
    "cbor_head",
    "encode_header",
    "import_car",
    "iter_car",
    "walk_dag",
    "write_car",
]

CAR_MEDIA_TYPE = "application/vnd.ipld.car"
# Kubo refuses blocks over 4 MiB without --allow-big-block; so do we.
MAX_BLOCK_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_CID_TAG = 42


class _PutBlock(Protocol):
    def put(self, cid: Cid, data: bytes) -> None: ...


def cbor_head(major: int, value: int) -> bytes:
    """A CBOR item head (RFC 8949 section 3) in the shortest form, as cbor2 writes it."""
    if value < 24:
        return bytes([major << 5 | value])
    for extra, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([major << 5 | extra]) + value.to_bytes(width, "big")
    raise ValueError("CBOR length too large")


def _cbor_text(text: str) -> bytes:
    raw = text.encode("utf-8")
    return cbor_head(3, len(raw)) + raw


def encode_header(roots: Sequence[Cid]) -> bytes:
    """The varint-framed canonical DAG-CBOR header for these roots."""
    body = bytearray(cbor_head(5, 2))
    body += _cbor_text("roots") + cbor_head(4, len(roots))
    for root in roots:
        raw = b"\x00" + root.to_bytes()
        body += cbor_head(6, _CID_TAG) + cbor_head(2, len(raw)) + raw
    body += _cbor_text("version") + cbor_head(0, 1)
    return encode_uvarint(len(body)) + bytes(body)


def _section(cid: Cid, data: bytes) -> bytes:
    raw = cid.to_bytes()
    return encode_uvarint(len(raw) + len(data)) + raw


def walk_dag(get_block: GetBlock, roots: Iterable[Cid]) -> Iterator[tuple[Cid, bytes]]:
    """Every block under `roots`, verified, depth-first pre-order, each once.

    Duplicates are detected by multihash so a v0 and a v1 link to the same
    bytes export one block, as Kubo does.
    """
    seen: set[bytes] = set()
    stack = list(reversed(list(roots)))
    while stack:
        cid = stack.pop()
        if cid.multihash in seen:
            continue
        seen.add(cid.multihash)
        block = fetch_verified(get_block, cid)
        yield cid, block
        stack.extend(reversed(block_links(cid, block)))


def iter_car(get_block: GetBlock, roots: Sequence[Cid]) -> Iterator[bytes]:
    """The CAR of the DAGs under `roots` as a stream of byte strings."""
    if not roots:
        raise ValueError("a CAR needs at least one root")
    yield encode_header(roots)
    for cid, block in walk_dag(get_block, roots):
        yield _section(cid, block)
        yield block


def write_car(get_block: GetBlock, roots: Sequence[Cid], out: BinaryIO) -> int:
    """Write the CAR to `out`; returns the bytes written."""
    written = 0
    for piece in iter_car(get_block, roots):
        out.write(piece)
        written += len(piece)
    return written


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise MalformedBlock(f"CAR truncated in {what}")
    return data


def _read_varint(stream: BinaryIO, what: str) -> int | None:
    """A varint from the stream, or None at a clean end of file."""
    raw = bytearray()
    while True:
        byte = stream.read(1)
        if not byte:
            if raw:
                raise MalformedBlock(f"CAR truncated in {what} length")
            return None
        raw += byte
        if not byte[0] & 0x80:
            break
        if len(raw) >= 9:
            raise MalformedBlock(f"CAR {what} length varint too long")
    try:
        value, _ = decode_uvarint(bytes(raw))
    except VarintError as exc:
        raise MalformedBlock(f"CAR {what} length: {exc}") from None
    return value


def _decode_root(item: object) -> Cid:
    if not isinstance(item, cbor2.CBORTag) or item.tag != _CID_TAG:
        raise MalformedBlock("CAR header: a root is not a CID (tag 42)")
    raw = item.value
    if not isinstance(raw, bytes) or not raw.startswith(b"\x00"):
        raise MalformedBlock("CAR header: a root CID lacks the 0x00 multibase prefix")
    try:
        return Cid.from_bytes(raw[1:])
    except InvalidCid as exc:
        raise MalformedBlock(f"CAR header: bad root CID: {exc}") from None


def _split_cid(section: bytes) -> tuple[Cid, bytes]:
    """A section's CID and block; the CID's length is found by parsing it."""
    try:
        if section[:2] == b"\x12\x20":
            return Cid.from_bytes(section[:34]), section[34:]
        version, pos = decode_uvarint(section)
        _codec, pos = decode_uvarint(section, pos)
        _hash_code, pos = decode_uvarint(section, pos)
        digest_len, pos = decode_uvarint(section, pos)
    except VarintError as exc:
        raise MalformedBlock(f"CAR section: bad CID: {exc}") from None
    if version != 1:
        raise MalformedBlock(f"CAR section: CID version {version}")
    end = pos + digest_len
    if end > len(section):
        raise MalformedBlock("CAR section: CID runs past the section")
    try:
        return Cid.from_bytes(section[:end]), section[end:]
    except InvalidCid as exc:
        raise MalformedBlock(f"CAR section: bad CID: {exc}") from None


class CarReader:
    """Streams (CID, block) pairs out of a CARv1, each verified against its CID.

    Nothing is trusted: sizes are bounded before anything is read into memory,
    and a block that does not hash to its CID raises CorruptBlock before it is
    yielded, so a caller can store whatever comes out without checking again.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        length = _read_varint(stream, "header")
        if length is None:
            raise MalformedBlock("empty CAR file")
        if length == 0 or length > MAX_HEADER_BYTES:
            raise MalformedBlock(f"CAR header of {length} bytes is out of bounds")
        raw = _read_exact(stream, length, "header")
        try:
            header = cbor2.loads(raw)
        except Exception as exc:  # cbor2 raises many types on garbage
            raise MalformedBlock(f"CAR header is not CBOR: {exc}") from None
        if not isinstance(header, dict) or header.get("version") != 1:
            version = header.get("version") if isinstance(header, dict) else None
            raise MalformedBlock(f"only CARv1 is supported (header says version {version!r})")
        roots = header.get("roots")
        if not isinstance(roots, list):
            raise MalformedBlock("CAR header: roots is not a list")
        self.roots: list[Cid] = [_decode_root(item) for item in roots]

    def __iter__(self) -> Iterator[tuple[Cid, bytes]]:
        while True:
            length = _read_varint(self._stream, "section")
            if length is None:
                return
            if length == 0 or length > MAX_BLOCK_BYTES + 128:
                raise MalformedBlock(f"CAR section of {length} bytes is out of bounds")
            cid, block = _split_cid(_read_exact(self._stream, length, "section"))
            try:
                valid = cid.verify(block)
            except InvalidCid as exc:
                raise CorruptBlock(f"CAR block {cid}: {exc}") from None
            if not valid:
                raise CorruptBlock(f"CAR block {cid} does not hash to its CID")
            yield cid, block


@dataclass
class CarImport:
    roots: list[Cid]
    blocks: int = 0
    bytes: int = 0
    cids: list[Cid] = field(default_factory=list, repr=False)


def import_car(
    store: _PutBlock, stream: BinaryIO, *, keep_cids: bool = False, max_bytes: int | None = None
) -> CarImport:
    """Put every block of a CAR into `store` (each verified before it is written).

    With `max_bytes`, ContentTooLarge is raised at the first block that would
    take the blocks past it (those before it are written: the caller discards).
    """
    reader = CarReader(stream)
    result = CarImport(roots=list(reader.roots))
    for cid, block in reader:
        if max_bytes is not None and result.bytes + len(block) > max_bytes:
            raise ContentTooLarge(
                f"CAR of {reader.roots} holds more than {max_bytes} bytes of blocks",
                limit=max_bytes,
                size=result.bytes + len(block),
            )
        store.put(cid, block)
        result.blocks += 1
        result.bytes += len(block)
        if keep_cids:
            result.cids.append(cid)
    return result

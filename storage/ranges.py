"""Random access into UnixFS files: size and byte ranges without reading the whole file.

An HTTP `Range` request for the last megabyte of a 1 GiB result must not hash
the 4000 leaves before it. The `blocksizes` recorded in every inner node say
how much content each child holds, so a range read descends only into the
children that overlap the range; every block it does read is still verified
against its CID and every size it relies on is checked against the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

from storage.cid import DAG_PB, RAW, Cid
from storage.errors import MalformedBlock, UnexpectedNodeType, UnsupportedDag
from storage.unixfs import (
    FT_DIRECTORY,
    FT_FILE,
    FT_HAMT_SHARD,
    FT_RAW,
    MAX_DEPTH,
    GetBlock,
    decode_pbnode,
    decode_unixfs,
    fetch_verified,
)

__all__ = ["file_size", "is_directory", "iter_file_range"]


def _file_node(cid: Cid, block: bytes) -> tuple[list[Cid], list[int], bytes, int]:
    """(child CIDs, child sizes, inline data, declared file size) of a file node."""
    if cid.codec != DAG_PB:
        raise UnsupportedDag(f"{cid}: codec 0x{cid.codec:x} is not a UnixFS file")
    node = decode_pbnode(block)
    if node.data is None:
        raise MalformedBlock(f"{cid}: dag-pb node without UnixFS data")
    fs = decode_unixfs(node.data)
    if fs.type in (FT_DIRECTORY, FT_HAMT_SHARD):
        raise UnexpectedNodeType(f"{cid} is a directory, not a file")
    if fs.type not in (FT_FILE, FT_RAW):
        raise UnsupportedDag(f"{cid}: UnixFS type {fs.type} is not a regular file")
    if node.links and len(fs.blocksizes) != len(node.links):
        raise MalformedBlock(f"{cid}: {len(node.links)} links but {len(fs.blocksizes)} blocksizes")
    data = fs.data or b""
    total = len(data) + sum(fs.blocksizes)
    if fs.filesize is not None and fs.filesize != total:
        raise MalformedBlock(f"{cid}: blocksizes add up to {total}, filesize says {fs.filesize}")
    return [link.cid for link in node.links], list(fs.blocksizes), data, total


def is_directory(get_block: GetBlock, cid: Cid) -> bool:
    if cid.codec != DAG_PB:
        return False
    node = decode_pbnode(fetch_verified(get_block, cid))
    if node.data is None:
        raise MalformedBlock(f"{cid}: dag-pb node without UnixFS data")
    fs = decode_unixfs(node.data)
    if fs.type == FT_HAMT_SHARD:
        raise UnsupportedDag(f"{cid}: HAMT-sharded directories are not supported")
    return fs.type == FT_DIRECTORY


def file_size(get_block: GetBlock, cid: Cid) -> int:
    """Content length of a UnixFS file, from its root block alone."""
    block = fetch_verified(get_block, cid)
    if cid.codec == RAW:
        return len(block)
    return _file_node(cid, block)[3]


def _iter_range(
    get_block: GetBlock, cid: Cid, start: int, end: int, depth: int, expected: int | None
) -> Iterator[bytes]:
    """Content bytes [start, end) of the file at `cid` (offsets relative to it)."""
    if depth > MAX_DEPTH:
        raise MalformedBlock(f"file DAG deeper than {MAX_DEPTH} levels")
    block = fetch_verified(get_block, cid)
    if cid.codec == RAW:
        if expected is not None and len(block) != expected:
            raise MalformedBlock(f"{cid}: leaf of {len(block)} bytes, parent says {expected}")
        if start < end:
            yield block[start:end]
        return
    children, sizes, data, total = _file_node(cid, block)
    if expected is not None and total != expected:
        raise MalformedBlock(f"{cid}: content is {total} bytes, parent says {expected}")
    pos = 0
    if data:
        if start < len(data) and end > 0:
            yield data[max(start, 0) : min(end, len(data))]
        pos = len(data)
    for child, size in zip(children, sizes, strict=True):
        child_start, child_end = pos, pos + size
        if child_start >= end:
            break
        if child_end > start:
            yield from _iter_range(
                get_block,
                child,
                max(start - child_start, 0),
                min(end, child_end) - child_start,
                depth + 1,
                size,
            )
        pos = child_end


def iter_file_range(
    get_block: GetBlock, cid: Cid, offset: int = 0, length: int | None = None
) -> Iterator[bytes]:
    """Stream `length` bytes of a UnixFS file from `offset` (to the end if None)."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must not be negative")
    end = offset + length if length is not None else 1 << 63
    return _iter_range(get_block, cid, offset, end, 0, None)

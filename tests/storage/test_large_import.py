"""A 1 GiB file imports in constant memory: the streaming importer holds one chunk
and one link list per tree level, never the file."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator

import pytest

from storage.cid import DAG_PB, RAW, Cid
from storage.unixfs import CHUNK_SIZE, MAX_LINKS, FileImporter, decode_pbnode, decode_unixfs

GIB = 1024**3
PIECE = 1024 * 1024 + 17  # odd, so writes never line up with chunk boundaries


def _generated(total: int) -> Iterator[bytes]:
    """Distinct pieces made on the fly; only one exists at a time."""
    base = bytearray(b"meshrun!" * (PIECE // 8 + 1))[:PIECE]
    sent = 0
    counter = 0
    while sent < total:
        base[:8] = counter.to_bytes(8, "little")
        piece = bytes(base[: min(PIECE, total - sent)])
        sent += len(piece)
        counter += 1
        yield piece


@pytest.mark.slow
def test_one_gib_imports_in_constant_memory() -> None:
    seen = {"raw": 0, "pb": 0, "bytes": 0}
    root_block: dict[Cid, bytes] = {}

    def sink(cid: Cid, block: bytes) -> None:
        # Keep nothing but counts (and the last dag-pb block: the root comes last).
        seen["raw" if cid.codec == RAW else "pb"] += 1
        seen["bytes"] += len(block)
        if cid.codec == DAG_PB:
            root_block.clear()
            root_block[cid] = block

    tracemalloc.start()
    started = time.perf_counter()
    try:
        importer = FileImporter(sink)
        baseline = tracemalloc.get_traced_memory()[0]
        for piece in _generated(GIB):
            importer.write(piece)
            del piece
        result = importer.finish()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started

    leaves = GIB // CHUNK_SIZE
    inner = -(-leaves // MAX_LINKS)
    assert seen["raw"] == leaves
    assert seen["pb"] == inner + 1
    assert result.size == GIB
    [(root, block)] = root_block.items()
    assert root == result.cid
    node = decode_pbnode(block)
    assert node.data is not None and decode_unixfs(node.data).filesize == GIB
    assert len(node.links) == inner
    # One piece in flight, one chunk buffered, the link lists: a few MiB, not 1 GiB.
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert seconds < 60, f"1 GiB took {seconds:.1f}s"

"""Byte ranges of UnixFS files (storage.ranges), as the gateway's Range support uses them."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.blockstore import MemoryBlockstore
from storage.cid import Cid
from storage.errors import CorruptBlock, UnexpectedNodeType
from storage.ranges import file_size, is_directory, iter_file_range
from storage.unixfs import build_tree, import_bytes

DATA = random.Random(2).randbytes(10_007)


def _deep() -> tuple[MemoryBlockstore, Cid]:
    """Chunks of 100 bytes, 3 links per node: a tree five levels deep."""
    store = MemoryBlockstore()
    return store, import_bytes(DATA, store.put, chunk_size=100, max_links=3).cid


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(DATA) + 50), st.one_of(st.none(), st.integers(0, len(DATA) + 50)))
def test_any_range_equals_slicing(offset: int, length: int | None) -> None:
    store, root = _deep()
    got = b"".join(iter_file_range(store.get, root, offset, length))
    end = None if length is None else offset + length
    assert got == DATA[offset:end]


def test_a_range_reads_only_the_blocks_it_needs() -> None:
    store, root = _deep()
    reads: list[Cid] = []

    def get(cid: Cid) -> bytes:
        reads.append(cid)
        return store.get(cid)

    assert b"".join(iter_file_range(get, root, 5000, 150)) == DATA[5000:5150]
    total_blocks = len(list(store.iter_cids()))
    assert len(reads) < 15 < total_blocks  # a path down the tree, not the whole file


def test_sizes_and_kinds() -> None:
    store, root = _deep()
    assert file_size(store.get, root) == len(DATA)
    raw = store.add_bytes(b"tiny")
    assert file_size(store.get, raw) == 4
    tree = build_tree({"a/b.txt": b"x"}, store.put)
    assert is_directory(store.get, tree)
    assert not is_directory(store.get, root)
    with pytest.raises(UnexpectedNodeType):
        file_size(store.get, tree)
    with pytest.raises(ValueError):
        list(iter_file_range(store.get, root, -1))


def test_a_corrupt_leaf_in_the_range_is_detected() -> None:
    store, root = _deep()
    leaf = next(c for c in store.iter_cids() if store.get(c) == DATA[200:300])
    store._blocks[leaf.to_v1()] = b"\0" * 100  # the disk lies about one leaf

    def unchecked(cid: Cid) -> bytes:  # a source that does not verify, like a peer
        return store._blocks[cid.to_v1()]

    assert b"".join(iter_file_range(unchecked, root, 0, 150)) == DATA[:150]
    with pytest.raises(CorruptBlock):
        b"".join(iter_file_range(unchecked, root, 150, 100))

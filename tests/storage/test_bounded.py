"""Bounded DAG reads and walks: a UnixFS bomb is refused before it is read (issue 8).

Every read or walk counts logical size per link (a block reached by many
links counts each time), checks declared sizes against what arrives, and
stops at the first contradiction or at the budget, not after materialising
the content.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from storage.blockstore import Blockstore, FileBlockstore, MemoryBlockstore
from storage.car import import_car, iter_car
from storage.cid import Cid, cid_for_raw
from storage.errors import ContentTooLarge, MalformedBlock
from storage.unixfs import (
    CHUNK_SIZE,
    FT_FILE,
    DagWalk,
    PBLink,
    UnixFSData,
    build_tree,
    encode_pbnode,
    encode_unixfs,
    import_bytes,
    iter_file,
    read_tree,
)
from tests.storage.bombs import directory_of, file_bomb, leaf_bytes, pb_cid

MiB = 1024 * 1024
GiB = 1024 * MiB


class CountingGet:
    """A block getter that records how many bytes a reader pulled."""

    def __init__(self, blocks: dict[Cid, bytes]) -> None:
        self.blocks = blocks
        self.calls = 0
        self.bytes = 0

    def __call__(self, cid: Cid) -> bytes:
        block = self.blocks[cid]
        self.calls += 1
        self.bytes += len(block)
        return block


# --- the measured bomb --------------------------------------------------------


def test_measured_bomb_is_small_on_the_wire_and_huge_when_read() -> None:
    bomb = file_bomb()  # 4096 links x 256 KiB, Tsizes of 1
    assert bomb.declared_content == bomb.logical_content == GiB
    assert 440 * 1024 < bomb.wire_bytes < 460 * 1024  # the 448 KiB of the report


def test_reader_refuses_the_bomb_after_its_root_block() -> None:
    bomb = file_bomb()  # 1 GiB of content in a DAG whose Tsizes add up to ~200 KB
    get = CountingGet(bomb.blocks)
    with pytest.raises(ContentTooLarge, match="declares 1073741824 bytes of content") as info:
        next(iter_file(get, bomb.root))  # no budget needed: the Tsizes give it away
    assert info.value.size == GiB
    assert (get.calls, get.bytes) == (1, len(bomb.blocks[bomb.root]))  # the leaf never read


def test_reader_refuses_an_honest_bomb_over_budget_after_its_root_block() -> None:
    bomb = file_bomb(tsize=None)  # every size true: a 1 GiB file made of one leaf
    get = CountingGet(bomb.blocks)
    with pytest.raises(ContentTooLarge) as info:
        next(iter_file(get, bomb.root, max_bytes=64 * MiB))
    assert info.value.limit == 64 * MiB and info.value.size == GiB
    assert (get.calls, get.bytes) == (1, len(bomb.blocks[bomb.root]))


def test_reader_stops_at_the_first_block_bigger_than_declared() -> None:
    # blocksizes and filesize lie too (1 byte per link): the file claims 4 KiB.
    bomb = file_bomb(blocksize=1)
    assert bomb.declared_content == 4096
    get = CountingGet(bomb.blocks)
    out: list[bytes] = []
    with pytest.raises(ContentTooLarge, match="declares 1"):
        out.extend(iter_file(get, bomb.root))  # no budget needed: the lie alone stops it
    assert out == []
    assert get.calls == 2  # the root and one copy of the leaf: nothing yielded


def test_budget_counts_a_block_once_per_link() -> None:
    bomb = file_bomb(100, leaf_size=1024, tsize=None)  # honest: 100 KiB from one 1 KiB leaf
    get = CountingGet(bomb.blocks)
    assert len(b"".join(iter_file(get, bomb.root, max_bytes=100 * 1024))) == 100 * 1024
    get = CountingGet(bomb.blocks)
    with pytest.raises(ContentTooLarge):
        next(iter_file(get, bomb.root, max_bytes=100 * 1024 - 1))
    assert get.calls == 1


def test_reader_budget_is_exact_for_a_kubo_file() -> None:
    blocks: dict[Cid, bytes] = {}
    data = os.urandom(300_000)
    res = import_bytes(data, blocks.__setitem__, chunk_size=4096, max_links=8)
    assert b"".join(iter_file(blocks.__getitem__, res.cid, max_bytes=len(data))) == data
    get = CountingGet(blocks)
    with pytest.raises(ContentTooLarge):
        next(iter_file(get, res.cid, max_bytes=len(data) - 1))
    assert get.calls == 1


def test_inner_node_lying_to_its_parent_is_caught_before_its_children() -> None:
    # Root says its one child holds 10 bytes; the child holds 4096 x 256 KiB.
    inner = file_bomb(tsize=None)
    data = encode_unixfs(UnixFSData(FT_FILE, filesize=10, blocksizes=(10,)))
    root_block = encode_pbnode([PBLink(inner.root, "", 10)], data)
    blocks = {**inner.blocks, pb_cid(root_block): root_block}
    get = CountingGet(blocks)
    with pytest.raises(ContentTooLarge, match="declares 10"):
        list(iter_file(get, pb_cid(root_block)))
    assert get.calls == 2  # root and inner; not one leaf


def test_read_tree_pays_for_each_link_to_a_shared_file() -> None:
    blocks: dict[Cid, bytes] = {}
    content = b"x" * 600
    leaf = cid_for_raw(content)
    blocks[leaf] = content
    root = directory_of({"a": (leaf, 600), "b": (leaf, 600)}, blocks)
    assert read_tree(blocks.__getitem__, root, max_bytes=1200) == {"a": content, "b": content}
    with pytest.raises(ContentTooLarge):
        read_tree(blocks.__getitem__, root, max_bytes=1199)


def test_read_tree_caps_entries_of_a_directory_diamond() -> None:
    # 40 levels of "a" and "b" both linking the next directory: 2**40 paths.
    blocks: dict[Cid, bytes] = {}
    leaf = cid_for_raw(b"")
    blocks[leaf] = b""
    cid, tsize = directory_of({"f": (leaf, 0)}, blocks), 0
    for _ in range(40):
        tsize = len(blocks[cid]) + tsize  # the child's cumulative size
        cid = directory_of({"a": (cid, tsize), "b": (cid, tsize)}, blocks)
        tsize *= 2  # what the new directory's links add up to
    started = time.perf_counter()
    with pytest.raises(ContentTooLarge, match="directory entries"):
        read_tree(blocks.__getitem__, cid, max_entries=5000)
    assert time.perf_counter() - started < 5


# --- DagWalk: the fetcher's incremental check ----------------------------------


def _walk_all(walk: DagWalk, blocks: dict[Cid, bytes]) -> list[Cid]:
    """Visit a DAG the way a fetcher would; return the CIDs in the order visited."""
    order, queue = [], [walk.root]
    while queue:
        cid = queue.pop(0)
        order.append(cid)
        queue += walk.visit(cid, blocks[cid])
    return order


def test_walk_of_a_kubo_dag_measures_what_kubo_declares() -> None:
    blocks: dict[Cid, bytes] = {}
    data = leaf_bytes(200_000) + os.urandom(50_000)
    res = import_bytes(data, blocks.__setitem__, chunk_size=1024, max_links=4)
    walk = DagWalk(res.cid, max_bytes=res.dag_size)
    assert len(_walk_all(walk, blocks)) == len(blocks)  # repeated leaves fetched once
    assert (walk.dag_size, walk.content_size) == (res.dag_size, len(data))
    with pytest.raises(ContentTooLarge):
        DagWalk(res.cid, max_bytes=res.dag_size - 1).visit(res.cid, blocks[res.cid])


def test_walk_of_a_directory_tree() -> None:
    blocks: dict[Cid, bytes] = {}
    root = build_tree({"a/x.bin": os.urandom(5000), "b.txt": b"hi", "c": b""}, blocks.__setitem__)
    walk = DagWalk(root, max_bytes=10_000)
    _walk_all(walk, blocks)
    assert walk.content_size is None and walk.dag_size is not None and walk.dag_size > 5000


def test_walk_refuses_the_measured_bomb_at_its_root() -> None:
    bomb = file_bomb()
    walk = DagWalk(bomb.root, max_bytes=2 * GiB)  # even a generous budget
    with pytest.raises(ContentTooLarge, match="declares 1073741824 bytes of content"):
        walk.visit(bomb.root, bomb.blocks[bomb.root])
    assert walk.visited_bytes == 0


def test_walk_refuses_an_honest_bomb_over_budget_and_takes_one_within() -> None:
    bomb = file_bomb(tsize=None)  # Tsizes tell the truth: it declares a 1 GiB DAG
    with pytest.raises(ContentTooLarge):
        DagWalk(bomb.root, max_bytes=64 * MiB).visit(bomb.root, bomb.blocks[bomb.root])
    walk = DagWalk(bomb.root, max_bytes=2 * GiB)
    assert _walk_all(walk, bomb.blocks) == [bomb.root, bomb.leaf]  # fetched once
    assert walk.dag_size == GiB + len(bomb.blocks[bomb.root])


def test_walk_stops_at_the_first_leaf_when_every_size_lies() -> None:
    bomb = file_bomb(blocksize=1)  # declares 4 KiB of content in a ~190 KiB root
    walk = DagWalk(bomb.root, max_bytes=MiB)
    assert walk.visit(bomb.root, bomb.blocks[bomb.root]) == [bomb.leaf]
    with pytest.raises(ContentTooLarge, match="declares 1"):
        walk.visit(bomb.leaf, bomb.blocks[bomb.leaf])


def test_walk_tells_smaller_than_declared_from_a_bomb() -> None:
    bomb = file_bomb(4, leaf_size=100, tsize=101, blocksize=101)
    walk = DagWalk(bomb.root)
    walk.visit(bomb.root, bomb.blocks[bomb.root])
    with pytest.raises(MalformedBlock) as info:
        walk.visit(bomb.leaf, bomb.blocks[bomb.leaf])
    assert not isinstance(info.value, ContentTooLarge)


def test_walk_refuses_two_links_that_disagree_about_one_block() -> None:
    leaf = b"z" * 50
    leaf_cid = cid_for_raw(leaf)
    data = encode_unixfs(UnixFSData(FT_FILE, filesize=100, blocksizes=(50, 50)))
    block = encode_pbnode([PBLink(leaf_cid, "", 50), PBLink(leaf_cid, "", 7)], data)
    with pytest.raises(MalformedBlock, match="linked as"):
        DagWalk(pb_cid(block)).visit(pb_cid(block), block)


def test_walk_checks_directory_entry_tsizes() -> None:
    blocks: dict[Cid, bytes] = {}
    bomb = file_bomb(tsize=None)
    blocks.update(bomb.blocks)
    real = len(bomb.blocks[bomb.root]) + GiB
    root = directory_of({"model.onnx": (bomb.root, 1000)}, blocks)  # claims 1000 bytes
    walk = DagWalk(root, max_bytes=MiB)
    assert walk.visit(root, blocks[root]) == [bomb.root]
    with pytest.raises(ContentTooLarge, match=f"{real} bytes"):
        walk.visit(bomb.root, blocks[bomb.root])


# --- the blockstore: local walks, streaming to disk, CAR imports -----------------


def test_check_dag_and_walk_local(tmp_path: Path) -> None:
    store = Blockstore(tmp_path)
    bomb = file_bomb()
    for cid, block in bomb.blocks.items():
        store.put(cid, block)
    with pytest.raises(ContentTooLarge):
        store.check_dag(bomb.root, max_bytes=2 * GiB)
    cid = store.add_bytes(os.urandom(3 * CHUNK_SIZE))
    assert store.check_dag(cid, max_bytes=4 * CHUNK_SIZE).content_size == 3 * CHUNK_SIZE


def test_walk_local_takes_a_torn_leaf_for_a_missing_one(tmp_path: Path) -> None:
    store = FileBlockstore(tmp_path)
    cid = store.add_bytes(os.urandom(3 * CHUNK_SIZE))
    leaf = next(c for c in store.iter_cids() if c.codec == 0x55)
    store.path_for(leaf).write_bytes(b"torn")
    walk = DagWalk(cid, max_bytes=4 * CHUNK_SIZE)
    assert store.walk_local(walk, [cid]) == [leaf]


def test_cat_to_streams_a_large_file_in_constant_memory(tmp_path: Path) -> None:
    bomb = file_bomb(128, tsize=None)  # 32 MiB of content from one 256 KiB leaf
    store = MemoryBlockstore()
    for cid, block in bomb.blocks.items():
        store.put(cid, block)
    out = tmp_path / "model.onnx"
    tracemalloc.start()
    try:
        written = store.cat_to(bomb.root, out, max_bytes=64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == out.stat().st_size == 32 * MiB
    assert peak < 4 * MiB  # a block or two, not the file


def test_cat_to_leaves_nothing_behind_when_refused(tmp_path: Path) -> None:
    store = MemoryBlockstore()
    for bomb in (file_bomb(), file_bomb(blocksize=1, seed=1)):
        for cid, block in bomb.blocks.items():
            store.put(cid, block)
        with pytest.raises(ContentTooLarge):
            store.cat_to(bomb.root, tmp_path / "model.onnx", max_bytes=64 * MiB)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ContentTooLarge):
        store.cat(file_bomb().root, max_bytes=64 * MiB)


def test_import_car_stops_at_its_byte_limit() -> None:
    source = MemoryBlockstore()
    cid = source.add_bytes(os.urandom(4 * CHUNK_SIZE))
    car = b"".join(iter_car(source.get, [cid]))
    with pytest.raises(ContentTooLarge):
        import_car(MemoryBlockstore(), io.BytesIO(car), max_bytes=2 * CHUNK_SIZE)
    assert import_car(MemoryBlockstore(), io.BytesIO(car), max_bytes=5 * CHUNK_SIZE).blocks == 5


def test_cumulative_size_is_what_a_walk_measures_for_a_dag_we_built() -> None:
    from storage.unixfs import cumulative_size

    store = MemoryBlockstore()
    for data in (b"x", bytes(3 * CHUNK_SIZE + 5)):
        root = store.add_bytes(data)
        assert cumulative_size(root, store.get(root)) == store.check_dag(root).dag_size
    tree = store.add_tree({"a.txt": b"a", "d/b.bin": bytes(CHUNK_SIZE + 1)})
    assert cumulative_size(tree, store.get(tree)) == store.check_dag(tree).dag_size

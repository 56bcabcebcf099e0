from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.blockstore import BaseBlockstore, Blockstore, FileBlockstore, MemoryBlockstore
from storage.cid import DAG_PB, Cid, cid_for_raw, sha256_multihash
from storage.errors import BlockNotFound, CorruptBlock, UnsupportedDag
from storage.unixfs import CHUNK_SIZE, decode_pbnode, import_bytes

BIG = random.Random(7).randbytes(3 * CHUNK_SIZE + 123)


@pytest.fixture(params=["packs", "files", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BaseBlockstore]:
    """Every test here runs against each implementation (packs: the node's default)."""
    made: BaseBlockstore
    if request.param == "packs":
        made = Blockstore(tmp_path / "store")
        assert isinstance(made, Blockstore) and made.layout == "packs"
    elif request.param == "files":
        made = FileBlockstore(tmp_path / "store")
    else:
        made = MemoryBlockstore()
    yield made
    made.close()


def test_put_get_has_delete(store: BaseBlockstore) -> None:
    cid = cid_for_raw(b"hello")
    assert not store.has(cid) and cid not in store
    store.put(cid, b"hello")
    store.put(cid, b"hello")  # idempotent
    assert store.has(cid) and cid in store
    assert store.get(cid) == b"hello"
    assert list(store.iter_cids()) == [cid]
    assert store.size_bytes() == 5
    assert store.delete(cid)
    assert not store.delete(cid)
    with pytest.raises(BlockNotFound, match=str(cid)):
        store.get(cid)
    with pytest.raises(KeyError):
        store.get(cid)


def test_put_refuses_wrong_hash(store: BaseBlockstore) -> None:
    with pytest.raises(CorruptBlock):
        store.put(cid_for_raw(b"hello"), b"jello")
    assert list(store.iter_cids()) == []


def test_v0_and_v1_share_a_block(store: BaseBlockstore) -> None:
    block = b"\x0a\x02\x08\x01"
    v0 = Cid(0, DAG_PB, sha256_multihash(block))
    store.put(v0, block)
    assert store.get(v0.to_v1()) == block
    assert list(store.iter_cids()) == [v0.to_v1()]


def test_add_cat_and_tree(store: BaseBlockstore, tmp_path: Path) -> None:
    cid = store.add_bytes(BIG)
    assert cid == import_bytes(BIG, lambda c, b: None).cid
    assert store.cat(cid) == BIG
    assert b"".join(store.iter_file(cid)) == BIG
    assert len(list(store.iter_cids())) == 5  # 4 leaves + root
    assert store.size_bytes() == len(BIG) + len(store.get(cid))

    src = tmp_path / "big.bin"
    src.write_bytes(BIG)
    assert store.add_file(src) == cid
    assert store.add_stream([BIG[:5], BIG[5:]]).cid == cid

    files = {"output.json": b"{}", "outputs/y.npy": BIG, "logs/stdout.log": b""}
    root = store.add_tree(files)
    assert store.read_tree(root) == files
    assert store.resolve_path(root, "outputs/y.npy") == cid
    assert [e.name for e in store.list_directory(root)] == ["logs", "output.json", "outputs"]
    assert store.missing_blocks(root) == []


def test_add_directory_matches_add_tree(store: BaseBlockstore, tmp_path: Path) -> None:
    src = tmp_path / "result"
    (src / "outputs").mkdir(parents=True)
    (src / "outputs" / "y.npy").write_bytes(BIG)
    (src / "output.json").write_bytes(b"{}")
    (src / ".hidden").write_bytes(b"h")
    files = {"outputs/y.npy": BIG, "output.json": b"{}", ".hidden": b"h"}
    assert store.add_directory(src) == store.add_tree(files)
    (src / "empty").mkdir()
    with_empty = store.add_directory(src)
    assert [e.name for e in store.list_directory(with_empty)] == [
        ".hidden",
        "empty",
        "output.json",
        "outputs",
    ]
    os.symlink(src / "output.json", src / "link")
    with pytest.raises(ValueError, match="regular file"):
        store.add_directory(src)


def test_missing_blocks(store: BaseBlockstore) -> None:
    full = MemoryBlockstore()
    root = full.add_tree({"a": BIG, "b/c": b"small"})
    assert full.missing_blocks(root) == []
    assert store.missing_blocks(root) == [root]

    store.put(root, full.get(root))
    children = [link.cid for link in decode_pbnode(full.get(root)).links]
    assert store.missing_blocks(root) == children

    for cid in full.iter_cids():
        store.put(cid, full.get(cid))
    file_root = store.resolve_path(root, "a")
    leaves = [link.cid for link in decode_pbnode(store.get(file_root)).links]
    store.delete(leaves[1])
    store.delete(leaves[3])
    assert store.missing_blocks(root) == [leaves[1], leaves[3]]
    assert store.missing_blocks(file_root) == [leaves[1], leaves[3]]


def test_missing_blocks_refuses_unknown_codecs(store: BaseBlockstore) -> None:
    cbor = Cid(1, 0x71, sha256_multihash(b"\xa0"))
    store.put(cbor, b"\xa0")
    with pytest.raises(UnsupportedDag):
        store.missing_blocks(cbor)


def test_disk_layout_and_corruption(tmp_path: Path) -> None:
    store = FileBlockstore(tmp_path)
    cid = store.add_bytes(BIG)
    name = str(cid)
    path = tmp_path / "blocks" / name[-3:-1] / name
    assert path.is_file() and store.path_for(cid) == path
    assert not list(tmp_path.rglob(".tmp-*"))

    # Bit rot in a dag-pb node: get() refuses, missing_blocks() asks for it again.
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptBlock):
        store.get(cid)
    with pytest.raises(CorruptBlock):
        store.cat(cid)
    assert store.missing_blocks(cid) == [cid]
    store.put(cid, good)  # a re-fetch repairs it in place
    assert store.cat(cid) == BIG

    # A corrupt leaf surfaces when the file is read.
    leaf = decode_pbnode(good).links[0].cid
    store.path_for(leaf).write_bytes(b"rotten")
    with pytest.raises(CorruptBlock):
        store.cat(cid)


def test_disk_store_reopens_and_ignores_junk(tmp_path: Path) -> None:
    store = FileBlockstore(tmp_path, fsync=True)
    cid = store.add_bytes(b"persist me")
    shard = store.path_for(cid).parent
    (shard / ".tmp-abandoned").write_bytes(b"partial")
    (shard / "not-a-cid").write_bytes(b"junk")
    (tmp_path / "blocks" / "stray-file").write_bytes(b"junk")
    reopened = Blockstore(tmp_path)  # an old data directory keeps its layout
    assert reopened.layout == "files"
    assert list(reopened.iter_cids()) == [cid]
    assert reopened.size_bytes() == len(b"persist me")
    assert reopened.cat(cid) == b"persist me"

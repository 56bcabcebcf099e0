"""The packed blockstore (storage.packstore): crashes, torn writes, deletion and compaction.

The behaviour every blockstore shares is tested against it in test_blockstore.py.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import packstore
from storage.blockstore import Blockstore, FileBlockstore
from storage.cid import cid_for_raw
from storage.errors import CorruptBlock
from storage.packstore import MAGIC, PackBlockstore
from storage.pins import collect_garbage

ROOT = Path(__file__).resolve().parents[2]


def _blocks(n: int, size: int = 1000, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def _packs(root: Path) -> list[Path]:
    return sorted((root / "packs").glob("*.pack"))


def test_blocks_survive_a_reopen(tmp_path: Path) -> None:
    blocks = _blocks(20)
    with PackBlockstore(tmp_path) as store:
        cids = [cid_for_raw(b) for b in blocks]
        for cid, block in zip(cids, blocks, strict=True):
            store.put(cid, block)
        big = store.add_bytes(os.urandom(600_000))
    with PackBlockstore(tmp_path) as again:
        assert [again.get(c) for c in cids] == blocks
        assert len(again.cat(big)) == 600_000
        assert again.size_bytes() == 20 * 1000 + sum(
            again.size_of(c) or 0 for c in again.iter_cids() if c not in cids
        )
        assert sorted(again.iter_cids(), key=lambda c: c.to_bytes()) == list(again.iter_cids())
    assert Blockstore(tmp_path).layout == "packs"


def test_a_killed_writer_loses_nothing_it_wrote(tmp_path: Path) -> None:
    """Rows batched but never committed: the next open finds the blocks in the pack."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from storage.packstore import PackBlockstore
        store = PackBlockstore({str(tmp_path)!r})
        with store.batch():
            print(store.add_bytes(bytes(range(256)) * 4000), flush=True)
            os._exit(0)  # no commit, no close: as if killed
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    with PackBlockstore(tmp_path) as store:
        root = next(c for c in store.iter_cids() if str(c) == out.stdout.strip())
        assert store.cat(root) == bytes(range(256)) * 4000


@pytest.mark.parametrize(
    "tail",
    [
        b"\x07",  # a torn header
        struct.pack("<IH", 1000, 36) + b"\x01" * 50,  # a record cut short
        b"\x00" * 4096,  # zeros: a reservation the data never reached
    ],
)
def test_a_torn_tail_is_ignored_and_cut_off(tmp_path: Path, tail: bytes) -> None:
    with PackBlockstore(tmp_path) as store:
        cid = store.add_bytes(b"kept")
    [pack] = _packs(tmp_path)
    end = pack.stat().st_size
    with pack.open("ab") as fh:
        fh.write(tail)
    with PackBlockstore(tmp_path) as store:
        assert store.cat(cid) == b"kept"
        more = store.add_bytes(b"written after the repair")
    assert pack.stat().st_size > end  # appended after the cut, not after the junk
    with PackBlockstore(tmp_path) as store:
        assert store.cat(more) == b"written after the repair"
        assert list(store.iter_cids()) == sorted([cid, more], key=lambda c: c.to_bytes())


def test_a_whole_record_that_does_not_hash_to_its_cid_is_cut_off(tmp_path: Path) -> None:
    with PackBlockstore(tmp_path) as store:
        store.add_bytes(b"kept")
    [pack] = _packs(tmp_path)
    liar = cid_for_raw(b"the real bytes").to_bytes()
    with pack.open("ab") as fh:
        fh.write(struct.pack("<IH", 5, len(liar)) + liar + b"other")
    with PackBlockstore(tmp_path) as store:
        assert not store.has(cid_for_raw(b"the real bytes"))
        assert len(list(store.iter_cids())) == 1


def test_rows_past_a_shortened_pack_are_dropped(tmp_path: Path) -> None:
    """A power loss without fsync can persist the index but not the pack's tail."""
    blocks = _blocks(3)
    cids = [cid_for_raw(b) for b in blocks]
    with PackBlockstore(tmp_path) as store:
        for cid, block in zip(cids, blocks, strict=True):
            store.put(cid, block)
    [pack] = _packs(tmp_path)
    os.truncate(pack, pack.stat().st_size - 10)
    with PackBlockstore(tmp_path) as store:
        assert [store.has(c) for c in cids] == [True, True, False]
        store.put(cids[2], blocks[2])  # a re-fetch puts it back
        assert store.get(cids[2]) == blocks[2]


def test_a_lost_pack_file_takes_only_its_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packstore, "PACK_BYTES", 4000)
    blocks = _blocks(8)
    cids = [cid_for_raw(b) for b in blocks]
    with PackBlockstore(tmp_path) as store:
        for cid, block in zip(cids, blocks, strict=True):
            store.put(cid, block)
    packs = _packs(tmp_path)
    assert len(packs) >= 2
    packs[0].unlink()
    with PackBlockstore(tmp_path) as store:
        present = [store.has(c) for c in cids]
        assert not all(present) and any(present)
        assert all(store.get(c) == b for c, b, p in zip(cids, blocks, present, strict=True) if p)


def test_bit_rot_is_refused_and_a_put_repairs_it(tmp_path: Path) -> None:
    block = b"precious" * 100
    cid = cid_for_raw(block)
    with PackBlockstore(tmp_path) as store:
        store.put(cid, block)
    [pack] = _packs(tmp_path)
    raw = bytearray(pack.read_bytes())
    raw[-1] ^= 1
    pack.write_bytes(bytes(raw))
    with PackBlockstore(tmp_path) as store:
        # The record was committed, so it is not rescanned: get() is what catches it.
        with pytest.raises(CorruptBlock):
            store.get(cid)
        store.put(cid, block)
        assert store.get(cid) == block
        assert store.size_bytes() == len(block)


def test_delete_then_compaction_reclaims_mostly_garbage_packs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packstore, "PACK_BYTES", 20_000)
    blocks = _blocks(60)
    cids = [cid_for_raw(b) for b in blocks]
    with PackBlockstore(tmp_path) as store:
        for cid, block in zip(cids, blocks, strict=True):
            store.put(cid, block)
        first = _packs(tmp_path)[0]
        before = len(_packs(tmp_path))
        keep = set(cids[::5])
        for cid in cids:
            if cid not in keep:
                assert store.delete(cid)
        assert not store.delete(cids[1])
        assert store.size_bytes() == 1000 * len(keep)
        assert store.compact() > 0
        assert not first.exists()
        assert len(_packs(tmp_path)) < before
        for _pack_id, end, live in store.pack_stats():
            assert live <= end
        assert {c for c in store.iter_cids()} == keep
        assert all(store.get(c) == b for c, b in zip(cids, blocks, strict=True) if c in keep)
        assert store.compact() == 0  # nothing left worth rewriting
    with PackBlockstore(tmp_path) as again:
        assert {c for c in again.iter_cids()} == keep
        assert all(again.get(c) == b for c, b in zip(cids, blocks, strict=True) if c in keep)


def test_garbage_collection_compacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packstore, "PACK_BYTES", 100_000)
    with PackBlockstore(tmp_path) as store:
        kept = store.add_bytes(b"pinned")
        store.add_bytes(os.urandom(1_000_000))  # unpinned: several packs of garbage
        packs_before = len(_packs(tmp_path))
        stats = collect_garbage(store, [kept])
        assert stats.removed > 1
        assert len(_packs(tmp_path)) < packs_before
        assert list(store.iter_cids()) == [kept]
        assert store.cat(kept) == b"pinned"


def test_two_instances_share_a_store(tmp_path: Path) -> None:
    a = PackBlockstore(tmp_path)
    one = a.add_bytes(b"from a")
    b = PackBlockstore(tmp_path)  # a holds its pack: b appends to another
    two = b.add_bytes(b"from b")
    assert b.cat(one) == b"from a" and a.cat(two) == b"from b"
    assert len(_packs(tmp_path)) == 2
    a.close()
    b.close()
    with PackBlockstore(tmp_path) as again:
        assert {again.cat(one), again.cat(two)} == {b"from a", b"from b"}


def test_fsync_mode_and_a_pack_with_no_header(tmp_path: Path) -> None:
    with PackBlockstore(tmp_path, fsync=True) as store:
        cid = store.add_bytes(b"durable")
    (tmp_path / "packs" / "00000099.pack").write_bytes(MAGIC[:3])  # created, then a crash
    with PackBlockstore(tmp_path) as store:
        assert store.cat(cid) == b"durable"
        assert (tmp_path / "packs" / "00000099.pack").read_bytes().startswith(MAGIC)
        later = store.add_bytes(b"appended to the repaired pack")
    with PackBlockstore(tmp_path) as store:
        assert store.cat(later) == b"appended to the repaired pack"


def test_an_old_data_dir_keeps_one_file_per_block(tmp_path: Path) -> None:
    old = FileBlockstore(tmp_path).add_bytes(b"from before packs")
    store = Blockstore(tmp_path)
    assert store.layout == "files" and isinstance(store.backend, FileBlockstore)
    assert store.cat(old) == b"from before packs"
    assert not (tmp_path / "packs").exists()
    assert Blockstore(tmp_path / "new").layout == "packs"


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "delete", "reopen", "compact"]), st.integers(0, 9)),
        max_size=40,
    )
)
def test_a_random_history_matches_a_dict(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    root = tmp_path_factory.mktemp("pack")
    blocks = _blocks(10, size=700, seed=3)
    cids = [cid_for_raw(b) for b in blocks]
    model: set[int] = set()
    saved = packstore.PACK_BYTES
    packstore.PACK_BYTES = 3000
    store = PackBlockstore(root)
    try:
        for op, i in ops:
            if op == "put":
                store.put(cids[i], blocks[i])
                model.add(i)
            elif op == "delete":
                assert store.delete(cids[i]) == (i in model)
                model.discard(i)
            elif op == "compact":
                store.compact()
            else:
                store.close()
                store = PackBlockstore(root)
            assert store.has(cids[i]) == (i in model)
        assert set(store.iter_cids()) == {cids[i] for i in model}
        assert all(store.get(cids[i]) == blocks[i] for i in model)
        assert store.size_bytes() == 700 * len(model)
    finally:
        store.close()
        packstore.PACK_BYTES = saved

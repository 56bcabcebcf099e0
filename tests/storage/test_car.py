"""CARv1 writer and reader (storage.car); the daemon round trip is in test_kubo_daemon.py."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.blockstore import Blockstore, MemoryBlockstore
from storage.car import CarReader, encode_header, import_car, iter_car, walk_dag
from storage.cid import Cid, encode_uvarint
from storage.errors import CorruptBlock, MalformedBlock
from storage.unixfs import build_tree, import_bytes


def _car(store: MemoryBlockstore, roots: list[Cid]) -> bytes:
    return b"".join(iter_car(store.get, roots))


def test_header_is_the_canonical_dag_cbor_go_car_writes() -> None:
    root = Cid.decode("bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e")
    # `ipfs dag export` of "hello world" (raw leaf), captured from the daemon.
    expected = b":\xa2eroots\x81\xd8*X%\x00" + root.to_bytes() + b"gversion\x01"
    assert encode_header([root]) == expected


def test_round_trip_of_a_deep_tree_in_depth_first_order() -> None:
    store = MemoryBlockstore()
    files = {
        "big.bin": random.Random(1).randbytes(40_000),
        "d/e/f.txt": b"deep",
        "d/g.txt": b"",
        "dup.txt": b"deep",  # same leaf twice: exported once
    }
    root = build_tree(files, store.put, chunk_size=1000, max_links=4)
    car = _car(store, [root])
    order = [cid for cid, _ in walk_dag(store.get, [root])]
    assert order[0] == root
    assert len(order) == len(set(order)) == len(list(store.iter_cids()))
    reader = CarReader(io.BytesIO(car))
    assert reader.roots == [root]
    assert [cid for cid, _ in reader] == order
    fresh = MemoryBlockstore()
    result = import_car(fresh, io.BytesIO(car))
    assert (result.roots, result.blocks) == ([root], len(order))
    assert fresh.read_tree(root) == files


def test_several_roots_and_a_v0_root(tmp_path: object) -> None:
    store = MemoryBlockstore()
    a = store.add_bytes(b"a" * 300_000)
    b = store.add_bytes(b"b")
    v0 = Cid(0, a.codec, a.multihash)
    car = _car(store, [v0, b])
    reader = CarReader(io.BytesIO(car))
    assert reader.roots == [v0, b]
    pairs = list(reader)
    assert pairs[0][0] == v0  # sections keep the CID as given (a bare multihash for v0)
    disk = Blockstore(tmp_path)  # type: ignore[arg-type]
    import_car(disk, io.BytesIO(car))
    assert disk.cat(a) == b"a" * 300_000


def test_a_block_that_does_not_match_its_cid_is_refused() -> None:
    store = MemoryBlockstore()
    root = import_bytes(b"x" * 5000, store.put, chunk_size=1000).cid
    car = bytearray(_car(store, [root]))
    car[-1] ^= 1  # flip a bit in the last leaf
    fresh = MemoryBlockstore()
    with pytest.raises(CorruptBlock):
        import_car(fresh, io.BytesIO(bytes(car)))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05abc",  # header shorter than declared
        encode_uvarint(3) + b"\xa0\xa0\xa0",  # not the header shape
        encode_uvarint(1) + b"\xa0",  # no version
        encode_uvarint(2**20) + b"x",  # absurd header length
        b"\xff" * 12,  # overlong varint
    ],
)
def test_malformed_headers(data: bytes) -> None:
    with pytest.raises(MalformedBlock):
        CarReader(io.BytesIO(data))


def test_truncated_and_oversized_sections() -> None:
    store = MemoryBlockstore()
    root = store.add_bytes(b"payload" * 100)
    car = _car(store, [root])
    with pytest.raises(MalformedBlock, match="truncated"):
        list(CarReader(io.BytesIO(car[:-10])))
    huge = encode_header([root]) + encode_uvarint(64 * 1024 * 1024)
    with pytest.raises(MalformedBlock, match="out of bounds"):
        list(CarReader(io.BytesIO(huge)))


def test_car_v2_is_refused_clearly() -> None:
    body = b"\xa1gversion\x02"
    with pytest.raises(MalformedBlock, match="CARv1"):
        CarReader(io.BytesIO(encode_uvarint(len(body)) + body))


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    try:
        reader = CarReader(io.BytesIO(data))
        for _ in reader:
            pass
    except (MalformedBlock, CorruptBlock):
        pass

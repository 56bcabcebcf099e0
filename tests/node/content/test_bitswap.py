"""node.content.bitswap between two meshrun hosts in one process, and its wire format.

The messages are checked against py-libp2p's own generated code for the spec's
message.proto (an independent build of the same schema). The interop with a
real IPFS peer is in test_ipfs_interop.py.
"""

from __future__ import annotations

import random

import pytest
from libp2p.bitswap.pb import bitswap_pb2

from node.content import bitswap as bs
from node.content.bitswap import (
    Bitswap,
    BitswapError,
    Entry,
    Message,
    cid_prefix,
    decode_message,
    encode_message,
)
from node.content.blocks import fetch_dag
from node.transport.mesh import Mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.cid import Cid, cid_for_raw
from storage.unixfs import CHUNK_SIZE
from tests.node.mesh_helpers import eventually, mesh_pair


def _bitswap(mesh: Mesh) -> Bitswap:
    assert isinstance(mesh.bitswap, Bitswap)
    return mesh.bitswap


def test_messages_read_and_written_as_the_spec_schema() -> None:
    block = b"a raw block"
    cid = cid_for_raw(block)
    ours = Message(
        entries=[
            Entry(cid, priority=5, send_dont_have=True),
            Entry(cid.to_v1(), want_have=True),
            Entry(cid, cancel=True),
        ],
        full=True,
        blocks=[(cid, block)],
        haves=[cid],
        dont_haves=[cid],
        pending_bytes=7,
    )
    theirs = bitswap_pb2.Message()
    theirs.ParseFromString(encode_message(ours))
    assert theirs.wantlist.full
    assert [
        (e.block, e.priority, e.cancel, e.wantType, e.sendDontHave) for e in theirs.wantlist.entries
    ] == [
        (cid.to_bytes(), 5, False, 0, True),
        (cid.to_bytes(), 1, False, 1, False),
        (cid.to_bytes(), 1, True, 0, False),
    ]
    assert [(p.prefix, p.data) for p in theirs.payload] == [(cid_prefix(cid), block)]
    assert [(p.cid, p.type) for p in theirs.blockPresences] == [
        (cid.to_bytes(), 0),
        (cid.to_bytes(), 1),
    ]
    assert theirs.pendingBytes == 7
    assert decode_message(theirs.SerializeToString()) == ours

    # 1.1.0 has no presences and no want-have; a want-have is left out, not turned into a want.
    old = bitswap_pb2.Message()
    old.ParseFromString(encode_message(ours, bs.PROTOCOL_V110))
    assert [(e.wantType, e.sendDontHave, e.cancel) for e in old.wantlist.entries] == [
        (0, False, False),
        (0, False, True),
    ]
    assert not old.blockPresences


def test_blocks_are_named_by_their_own_hash_and_junk_is_refused() -> None:
    v0_block = b"\x0a\x02\x08\x01"  # a dag-pb node
    legacy = bitswap_pb2.Message()
    legacy.blocks.append(v0_block)  # bitswap 1.0.0: a CIDv0 block with no prefix
    lying = legacy.payload.add()
    lying.prefix = b"\x01\x55\x11\x14"  # sha1: not accepted
    lying.data = b"x"
    entry = legacy.wantlist.entries.add()
    entry.block = b"\x01\x02not a cid"
    decoded = decode_message(legacy.SerializeToString())
    ((cid, data),) = decoded.blocks
    assert cid.version == 0 and cid.verify(data) and data == v0_block
    assert decoded.skipped == 2 and not decoded.entries
    with pytest.raises(BitswapError):
        decode_message(b"\x0a\xff\xff\xff")


async def test_a_dag_is_fetched_over_bitswap_from_a_named_peer_and_from_everyone() -> None:
    async with mesh_pair() as (a, b):
        data = random.Random(1).randbytes(5 * CHUNK_SIZE + 3)
        tree = {"x.bin": random.Random(2).randbytes(CHUNK_SIZE + 9), "d/e.txt": b"e", "empty": b""}
        file_cid = _bitswap(a).store.add_bytes(data)
        dir_cid = _bitswap(a).store.add_tree(tree)
        store = _bitswap(b).store

        stats = await fetch_dag(_bitswap(b), store, file_cid, a.peer_id, 30)
        assert stats["via"] == "bitswap" and stats["blocks"] == 7
        assert store.cat(file_cid) == data
        stats = await fetch_dag(_bitswap(b), store, dir_cid, None, 30)
        assert store.read_tree(dir_cid) == tree
        # The server counts a reply after its write returns, which can be after the
        # fetcher has already read it.
        sent = 7 + stats["blocks"]
        await eventually(lambda: _bitswap(a).stats["blocks_sent"] == sent)
        assert not _bitswap(b).stats["unwanted_blocks"]


async def test_a_block_no_peer_has_fails_at_once_with_the_reason() -> None:
    async with mesh_pair() as (a, b):
        absent = cid_for_raw(b"nobody has this")
        with pytest.raises(MeshrunError) as failed:
            await fetch_dag(_bitswap(b), _bitswap(b).store, absent, a.peer_id, 60)
        assert failed.value.code == ErrorCode.FETCH_FAILED
        assert "do not have" in failed.value.message
        await eventually(lambda: _bitswap(a).stats["presences_sent"] == 1)
        assert not _bitswap(b)._wanted  # nothing left wanted


async def test_a_peers_wantlist_is_bounded_and_follows_full_and_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bs, "MAX_PEER_WANTS", 50)
    async with mesh_pair() as (a, b):
        cids = [cid_for_raw(str(i).encode()) for i in range(80)]
        assert await _bitswap(b).send(a.peer_id, Message(entries=[Entry(c) for c in cids]))

        def wants() -> int:
            ledger = _bitswap(a)._ledgers.get(b.peer_id)
            return -1 if ledger is None else len(ledger.wants)

        await eventually(lambda: wants() == 50)
        assert await _bitswap(b).send(a.peer_id, Message(entries=[Entry(cids[70])], full=True))
        await eventually(lambda: wants() == 1)
        assert await _bitswap(b).send(a.peer_id, Message(entries=[Entry(cids[70], cancel=True)]))
        await eventually(lambda: wants() == 0)


async def test_a_want_is_answered_when_the_block_arrives_and_unasked_blocks_are_dropped() -> None:
    async with mesh_pair() as (a, b):
        block = b"stored later"
        cid = cid_for_raw(block)
        # b wants it without asking for DONT_HAVE: a keeps the want ...
        assert await _bitswap(b).send(a.peer_id, Message(entries=[Entry(cid)]))
        await eventually(lambda: cid in getattr(_bitswap(a)._ledgers.get(b.peer_id), "wants", {}))
        # ... and sends the block once it has it. b has no session wanting it now,
        # so b drops it unread: nothing reaches a store unasked.
        _bitswap(a).store.put(cid, block)
        _bitswap(a).blocks_added([cid])
        await eventually(lambda: _bitswap(b).stats["unwanted_blocks"] == 1)
        await eventually(lambda: _bitswap(a).stats["blocks_sent"] == 1)
        assert not _bitswap(b).store.has(cid)
        assert not _bitswap(a)._ledgers[b.peer_id].wants


def test_the_block_prefix_round_trips() -> None:
    for cid in (
        cid_for_raw(b"x"),
        Cid.decode("QmRaaUwTNfwgFZpeUy8qrZwrp2dY4kCKmmB5xEqvH3vtD1"),
    ):
        assert bs.cid_from_prefix(cid_prefix(cid), b"x").version == cid.version

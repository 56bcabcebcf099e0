"""Hostile holders of the block exchange's DAG want (/meshrun/blocks/1.1.0).

A fetcher that asks for "this root and its descendants, up to N bytes" takes
blocks it did not name one by one, so each must be the block its own walk
expects next: hash-checked, size-checked against the link that led to it,
and within the bytes asked for. Each way of breaking that is tried here over
real libp2p streams, and each must end the fetch with nothing unverified kept.
An older peer (1.0.0 only) and an honest holder that stops at the budget are
the two ways a fetch must still succeed.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from libp2p.exceptions import BaseLibp2pError

from crypto.keys import Identity
from node.content import blocks
from node.content.blocks import (
    _DAG_END,
    BLOCKS_PROTOCOL,
    BLOCKS_PROTOCOL_DAG,
    BitswapStore,
    DagWant,
    decode_request,
    encode_reply,
    fetch_dag,
    serve_block_exchange,
    serve_blocks,
)
from node.transport.frames import Frames
from node.transport.mesh import Mesh, start_mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import Blockstore
from storage.cid import Cid, cid_for_raw
from storage.unixfs import DagWalk
from tests.node.mesh_helpers import eventually

KiB = 1024


@dataclass
class Node:
    mesh: Mesh
    store: Blockstore


@asynccontextmanager
async def _node(data_dir: Path) -> AsyncIterator[Node]:
    store = Blockstore(data_dir / "blocks")
    identity = Identity.load_or_create(data_dir)
    async with start_mesh(identity, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh:
        yield Node(mesh, store)


@asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    async with _node(tmp_path / "holder") as holder, _node(tmp_path / "fetcher") as fetcher:
        await fetcher.mesh.connect(f"{holder.mesh.listen_addrs()[0]}/p2p/{holder.mesh.peer_id}")
        yield holder, fetcher


def _tree(store: Blockstore) -> Cid:
    """A result-like directory: a two-leaf file, small files, an empty one, a subdirectory."""
    return store.add_tree(
        {
            "outputs/y.bin": os.urandom(300 * KiB),
            "meta.json": b'{"ok": true}',
            "logs/stderr.txt": b"",
            "logs/stdout.txt": b"ran\n",
        }
    )


def _order(store: Blockstore, root: Cid) -> list[tuple[Cid, bytes]]:
    """The DAG's blocks in the order an honest 1.1.0 holder streams them."""
    walk = DagWalk(root)
    queue, out = deque([root]), []
    while queue:
        cid = queue.popleft()
        block = b"" if cid == blocks.EMPTY_BLOCK else store.get(cid)
        out.append((cid, block))
        queue.extend(walk.visit(cid, block))
    return out


Script = Callable[[list[tuple[Cid, bytes]]], list[list[bytes]]]


def _hostile(node: Node, root: Cid, script: Script) -> None:
    """Answer any DAG want with what `script` makes of the honest order, and no end frame
    unless the script sends one."""
    honest = _order(node.store, root)

    async def handler(frames: Frames) -> None:
        frames.max_bytes = blocks.MAX_EXCHANGE_FRAME
        want = decode_request(await frames.read())
        assert isinstance(want, DagWant)
        for reply in script(honest):
            await frames.write_parts(reply)
        await trio.sleep(5)  # keep the stream open: the fetcher must not wait for more

    node.mesh.handle(BLOCKS_PROTOCOL_DAG, handler)


async def _refused(fetcher: Node, holder: Node, root: Cid, **kw: int) -> MeshrunError:
    with pytest.raises(MeshrunError) as info:
        await fetch_dag(fetcher.mesh, fetcher.store, root, holder.mesh.peer_id, 10, **kw)
    return info.value


def _held(node: Node) -> set[Cid]:
    return {c.to_v1() for c in node.store.iter_cids()}


def _of(order: list[tuple[Cid, bytes]]) -> set[Cid]:
    return {c.to_v1() for c, _ in order}


@pytest.mark.timeout(60)
async def test_an_honest_holder_streams_the_whole_dag_for_one_want(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (holder, fetcher):
        stats = serve_block_exchange(holder.mesh, holder.store)
        root = _tree(holder.store)
        got = await fetch_dag(fetcher.mesh, fetcher.store, root, holder.mesh.peer_id, 10)
        assert got["via"] == "exchange"
        assert fetcher.store.missing_blocks(root) == []
        assert fetcher.store.read_tree(root) == holder.store.read_tree(root)
        # Every block but the empty leaf crossed the wire once, for one DAG want.
        assert stats["blocks_sent"] == len(_order(holder.store, root))
        assert not fetcher.mesh.unspoken(holder.mesh.peer_id, BLOCKS_PROTOCOL_DAG)


@pytest.mark.timeout(60)
async def test_a_dag_already_here_is_fetched_from_nobody(tmp_path: Path) -> None:
    """An executor's model and inputs, job after job: no stream, and the limit still holds."""
    async with _pair(tmp_path) as (holder, fetcher):
        stats = serve_block_exchange(holder.mesh, holder.store)
        root = _tree(holder.store)
        await fetch_dag(fetcher.mesh, fetcher.store, root, holder.mesh.peer_id, 10)
        sent = stats["blocks_sent"]
        again = await fetch_dag(fetcher.mesh, fetcher.store, root, holder.mesh.peer_id, 10)
        assert again["via"] == "local" and again["blocks"] == 0
        assert stats["blocks_sent"] == sent
        small = fetcher.store.add_bytes(b"tiny inputs")
        got = await fetch_dag(fetcher.mesh, fetcher.store, small, "nobody", 10, max_bytes=64)
        assert got["via"] == "local"
        # Held, but bigger than the caller allows: refused as if it had come from afar.
        with pytest.raises(MeshrunError) as err:
            await fetch_dag(fetcher.mesh, fetcher.store, root, "nobody", 10, max_bytes=10 * KiB)
        assert err.value.code is ErrorCode.CONTENT_TOO_LARGE


@pytest.mark.timeout(60)
async def test_past_the_budget_the_rest_is_wanted_block_by_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "DAG_STREAM_BYTES", 4 * KiB)
    async with _pair(tmp_path) as (holder, fetcher):
        stats = serve_block_exchange(holder.mesh, holder.store)
        root = _tree(holder.store)
        await fetch_dag(fetcher.mesh, fetcher.store, root, holder.mesh.peer_id, 10)
        assert fetcher.store.read_tree(root) == holder.store.read_tree(root)
        sent = len(_order(holder.store, root))
        await eventually(lambda: stats["blocks_sent"] == sent)


@pytest.mark.timeout(60)
async def test_a_peer_that_speaks_only_1_0_0_is_fetched_from_and_remembered(
    tmp_path: Path,
) -> None:
    async with _pair(tmp_path) as (holder, fetcher):
        holder.mesh.handle(BLOCKS_PROTOCOL, partial(serve_blocks, holder.store))
        peer = holder.mesh.peer_id
        first, second = _tree(holder.store), holder.store.add_bytes(b"second")
        got = await fetch_dag(fetcher.mesh, fetcher.store, first, peer, 10)
        assert got["via"] == "exchange"
        assert fetcher.store.read_tree(first) == holder.store.read_tree(first)
        assert fetcher.mesh.unspoken(peer, BLOCKS_PROTOCOL_DAG)
        await fetch_dag(fetcher.mesh, fetcher.store, second, peer, 10)
        assert fetcher.store.cat(second) == b"second"


@pytest.mark.timeout(60)
async def test_a_1_0_0_stream_refuses_a_dag_want(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (holder, fetcher):
        holder.mesh.handle(BLOCKS_PROTOCOL, partial(serve_blocks, holder.store))
        root = holder.store.add_bytes(b"x")
        frames = await fetcher.mesh.open(holder.mesh.peer_id, BLOCKS_PROTOCOL)
        await frames.write(blocks.encode_dag_want(root, 1024))
        with pytest.raises((BaseLibp2pError, EOFError)):  # reset: 1.0.0 does not parse it
            await frames.read()


@pytest.mark.parametrize(
    ("name", "script", "expect"),
    [
        (
            "out of order",
            lambda order: (
                [encode_reply(order[0][0], order[0][1])]
                + [encode_reply(c, b) for c, b in reversed(order[1:])]
            ),
            "was next",
        ),
        (
            "a block not in the DAG",
            lambda order: [
                encode_reply(order[0][0], order[0][1]),
                encode_reply(cid_for_raw(b"planted"), b"planted"),
            ],
            "was next",
        ),
        (
            "a block after the last",
            lambda order: (
                [encode_reply(c, b) for c, b in order]
                + [encode_reply(cid_for_raw(b"extra"), b"extra")]
            ),
            "after the last block",
        ),
        (
            "bytes that do not hash to the CID",
            lambda order: [
                encode_reply(order[0][0], order[0][1]),
                encode_reply(order[1][0], b"\x00" * len(order[1][1])),
            ],
            "does not hash",
        ),
        (
            "a root it says it lacks",
            lambda order: [encode_reply(order[0][0], None), [_DAG_END]],
            "does not have",
        ),
    ],
)
@pytest.mark.timeout(60)
async def test_a_holder_that_breaks_the_order_is_refused(
    tmp_path: Path, name: str, script: Script, expect: str
) -> None:
    async with _pair(tmp_path) as (holder, fetcher):
        root = _tree(holder.store)
        order = _order(holder.store, root)
        _hostile(holder, root, script)
        error = await _refused(fetcher, holder, root)
        assert error.code == ErrorCode.FETCH_FAILED, name
        assert expect in error.message, error.message
        # Nothing but blocks of the DAG, each verified, was kept.
        assert _held(fetcher) <= _of(order)
        for cid in fetcher.store.iter_cids():
            fetcher.store.get(cid)  # hash-checked on read
        assert cid_for_raw(b"planted").to_v1() not in _held(fetcher)


@pytest.mark.timeout(60)
async def test_a_holder_that_sends_more_than_asked_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "DAG_STREAM_BYTES", 4 * KiB)
    async with _pair(tmp_path) as (holder, fetcher):
        root = _tree(holder.store)
        order = _order(holder.store, root)
        assert sum(len(b) for _, b in order) > 4 * KiB
        _hostile(holder, root, lambda order: [encode_reply(c, b) for c, b in order])
        error = await _refused(fetcher, holder, root)
        assert error.code == ErrorCode.FETCH_FAILED
        assert "more than the 4096 bytes" in error.message
        # The fetcher's own limit (a result's declared size) caps what it asks for.
        small = 2 * KiB
        got: list[int] = []

        async def record(frames: Frames) -> None:
            want = decode_request(await frames.read())
            assert isinstance(want, DagWant)
            got.append(want.max_bytes)
            await frames.reset()

        holder.mesh.handle(BLOCKS_PROTOCOL_DAG, record)
        await _refused(fetcher, holder, _tree(holder.store), max_bytes=small)
        assert got == [small]


@pytest.mark.timeout(60)
async def test_a_holder_that_lies_about_sizes_is_stopped_at_the_first_lie(
    tmp_path: Path,
) -> None:
    """The content bombs of test_content_bomb come through 1.1.0 now: the walk still
    refuses them at the block that contradicts its parent, before any child."""
    from tests.storage.bombs import file_bomb

    liar = file_bomb(blocksize=1, seed=2)
    async with _pair(tmp_path) as (holder, fetcher):
        serve_block_exchange(holder.mesh, holder.store)
        for cid, block in liar.blocks.items():
            holder.store.put(cid, block)
        error = await _refused(fetcher, holder, liar.root, max_bytes=1024**3)
        assert error.code == ErrorCode.CONTENT_TOO_LARGE
        assert error.details["discarded_blocks"] == 2
        assert not any(fetcher.store.iter_cids())

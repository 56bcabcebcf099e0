"""A hostile peer serves a UnixFS bomb; the fetching node refuses it and stays small.

Two content nodes in this process, each with a real libp2p host, an on-disk
blockstore and the block exchange (as in tests/node/content/test_service.py).
The evil one holds hand-built bombs (tests/storage/bombs.py): the measured
one of issue 8 is 448 KiB of blocks that read as 1 GiB, with link Tsizes of
1. Before the fix, fetching it as a job's model grew the compute node to
2.4 GB and left a 1 GiB file; `storage.get` of it took 5.6 GB.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from crypto.keys import Identity
from node.content.blocks import BitswapStore, fetch_dag, serve_block_exchange
from node.content.service import Content, ContentConfig
from node.jobs.bus import EventBus
from node.jobs.store import JobDB
from node.transport.mesh import start_mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import Blockstore
from storage.cid import Cid
from storage.errors import ContentTooLarge
from tests.storage.bombs import Bomb, file_bomb

MiB = 1024 * 1024
GiB = 1024 * MiB
# What the victim's resident set may grow by while it fetches and refuses
# every bomb below: the bombs' real blocks are under 1 MiB, their content 3 GiB.
RSS_BOUND = 64 * MiB

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the test extras
    psutil = None


def _rss() -> int:
    if psutil is not None:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, on Linux


@asynccontextmanager
async def _content_node(data_dir: Path, max_bytes: int) -> AsyncIterator[Content]:
    store = Blockstore(data_dir / "blocks")
    db = JobDB(data_dir / "jobs.sqlite", EventBus())
    identity = Identity.load_or_create(data_dir)
    async with (
        start_mesh(identity, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh,
        trio.open_nursery() as nursery,
    ):
        serve_block_exchange(mesh, store)
        content = Content(data_dir, store, mesh, db, ContentConfig(max_content_bytes=max_bytes))
        await nursery.start(content.run)
        yield content
        nursery.cancel_scope.cancel()
    content.close()
    db.close()


def _plant(content: Content, bomb: Bomb) -> None:
    for cid, block in bomb.blocks.items():
        content.store.put(cid, block)


def _left(content: Content, bomb: Bomb) -> list[Cid]:
    return [cid for cid in bomb.blocks if content.store.has(cid)]


@pytest.mark.timeout(60)
async def test_fetching_a_bomb_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    measured = file_bomb()  # 4096 links to one 256 KiB leaf, Tsizes 1: declares 1 GiB
    honest = file_bomb(tsize=None, seed=1)  # sizes all true: a 1 GiB DAG, over the limit
    liar = file_bomb(blocksize=1, seed=2)  # every size says 1: found at its first leaf
    assert measured.wire_bytes < 460 * 1024 and measured.logical_content == GiB
    async with (
        _content_node(tmp_path / "evil", 4 * GiB) as evil,
        _content_node(tmp_path / "victim", 512 * MiB) as victim,
    ):
        for bomb in (measured, honest, liar):
            _plant(evil, bomb)
        good = await evil.add_bytes(os.urandom(3 * MiB))
        await victim.mesh.connect(f"{evil.mesh.listen_addrs()[0]}/p2p/{evil.mesh.peer_id}")
        peer = evil.mesh.peer_id

        rss_before = _rss()
        started = time.perf_counter()
        # Content.fetch (storage.fetch, storage.pin, the gateway): the node's limit.
        for bomb in (measured, honest, liar):
            with pytest.raises(MeshrunError) as info:
                await victim.fetch(bomb.root, peer=peer, timeout=20)
            assert info.value.code == ErrorCode.CONTENT_TOO_LARGE, info.value
            assert _left(victim, bomb) == []
        # fetch_dag as the roles call it: the spec's declared size (here what the
        # measured bomb's lying Tsizes add up to) and the default clean-up.
        declared = len(measured.blocks[measured.root]) + 4096
        with pytest.raises(MeshrunError) as info:
            await fetch_dag(victim.mesh, victim.store, measured.root, peer, 20, max_bytes=declared)
        assert info.value.code == ErrorCode.CONTENT_TOO_LARGE
        assert "declares 1073741824 bytes of content" in info.value.message
        with pytest.raises(MeshrunError) as info:
            await fetch_dag(victim.mesh, victim.store, liar.root, peer, 20, max_bytes=GiB)
        assert info.value.code == ErrorCode.CONTENT_TOO_LARGE
        assert info.value.details["discarded_blocks"] == 2  # the root and the one leaf
        # Over bitswap (no peer named) the refusal is the same.
        with pytest.raises(MeshrunError) as info:
            await fetch_dag(victim.mesh.bitswap, victim.store, liar.root, peer, 20, max_bytes=GiB)
        assert info.value.code == ErrorCode.CONTENT_TOO_LARGE
        elapsed = time.perf_counter() - started
        grown = _rss() - rss_before

        for bomb in (measured, honest, liar):
            assert _left(victim, bomb) == []
        assert not any(victim.store.iter_cids())
        assert grown < RSS_BOUND, f"victim grew by {grown / MiB:.1f} MiB"
        print(f"\nbombs refused in {elapsed:.2f}s; victim RSS grew by {grown / MiB:.1f} MiB")

        # An honest file within the limit still comes through, and reads back bounded.
        fetched = await victim.fetch(good, peer=peer, timeout=20)
        assert fetched["source"] == "mesh" and fetched["via"] == "exchange"
        assert len(victim.store.cat(good, max_bytes=3 * MiB)) == 3 * MiB
        with pytest.raises(ContentTooLarge):
            victim.store.cat(good, max_bytes=3 * MiB - 1)


@pytest.mark.timeout(60)
async def test_a_refused_bomb_spares_blocks_a_pinned_dag_shares(tmp_path: Path) -> None:
    liar = file_bomb(blocksize=1, seed=3)
    async with (
        _content_node(tmp_path / "evil", 4 * GiB) as evil,
        _content_node(tmp_path / "victim", 512 * MiB) as victim,
    ):
        _plant(evil, liar)
        # The victim already keeps a file made of the very leaf the bomb reuses.
        mine = await victim.add_bytes(liar.blocks[liar.leaf] * 2)
        await victim.mesh.connect(f"{evil.mesh.listen_addrs()[0]}/p2p/{evil.mesh.peer_id}")
        with pytest.raises(MeshrunError) as info:
            await victim.fetch(liar.root, peer=evil.mesh.peer_id, timeout=20)
        assert info.value.code == ErrorCode.CONTENT_TOO_LARGE
        assert not victim.store.has(liar.root)
        assert victim.store.has(liar.leaf)  # pinned under `mine`: kept
        assert victim.store.cat(mine) == liar.blocks[liar.leaf] * 2

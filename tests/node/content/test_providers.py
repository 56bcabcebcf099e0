"""Provider announcements between two real hosts: batching and the interval between them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from crypto.keys import Identity
from node.content.bitswap import Bitswap
from node.content.providers import Providers
from node.transport.mesh import Mesh, start_mesh
from protocol.messages import PROVIDERS_TOPIC
from storage.blockstore import MemoryBlockstore
from storage.cid import Cid, cid_for_raw


@asynccontextmanager
async def _pair(interval: float) -> AsyncIterator[tuple[Providers, Providers, Mesh]]:
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as a,
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as b,
        trio.open_nursery() as nursery,
    ):
        addr = a.listen_addrs()[0]
        await b.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{a.peer_id}")
        ours, theirs = Providers(a, delay=0.05, interval=interval), Providers(b)
        await nursery.start(ours.run)
        await nursery.start(theirs.run)
        with trio.fail_after(60):
            while not (a.topic_peers(PROVIDERS_TOPIC) and b.topic_peers(PROVIDERS_TOPIC)):
                await trio.sleep(0.05)
        yield ours, theirs, a
        nursery.cancel_scope.cancel()
        a.nursery.cancel_scope.cancel()
        b.nursery.cancel_scope.cancel()


async def _heard(providers: Providers, cids: list[Cid], peer: str) -> None:
    with trio.fail_after(60):
        while not all(any(r.peer_id == peer for r in providers.table.get(c)) for c in cids):
            await trio.sleep(0.02)


async def test_results_kept_during_the_interval_go_out_in_one_announcement() -> None:
    first, second, third = (cid_for_raw(f"result {i}".encode()) for i in range(3))
    async with _pair(interval=3.0) as (ours, theirs, mesh):
        ours.announce_soon([first])
        await _heard(theirs, [first], mesh.peer_id)
        assert ours.announced == 1
        # Two more results, one after the other, soon after the first announcement:
        # they wait for the interval and travel together.
        ours.announce_soon([second])
        await trio.sleep(0.2)
        ours.announce_soon([third])
        await _heard(theirs, [second, third], mesh.peer_id)
        assert ours.announced == 2
        assert theirs.heard >= 2

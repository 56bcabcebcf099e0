"""Provider announcements between two real hosts: batching and the interval between them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from node.content.providers import Providers
from node.transport.mesh import Mesh
from protocol.messages import PROVIDERS_TOPIC
from storage.cid import Cid, cid_for_raw
from tests.node.mesh_helpers import eventually, mesh_pair


@asynccontextmanager
async def _pair(interval: float) -> AsyncIterator[tuple[Providers, Providers, Mesh]]:
    async with mesh_pair() as (a, b), trio.open_nursery() as nursery:
        ours, theirs = Providers(a, delay=0.05, interval=interval), Providers(b)
        await nursery.start(ours.run)
        await nursery.start(theirs.run)
        await eventually(
            lambda: bool(a.topic_peers(PROVIDERS_TOPIC) and b.topic_peers(PROVIDERS_TOPIC)), 60
        )
        yield ours, theirs, a
        nursery.cancel_scope.cancel()


async def _heard(providers: Providers, cids: list[Cid], peer: str) -> None:
    await eventually(
        lambda: all(any(r.peer_id == peer for r in providers.table.get(c)) for c in cids), 60
    )


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

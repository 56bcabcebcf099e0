"""Two real meshrun hosts in one process, and waiting on what they do."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from crypto.keys import Identity
from node.content.bitswap import Bitswap
from node.transport.mesh import Mesh, start_mesh
from storage.blockstore import MemoryBlockstore


@asynccontextmanager
async def mesh_pair() -> AsyncIterator[tuple[Mesh, Mesh]]:
    """Two connected hosts, each with its own memory blockstore behind its bitswap."""
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as a,
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as b,
    ):
        addr = a.listen_addrs()[0]
        await b.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{a.peer_id}")
        yield a, b
        a.nursery.cancel_scope.cancel()
        b.nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Return once `check()` holds; fail (trio.TooSlowError) after `timeout` seconds.

    For what a peer's task does after the message the test waited on: a server
    counts a reply after its write returns, which can be after the reply was read.
    """
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)

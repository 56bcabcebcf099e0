"""A topic joined while a peer is being added still reaches that peer.

py-libp2p 0.8.1 builds its hello (the topics we subscribe to) before writing
it, and registers the peer only after the write: a subscribe in between is in
neither the hello nor the broadcast, which skips unregistered peers, and
nothing tells the peer again. Two real hosts on loopback, the dialled one
subscribing 18-35 ms into their connection, lost the subscription for good in 8 of 72
trials before node/transport/guard.py re-sent what changed during the
handshake.

The race cannot be forced from outside without changing the library's code,
so the test sweeps the moment of the subscribe across the connection instead,
many trials; each one must end with both hosts knowing each other's topic.
"""

from __future__ import annotations

import pytest
import trio

from crypto.keys import Identity
from node.content.bitswap import Bitswap
from node.transport.mesh import start_mesh
from storage.blockstore import MemoryBlockstore

pytestmark = pytest.mark.slow

TOPIC = "meshrun-test-late-subscription"
# Milliseconds after the dial starts; the window was 18-35 ms on the project VM,
# and a slower machine moves it later.
DELAYS_MS = range(0, 80, 2)


async def _trial(delay: float) -> tuple[bool, bool]:
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as late,
        start_mesh(Identity.generate(), listen, Bitswap(MemoryBlockstore())) as peer,
    ):
        await peer.subscribe(TOPIC, lambda *_: True)
        addr = late.listen_addrs()[0]

        async def subscribe_later() -> None:
            await trio.sleep(delay)
            await late.subscribe(TOPIC, lambda *_: True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscribe_later)
            # The late subscriber is dialled: its side of the race is the one seen.
            await peer.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{late.peer_id}")
        with trio.move_on_after(5):
            while not (
                late.peer_id in peer.topic_peers(TOPIC) and peer.peer_id in late.topic_peers(TOPIC)
            ):
                await trio.sleep(0.02)
        return late.peer_id in peer.topic_peers(TOPIC), peer.peer_id in late.topic_peers(TOPIC)


async def test_a_topic_joined_while_a_peer_connects_reaches_it() -> None:
    missed = []
    for ms in DELAYS_MS:
        known = await _trial(ms / 1000)
        if known != (True, True):
            missed.append((ms, known))
    assert not missed, f"subscriptions never learned (delay ms, (peer knows, late knows)): {missed}"

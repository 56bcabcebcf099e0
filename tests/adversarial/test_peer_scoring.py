"""Peers that send junk or too much are scored down, banned and disconnected (real libp2p).

Three meshes in one trio process: a victim, an attacker and an honest peer,
each a real py-libp2p host on loopback, built by the project's own start_mesh.
"""

from __future__ import annotations

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.transport.frames import Frames
from node.transport.mesh import Mesh
from protocol.limits import KeyedBuckets
from tests.adversarial.stack_helpers import meshes

TOPIC = "meshrun/test-scoring"

PROTOCOL = "/meshrun/test-echo/1"


def _addr(mesh: Mesh) -> str:
    return f"{mesh.listen_addrs()[0]}/p2p/{mesh.peer_id}"


async def _until(condition: object, timeout: float = 15.0) -> None:
    assert callable(condition)
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


async def _victim_with_topic(victim: Mesh, delivered: list[bytes]) -> None:
    sub = await victim.subscribe(TOPIC, lambda forwarder, origin, data: data.startswith(b"ok"))

    async def read() -> None:
        while True:
            delivered.append(bytes((await sub.get()).data))

    victim.nursery.start_soon(read)

    async def echo(frames: Frames) -> None:
        await frames.write(await frames.read())

    victim.handle(PROTOCOL, echo)


async def _join(peer: Mesh, victim: Mesh) -> None:
    await peer.connect(_addr(victim))
    await peer.pubsub.subscribe(TOPIC)
    await _until(lambda: peer.peer_id in victim.topic_peers(TOPIC))
    await trio.sleep(1.5)  # let the gossip mesh form (heartbeat 1 s)


async def test_a_peer_publishing_invalid_messages_is_banned_and_disconnected() -> None:
    async with meshes(3) as (victim, attacker, honest):
        delivered: list[bytes] = []
        await _victim_with_topic(victim, delivered)
        await _join(attacker, victim)
        await _join(honest, victim)

        for i in range(30):
            await attacker.publish(TOPIC, b"junk %d" % i)
        await _until(lambda: attacker.peer_id not in victim.connected_peers())
        assert victim.guard.refuses(attacker.peer_id)
        assert victim.guard.bans == 1

        # The honest peer is untouched and still heard.
        await honest.publish(TOPIC, b"ok from honest")
        await _until(lambda: b"ok from honest" in delivered)
        assert honest.peer_id in victim.connected_peers()
        assert not victim.guard.refuses(honest.peer_id)

        # Coming back does not help while the ban lasts: streams are reset and
        # the connection is closed again.
        try:
            await attacker.connect(_addr(victim))
            frames = await attacker.open(victim.peer_id, PROTOCOL)
            await frames.write(b"hello?")
            with trio.fail_after(5):
                echoed = await frames.read()
        except Exception:
            echoed = None
        assert echoed is None
        await _until(lambda: attacker.peer_id not in victim.connected_peers())
        assert b"junk 0" not in delivered


async def test_a_forwarder_over_its_gossip_budget_is_banned() -> None:
    async with meshes(2) as (victim, flooder):
        delivered: list[bytes] = []
        await _victim_with_topic(victim, delivered)
        victim.guard.gossip = KeyedBuckets(rate=5.0, burst=20.0)
        await _join(flooder, victim)

        with trio.move_on_after(20):
            for i in range(400):  # valid messages, far too many
                await flooder.publish(TOPIC, b"ok %d" % i)
                if flooder.peer_id not in victim.connected_peers():
                    break
        await _until(lambda: flooder.peer_id not in victim.connected_peers())
        assert victim.guard.refuses(flooder.peer_id)
        assert 20 <= len(delivered) < 200, len(delivered)


async def test_a_flooded_peer_store_keeps_the_node_working() -> None:
    """The measured crash: 1000+ strangers' addresses evicted the node's own key pair,
    and the next peer to connect killed the node in identify."""
    async with meshes(2) as (victim, newcomer):
        store = victim.host.get_peerstore()
        trap = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")
        for _ in range(store.max_peers + 200):
            store.add_addrs(ID.from_pubkey(create_new_key_pair().public_key), [trap], 3600)
        assert len(store.peer_ids()) <= store.max_peers
        assert victim.host.get_public_key() == store.pubkey(ID.from_base58(victim.peer_id))

        delivered: list[bytes] = []
        await _victim_with_topic(victim, delivered)
        await _join(newcomer, victim)  # connect, identify, pubsub streams both ways
        frames = await newcomer.open(victim.peer_id, PROTOCOL)
        await frames.write(b"still here?")
        with trio.fail_after(10):
            assert await frames.read() == b"still here?"

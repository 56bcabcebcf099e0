"""The libp2p side of a node: host, gossipsub, framed request streams, bitswap.

Everything py-libp2p-specific lives here so the roles (requester, compute) talk
in envelopes and CIDs. The quirks this module works around are measured in
shared/LIBP2P_NOTES.md: Noise only (the default also offers plaintext and
SECIO), one connection per peer (otherwise connect waits 250 ms), Pubsub built
and its service entered with no await in between (otherwise an early peer
stream kills the host), heartbeat 1 s and the spam guard off (otherwise
gossip drops messages silently).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.bitswap import BitswapClient
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.msgio import VarIntLengthMsgReadWriter
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from crypto.keys import Identity

log = logging.getLogger("meshrun.mesh")

MAX_FRAME_BYTES = 1024 * 1024
PEERSTORE_TTL = 3600


class Frames:
    """Length-prefixed frames over one libp2p stream."""

    def __init__(self, stream: INetStream, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self._rw = VarIntLengthMsgReadWriter(stream, max_bytes)

    @property
    def remote_peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def read(self) -> bytes:
        return bytes(await self._rw.read_msg())

    async def write(self, data: bytes) -> None:
        await self._rw.write_msg(data)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:  # closing a dead stream is not worth a crash
            log.debug("stream close failed", exc_info=True)

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            log.debug("stream reset failed", exc_info=True)


StreamHandler = Callable[[Frames], Awaitable[None]]
Validator = Callable[[str, bytes, bytes], bool]


@dataclass
class Mesh:
    identity: Identity
    host: IHost
    pubsub: Pubsub
    gossipsub: GossipSub
    bitswap: BitswapClient
    nursery: trio.Nursery
    _topics: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self.host.get_connected_peers()]

    def topic_peers(self, topic: str) -> list[str]:
        return [str(p) for p in self.pubsub.peer_topics.get(topic, set())]

    async def connect(self, addr: str) -> str:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self.host.connect(info)
        await self.pubsub.ensure_peer_stream(info.peer_id)
        return str(info.peer_id)

    def remember_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Let a later dial reach a peer we only know from a signed message."""
        pid = ID.from_base58(peer_id)
        maddrs = []
        for addr in addrs:
            try:
                maddr = multiaddr.Multiaddr(addr)
                if any(p.name == "p2p" for p in maddr.protocols()):
                    maddr = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
                maddrs.append(maddr)
            except Exception:
                log.info("ignoring unparsable multiaddr %r from %s", addr, peer_id)
        if maddrs:
            self.host.get_peerstore().add_addrs(pid, maddrs, PEERSTORE_TTL)

    async def subscribe(self, topic: str, validator: Validator) -> Any:
        """Subscribe with a validator that sees (forwarding peer, claimed origin, data).

        The validator runs before gossipsub forwards anything, so a forged or
        malformed message is dropped here and its sender penalised, never handled.
        """

        def check(forwarder: ID, msg: Any) -> bool:
            try:
                return validator(str(forwarder), bytes(msg.from_id), bytes(msg.data))
            except Exception:
                log.exception("topic validator crashed; dropping the message")
                return False

        self.pubsub.set_topic_validator(topic, check, False)
        sub = await self.pubsub.subscribe(topic)
        self._topics[topic] = sub
        return sub

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    def handle(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(stream: INetStream) -> None:
            frames = Frames(stream)
            try:
                await handler(frames)
            except Exception:
                log.exception("handler for %s from %s failed", protocol, frames.remote_peer)
                await frames.reset()

        self.host.set_stream_handler(TProtocol(protocol), on_stream)

    async def open(self, peer_id: str, protocol: str) -> Frames:
        stream = await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        return Frames(stream)


def _make_host(identity: Identity) -> IHost:
    key_pair = create_new_key_pair(identity.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


@asynccontextmanager
async def start_mesh(
    identity: Identity,
    listen: list[str],
    bitswap_store: Any,
) -> AsyncIterator[Mesh]:
    host = _make_host(identity)
    listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    async with host.run(listen_addrs=listen_addrs), trio.open_nursery() as nursery:
        gossipsub = GossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            spam_protection_enabled=False,
        )
        pubsub = Pubsub(host, gossipsub)
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            bitswap = BitswapClient(host, bitswap_store)
            bitswap.set_nursery(nursery)
            await bitswap.start()
            mesh = Mesh(identity, host, pubsub, gossipsub, bitswap, nursery)
            try:
                yield mesh
            finally:
                nursery.cancel_scope.cancel()

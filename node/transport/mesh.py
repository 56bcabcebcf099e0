"""The libp2p side of a node: host, gossipsub, framed request streams.

Everything py-libp2p-specific lives in this room (with ``frames``, ``gossip``,
``guard``, ``quiet`` and ``peers``), so the roles talk in envelopes and CIDs.
Hostile peers are ``guard``'s business: the peer store keeps the node's own
entry, addresses from signed messages are dialled only within a budget, and
peers that send junk or too much are banned for a while. The py-libp2p 0.8
quirks worked around here were each measured: Noise only (the default also
offers plaintext and SECIO), one connection per peer (otherwise connect waits
250 ms), Pubsub built and its service entered with no await in between
(otherwise an early peer stream kills the host), heartbeat 1 s and the spam
guard off (otherwise gossip drops messages silently). Bitswap is the content
room's (node.content.bitswap): start_mesh only starts the one it is given, so
its handlers are registered before the first peer connects.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from crypto.keys import Identity
from node.transport.flow import install as install_window_credit
from node.transport.frames import Frames
from node.transport.guard import (
    INVALID_PENALTY,
    MAX_DIAL_ADDRS,
    BanNotifee,
    GuardedPubsub,
    PeerGuard,
    ProtectedPeerStore,
    host_of,
    redial_only_known_peers,
)
from node.transport.quiet import flush_all
from node.transport.records import install as install_record_cache

log = logging.getLogger("meshrun.mesh")

MAX_IDLE_STREAMS = 4
# Peers remembered as not speaking a protocol version (an older meshrun), at most.
MAX_UNSPOKEN = 1024
# py-libp2p drops an outbound RPC once a peer's queue holds 32: publish waits
# below this mark, leaving room for control traffic (IHAVE, GRAFT...).
OUTBOUND_HIGH_WATER = 16
PUBLISH_BACKPRESSURE_S = 5.0
# A subscription buffers this many undelivered messages before dropping new
# ones (py-libp2p's default is 32): a burst of job announcements must fit.
SUBSCRIPTION_BUFFER = 1024
PEERSTORE_TTL = 3600
HOUSEKEEPING_S = 1.0
ADDRS_TTL = 10.0


StreamHandler = Callable[[Frames], Awaitable[None]]
Validator = Callable[[str, bytes, bytes], bool]


class BlockService(Protocol):
    """What start_mesh needs of the node's bitswap: to be started on the mesh."""

    async def start(self, mesh: Mesh) -> None: ...


class FloodPublishGossipSub(GossipSub):
    """Gossipsub that sends a node's own messages to every peer on the topic.

    A requester publishes job specs to a topic it does not subscribe to, so
    stock py-libp2p picks a random fanout of `degree` (6) peers. In a star
    around the requester (the devstack; any mesh where compute nodes only know
    the requester) the other compute nodes never hear the job, and the bid
    window, which waits for every topic peer, runs to its end. Flood
    publishing our own messages is gossipsub v1.1's default in go-libp2p
    (floodPublish) for exactly this reason; forwarding others' messages still
    follows the mesh.
    """

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterator[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id == msg_forwarder:
            for topic in topics:
                peers.update(p for p in self.pubsub.peer_topics.get(topic, ()) if p != origin)
        yield from peers


@dataclass
class Mesh:
    identity: Identity
    host: IHost
    pubsub: Pubsub
    gossipsub: GossipSub
    bitswap: BlockService
    nursery: trio.Nursery
    guard: PeerGuard
    _topics: dict[str, Any] = field(default_factory=dict)
    _outbound: dict[tuple[str, str], Frames] = field(default_factory=dict)
    _outbound_locks: dict[tuple[str, str], trio.Lock] = field(default_factory=dict)
    _idle: dict[tuple[str, str], list[Frames]] = field(default_factory=dict)
    _unspoken: dict[tuple[str, str], None] = field(default_factory=dict)
    _publish_lock: trio.Lock = field(default_factory=trio.Lock)
    _addrs: tuple[float, list[str]] | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def listen_addrs(self) -> list[str]:
        """Our addresses, as every job spec and provider announcement names them.

        Remembered for ADDRS_TTL seconds: py-libp2p rebuilds the list from its
        listeners on each call (~1 % of a busy requester's CPU, once per job).
        """
        now = time.monotonic()
        if self._addrs is None or now - self._addrs[0] >= ADDRS_TTL:
            addrs = [str(a) for a in self.host.get_addrs()]
            if not addrs:  # not listening yet: nothing worth remembering
                return addrs
            self._addrs = (now, addrs)
        return list(self._addrs[1])

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self.host.get_connected_peers()]

    def topic_peers(self, topic: str) -> list[str]:
        return [str(p) for p in self.pubsub.peer_topics.get(topic, set())]

    def is_connected(self, peer_id: str) -> bool:
        try:
            return bool(self.host.get_network().get_connections(ID.from_base58(peer_id)))
        except Exception:  # not a peer id: certainly not connected
            return False

    def report(self, peer_id: str, what: str, kind: str, detail: str) -> None:
        """`peer_id` sent us something we dropped: logged (aggregated), and its score lowered.

        Past the threshold the peer is banned for about a minute: disconnected,
        its gossip and streams refused.
        """
        self.guard.report(peer_id, what, kind, detail)

    async def connect(self, addr: str) -> str:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self.host.connect(info)
        await self.pubsub.ensure_peer_stream(info.peer_id)
        return str(info.peer_id)

    def may_dial(self, peer_id: str, addrs: list[str]) -> bool:
        """Whether the dial budget lets us dial `peer_id` at addresses read in a signed message.

        True charges the budget: call it right before the dial. For callers
        that dial such addresses themselves (a provider announcement's, say);
        :meth:`answer` does this for replies to a gossiped message.
        """
        maddrs = _dialable(peer_id, addrs)[:MAX_DIAL_ADDRS]
        return bool(maddrs) and self.guard.may_dial(peer_id, maddrs)

    async def answer(
        self, peer_id: str, addrs: list[str], protocol: str, data: bytes, what: str = "reply"
    ) -> bool:
        """Send `data` to the signer of a gossiped message; False (logged) if it was not sent.

        Over the connection we already have to that peer when there is one.
        Otherwise the addresses come from the signed message, and anyone can
        sign a message naming any address: a flood of specs once made each
        compute node open 1,824 connections to an address written in them. So
        they are dialled only within the dial budget (one dial per peer per
        30 s, 4 per host a minute, 20 a minute in all), put in the peer store
        only then, and at most MAX_DIAL_ADDRS of them. Never raises (but for
        cancellation); every failure is logged through the aggregating log.
        """
        quiet = self.guard.quiet
        # Log keys name where a dial would go, not the peer: a flood of fresh
        # keys must not become a flood of log lines.
        where = peer_id
        if not self.is_connected(peer_id):
            maddrs = _dialable(peer_id, addrs)[:MAX_DIAL_ADDRS]
            if not maddrs:
                quiet.dropped(
                    what,
                    "unconnected peers",
                    "no address",
                    f"{peer_id} is not connected and named no usable address",
                    prep="to",
                )
                return False
            where = f"unconnected peers at {host_of(maddrs[0])}"
            if not self.guard.may_dial(peer_id, maddrs):
                quiet.dropped(
                    what,
                    where,
                    "no dial budget",
                    f"{peer_id} is not connected and the dial budget is spent",
                    logging.INFO,
                    prep="to",
                )
                return False
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), maddrs, PEERSTORE_TTL)
        try:
            await self.send(peer_id, protocol, data)
            return True
        except Exception as exc:
            if where != peer_id:  # forget what we dialled: nothing else may redial it
                with contextlib.suppress(Exception):
                    self.host.get_peerstore().clear_addrs(ID.from_base58(peer_id))
            detail = f"{peer_id}: {type(exc).__name__}: {exc}"
            quiet.dropped(what, where, "unreachable", detail, prep="to")
            return False

    async def subscribe(self, topic: str, validator: Validator) -> Any:
        """Subscribe with a validator that sees (forwarding peer, claimed origin, data).

        The validator runs before gossipsub forwards anything, so a forged or
        malformed message is dropped here, never handled, and its forwarder's
        score lowered (the guard bans it past the threshold). The validator
        logs why; through an aggregating log, since one line a message lets
        a flood fill the disk.
        """

        def check(forwarder: ID, msg: Any) -> bool:
            peer = str(forwarder)
            try:
                ok = validator(peer, bytes(msg.from_id), bytes(msg.data))
            except Exception:
                log.exception("topic validator crashed; dropping the message")
                return False
            if not ok:
                self.guard.penalize(peer, INVALID_PENALTY, f"invalid messages on {topic}")
            return ok

        self.pubsub.set_topic_validator(topic, check, False)
        # The buffer size is a module constant read when a subscription is made.
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(
            SUBSCRIPTION_BUFFER, pubsub_module.SUBSCRIPTION_CHANNEL_SIZE
        )
        sub = await self.pubsub.subscribe(topic)
        self._topics[topic] = sub
        return sub

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish once every topic peer's outbound queue has room.

        py-libp2p queues at most 32 RPCs per peer and silently drops the rest,
        with no backpressure from publish(): 64 jobs submitted at once lost
        most of their announcements, and those jobs failed with NO_BIDS.
        Publishes are serialized so the room checked is the room used.
        """
        async with self._publish_lock:
            with trio.move_on_after(PUBLISH_BACKPRESSURE_S):
                while self._fullest_queue(topic) >= OUTBOUND_HIGH_WATER:
                    await trio.sleep(0.002)
            await self.pubsub.publish(topic, data)

    def _fullest_queue(self, topic: str) -> int:
        queues = self.pubsub.peer_queues
        peers = self.pubsub.peer_topics.get(topic, ())
        return max((len(queues[p]) for p in peers if p in queues), default=0)

    def handle(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(stream: INetStream) -> None:
            frames = Frames(stream)
            if self.guard.refuses(frames.remote_peer):
                self.guard.quiet.dropped(
                    f"{protocol} stream",
                    frames.remote_peer,
                    "banned",
                    "peer is banned",
                    logging.INFO,
                )
                await frames.reset()
                return
            try:
                await handler(frames)
            except Exception:
                log.exception("handler for %s from %s failed", protocol, frames.remote_peer)
                await frames.reset()

        self.host.set_stream_handler(TProtocol(protocol), on_stream)

    async def open(self, peer_id: str, protocol: str | Sequence[str]) -> Frames:
        """A new stream; given several protocols, the first the peer speaks (in order)."""
        protocols = [protocol] if isinstance(protocol, str) else list(protocol)
        stream = await self.host.new_stream(
            ID.from_base58(peer_id), [TProtocol(p) for p in protocols]
        )
        return Frames(stream)

    async def open_pipelined(self, peer_id: str, protocol: str) -> Frames:
        """A new stream whose protocol negotiation rides with its first frame.

        `open` waits two round trips (the multistream-select handshake, then
        the protocol's acceptance) before anything can be sent: at 50 ms RTT
        an Accept reached its executor 2.5 RTT after it was signed. Here the
        handshake, the protocol choice and the first frame leave in one
        write, as go-libp2p's lazy client does, so the peer's handler reads
        the frame half a round trip later. The peer's answers are checked by
        the first read (frames.ProtocolNotSpoken if it refused the protocol),
        so only a protocol the peer is known to speak should be opened so.
        """
        stream = await self.host.get_network().new_stream(ID.from_base58(peer_id))
        stream.set_protocol(TProtocol(protocol))
        return Frames(stream, protocol=protocol)

    async def checkout(
        self, peer_id: str, protocol: str, *, pipelined: bool = False
    ) -> tuple[Frames, bool]:
        """A request/response stream to reuse if one is idle, else a new one.

        Opening a stream costs two multistream-select round trips (10-40 ms on
        a busy 2-core machine, 100 ms at 50 ms RTT), which a small result
        fetch otherwise pays every time; `pipelined` opens a new one with
        `open_pipelined` instead. Returns (frames, reused): a reused stream
        may have died while idle, so the caller retries once on a fresh one
        when it fails.
        """
        idle = self._idle.get((peer_id, protocol))
        while idle:
            frames = idle.pop()
            if self._live(frames):
                return frames, True
        if pipelined:
            return await self.open_pipelined(peer_id, protocol), False
        return await self.open(peer_id, protocol), False

    def unspoken(self, peer_id: str, protocol: str) -> bool:
        """Whether `peer_id` refused `protocol` before (see `remember_unspoken`)."""
        return (peer_id, protocol) in self._unspoken

    def remember_unspoken(self, peer_id: str, protocol: str) -> None:
        """`peer_id` refused `protocol` (frames.ProtocolNotSpoken): callers that would
        pipeline it ask for an older version instead. Bounded: the oldest go first."""
        self._unspoken[(peer_id, protocol)] = None
        while len(self._unspoken) > MAX_UNSPOKEN:
            del self._unspoken[next(iter(self._unspoken))]

    def checkin(self, frames: Frames, protocol: str) -> None:
        """Give back a stream whose last exchange ended cleanly, for the next caller."""
        idle = self._idle.setdefault((frames.remote_peer, protocol), [])
        if len(idle) < MAX_IDLE_STREAMS and self._live(frames):
            idle.append(frames)
        else:
            self.nursery.start_soon(frames.close)

    async def send(self, peer_id: str, protocol: str, data: bytes) -> None:
        """One-way frame to a peer over a stream kept open for the next ones.

        For a protocol whose handler reads frames until the stream ends (bids):
        the first send opens the stream, later ones reuse it, saving the
        stream negotiation on the path every job takes. A watcher notices when
        the peer ends the stream, so a dead one is never written into; a failed
        write is retried once on a fresh stream.
        """
        key = (peer_id, protocol)
        lock = self._outbound_locks.setdefault(key, trio.Lock())
        async with lock:
            for attempt in (1, 2):
                frames = self._outbound.get(key)
                if frames is None or not self._live(frames):
                    frames = await self.open(peer_id, protocol)
                    self._outbound[key] = frames
                    self.nursery.start_soon(self._watch_outbound, key, frames)
                try:
                    await frames.write(data)
                    return
                except Exception:
                    self._outbound.pop(key, None)
                    await frames.reset()
                    if attempt == 2:
                        raise

    def _live(self, frames: Frames) -> bool:
        """Open, and on a connection the swarm still holds for that peer.

        A peer that crashed and came back is reached over a new connection;
        a write into a stream of the old one can succeed locally and vanish
        (the RST comes later), which lost the first bid after a requester
        restart.
        """
        if not _usable(frames):
            return False
        conn = frames.stream.muxed_conn
        if getattr(conn, "is_closed", False):
            return False
        try:
            current = self.host.get_network().get_connections(conn.peer_id)
        except Exception:
            return False
        return any(getattr(c, "muxed_conn", None) is conn for c in current)

    async def _watch_outbound(self, key: tuple[str, str], frames: Frames) -> None:
        with contextlib.suppress(Exception):
            while True:
                await frames.read()  # the peer sends nothing back; this ends at EOF
        if self._outbound.get(key) is frames:
            del self._outbound[key]
        await frames.close()


def _dialable(peer_id: str, addrs: list[str]) -> list[multiaddr.Multiaddr]:
    """Parsed addresses without their /p2p/ part; unparsable ones are skipped."""
    maddrs = []
    for addr in addrs:
        try:
            maddr = multiaddr.Multiaddr(addr)
            if any(p.name == "p2p" for p in maddr.protocols()):
                maddr = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
            maddrs.append(maddr)
        except Exception:
            log.debug("ignoring unparsable multiaddr %r from %s", addr, peer_id)
    return list(dict.fromkeys(maddrs))


def _usable(frames: Frames) -> bool:
    state = getattr(frames.stream, "_state", None)
    return getattr(state, "name", "OPEN") in ("OPEN", "INIT")


def _make_host(identity: Identity) -> IHost:
    install_record_cache()
    install_window_credit()
    key_pair = create_new_key_pair(identity.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    peerstore = ProtectedPeerStore()
    peerstore.pinned.add(ID.from_pubkey(key_pair.public_key))
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        peerstore_opt=peerstore,
    )
    peerstore.protected = host.get_connected_peers
    if not redial_only_known_peers(host):
        log.debug("this py-libp2p has no AutoConnector to restrict")
    return host


async def _housekeeping(guard: PeerGuard) -> None:
    """Once a second: write the aggregated log lines whose window ended, forget settled scores."""
    while True:
        await trio.sleep(HOUSEKEEPING_S)
        flush_all()
        guard.scores.forget_settled(guard.clock())


async def _disconnect(host: IHost, peer: str) -> None:
    try:
        await host.disconnect(ID.from_base58(peer))
    except Exception as exc:
        log.debug("could not disconnect %s: %s", peer, exc)


@asynccontextmanager
async def start_mesh(
    identity: Identity,
    listen: list[str],
    bitswap: BlockService,
) -> AsyncIterator[Mesh]:
    """Run a host with gossipsub and `bitswap` for the body's duration.

    Request protocols (the block exchange, bids, results...) are registered by
    their owners with :meth:`Mesh.handle` on the mesh this yields.

    An exception from the body is re-raised after everything has stopped:
    raised inside the background nursery it turned into Cancelled during
    the services' shutdown and was silently swallowed by that nursery, so a
    node could die of an error nobody ever saw.
    """
    host = _make_host(identity)
    listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    failure: BaseException | None = None
    async with host.run(listen_addrs=listen_addrs), trio.open_nursery() as nursery:
        gossipsub = FloodPublishGossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            spam_protection_enabled=False,
        )
        pubsub = GuardedPubsub(host, gossipsub)
        guard = PeerGuard(identity.peer_id)
        pubsub.guard = guard

        def disconnect(peer: str) -> None:
            nursery.start_soon(_disconnect, host, peer)

        guard.disconnect = disconnect
        host.get_network().register_notifee(BanNotifee(guard))
        # Peers drop a message whose (sender, seqno) they have seen. py-libp2p
        # starts the counter at the current second and adds one per publish, so
        # a node that restarts with the same identity after publishing more
        # messages than seconds it ran reuses seqnos its peers still remember,
        # and its first jobs after the restart vanish. Nanoseconds make a reuse
        # need a billion publishes a second.
        pubsub.counter = time.time_ns()
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            mesh = Mesh(identity, host, pubsub, gossipsub, bitswap, nursery, guard)
            await bitswap.start(mesh)
            nursery.start_soon(_housekeeping, guard)
            try:
                yield mesh
            except BaseException as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure

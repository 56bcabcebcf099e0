"""Hostile peers cannot hurt a node: a peer store that keeps what matters, budgets, bans.

Measured on a devstack before this existed: ~6,000 job specs, each signed by
a fresh key, filled py-libp2p's 1000-peer store with their requesters'
addresses; its eviction removed the node's own entry first (it has no
addresses), and the next identify crashed every compute node with
``PeerStoreError: 'peer ID not found'``. The same flood made each compute node
open 1,824 TCP connections to whatever address the specs named, and 35,500
junk messages in 40 s cost 24,000 log lines a node and never cost the spammer
anything. Here:

- :class:`ProtectedPeerStore` never evicts the node's own entry or a
  connected peer's.
- :class:`PeerGuard` holds the budgets and scores (pure, in protocol/limits.py)
  and enforces them: a token bucket per forwarding peer for gossip, a dial
  budget for addresses read in signed messages, and a decaying score per peer
  fed by everything a peer sends that we drop. A peer whose score falls below
  the threshold is banned for a while (about a minute): disconnected, its
  gossip dropped before signature checks, its streams reset, its reconnects
  closed.
- :class:`GuardedPubsub` asks the guard before py-libp2p does anything with
  a gossiped message.
- :func:`redial_only_known_peers` keeps py-libp2p's AutoConnector from
  dialling peer-store entries we never talked to.

Why not py-libp2p's own scoring (``GossipSub(score_params=...)``)? Tried on
0.8.1 between two real hosts (P4 invalid messages weight 10, decay 0.9 per
1 s heartbeat, publish/graylist thresholds -50/-80), a peer publishing 20
invalid messages: its score stopped at about -55 (the publish gate then
dropped its messages before they could count), it was never graylisted,
never disconnected, and 10 s later its messages were accepted again. The
publish gate does drop a low-scoring forwarder's messages, but

- the graylist only gates GRAFTs and gossip emission: it never drops a
  peer's RPCs and nothing ever disconnects it;
- a peer's score is deleted when it disconnects (``PeerScorer.remove_peer``),
  so a spammer reconnects with a clean slate;
- only gossip feeds it: junk on our own stream protocols (bids) cannot (the
  app-specific P6 term is not part of the single-topic publish gate);
- a message over a forwarder's budget can only be refused through the topic
  validator, which caches the message id as invalid for every other
  forwarder, so an honest relay's copy of a real job would be dropped too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from libp2p.peer.peerdata import PeerData
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.pubsub import Pubsub
from multiaddr import Multiaddr

from node.transport.quiet import QuietLog
from protocol.limits import DialBudget, DialLimits, KeyedBuckets, PeerScores, ScoreParams

log = logging.getLogger("meshrun.guard")

# Gossip messages one forwarding peer may send us: a burst of this many ...
GOSSIP_BURST = 500.0
# ... refilled at this many a second. An honest requester publishing 256 jobs
# at once (the throughput benchmark's biggest level) stays inside it.
GOSSIP_RATE = 100.0
# What a dropped message costs its sender's score (threshold -100).
INVALID_PENALTY = 10.0  # rejected by a validator, junk on a stream protocol
EXCESS_PENALTY = 1.0  # over the forwarder's gossip budget
# Addresses taken from one signed message: a dial tries each, with retries.
MAX_DIAL_ADDRS = 4


class ProtectedPeerStore(PeerStore):
    """py-libp2p's peer store, except that pinned and connected peers are never evicted.

    Past ``max_peers`` py-libp2p evicts entries without addresses first, and
    the node's own entry (its key pair, no addresses) is one of them. Pinned
    ids (the node's own) and whatever ``protected`` returns (the connected
    peers) are skipped; everything else is evicted as before.
    """

    def __init__(self, max_records: int = 2000, max_peers: int = 1000) -> None:
        super().__init__(max_records=max_records, max_peers=max_peers)
        self.pinned: set[ID] = set()
        self.protected: Callable[[], Iterable[ID]] = tuple

    def _keep(self) -> set[ID]:
        keep = set(self.pinned)
        try:
            keep.update(self.protected())
        except Exception:  # a half-built host: the pinned ids still hold
            log.debug("could not list connected peers for the peer store", exc_info=True)
        return keep

    def _enforce_peer_limit(self) -> None:
        excess = len(self.peer_data_map) - self.max_peers
        if excess <= 0:
            return
        keep = self._keep()

        def evict_first(item: tuple[ID, PeerData]) -> tuple[bool, bool]:
            _, data = item
            return (not data.get_addrs(), data.is_expired())

        candidates = sorted(
            (item for item in self.peer_data_map.items() if item[0] not in keep),
            key=evict_first,
            reverse=True,
        )
        for peer_id, _ in candidates[:excess]:
            self.peer_record_map.pop(peer_id, None)
            del self.peer_data_map[peer_id]

    def _cleanup_expired_records(self) -> None:
        keep = self._keep()
        expired = [p for p, d in self.peer_data_map.items() if d.is_expired() and p not in keep]
        for peer_id in expired:
            self.maybe_delete_peer_record(peer_id)
            del self.peer_data_map[peer_id]
        self._enforce_record_limit()
        self._enforce_peer_limit()


class PeerGuard:
    """Budgets, scores and bans for one node; see the module docstring."""

    def __init__(
        self,
        me: str,
        *,
        score_params: ScoreParams | None = None,
        gossip_rate: float = GOSSIP_RATE,
        gossip_burst: float = GOSSIP_BURST,
        dial_limits: DialLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self.scores = PeerScores(score_params or ScoreParams())
        self.gossip: KeyedBuckets[str] = KeyedBuckets(gossip_rate, gossip_burst)
        self.dials = DialBudget(dial_limits)
        self.clock = clock
        self.quiet = QuietLog(log)
        self.bans = 0
        # Set by the mesh: closes every connection to a peer, in the background.
        self.disconnect: Callable[[str], None] | None = None

    def refuses(self, peer: str) -> bool:
        """True while `peer` is banned."""
        return peer != self.me and self.scores.banned(peer, self.clock())

    def admit_gossip(self, forwarder: str) -> bool:
        """Charge one gossip message to its forwarding peer; False drops it unseen."""
        if forwarder == self.me:
            return True
        now = self.clock()
        if self.scores.banned(forwarder, now):
            self.quiet.dropped(
                "gossip message", forwarder, "banned", "peer is banned", logging.INFO
            )
            return False
        if self.gossip.take(forwarder, now):
            return True
        self.report(
            forwarder,
            "gossip message",
            "over budget",
            f"more than {self.gossip.burst:.0f} at once or {self.gossip.rate:.0f}/s",
            EXCESS_PENALTY,
        )
        return False

    def report(
        self,
        peer: str,
        what: str,
        kind: str,
        detail: str,
        penalty: float = INVALID_PENALTY,
        level: int = logging.WARNING,
    ) -> None:
        """`peer` sent something we dropped: log it (aggregated) and lower its score."""
        if peer == self.me:
            return
        self.quiet.dropped(what, peer, kind, detail, level)
        self.penalize(peer, penalty, kind)

    def penalize(self, peer: str, penalty: float, why: str) -> None:
        if peer == self.me:
            return
        if self.scores.penalize(peer, penalty, self.clock()):
            self.bans += 1
            log.warning(
                "banning peer %s for about %.0f s (%s): disconnecting it, dropping what it sends",
                peer,
                self.scores.params.longest_ban,
                why,
            )
            if self.disconnect is not None:
                self.disconnect(peer)

    def may_dial(self, peer: str, addrs: Iterable[Multiaddr]) -> bool:
        """Whether the dial budget lets us dial `peer` at `addrs` now (and charges it if so)."""
        return self.dials.allow(peer, [host_of(a) for a in addrs], self.clock())


def redial_only_known_peers(host: IHost) -> bool:
    """Keep py-libp2p's AutoConnector from dialling peers we never talked to.

    To keep ~150 connections it dials any peer-store entry with addresses,
    every 10 s while a node has fewer than 50 connections (a meshrun node
    always has) and after every disconnect. The addresses of a budgeted dial
    sit in the peer store while that dial runs, so it dialled them again,
    outside the budget. Now it only redials peers that once identified
    themselves (their protocols are known). Returns False where this py-libp2p
    has no AutoConnector to restrict.
    """
    connector = getattr(host.get_network(), "auto_connector", None)
    original = getattr(connector, "_get_candidate_peers", None)
    if connector is None or original is None:
        return False
    store = host.get_peerstore()

    def identified(peer: ID) -> bool:
        try:
            return bool(store.get_protocols(peer))
        except Exception:  # PeerStoreError: not in the store at all
            return False

    async def candidates() -> list[ID]:
        return [peer for peer in await original() if identified(peer)]

    connector._get_candidate_peers = candidates
    return True


def host_of(addr: Multiaddr) -> str:
    """The host a multiaddr points at (its IP or DNS name), for per-host dial budgets."""
    for proto in addr.protocols():
        if proto.name in ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"):
            return f"{proto.name}/{addr.value_for_protocol(proto.code)}"
    return str(addr)


class GuardedPubsub(Pubsub):
    """Pubsub that asks the guard about a message's forwarder before anything else.

    Before the signature check, the seen-cache and the topic validators, so a
    banned or over-budget peer's messages cost neither a signature
    verification nor a cached "invalid" verdict that would also drop an honest
    relay's copy of the same message.
    """

    guard: PeerGuard | None = None

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        guard = self.guard
        if (
            guard is not None
            and msg_forwarder != self.my_id
            and not guard.admit_gossip(str(msg_forwarder))
        ):
            return
        await super().push_msg(msg_forwarder, msg)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        """Add a peer, then tell it of every topic we joined or left meanwhile.

        py-libp2p builds its hello (our topics) before writing it and registers
        the peer only once the write returns; a subscribe in between is in
        neither the hello nor the broadcast, which skips unregistered peers, and
        the peer never hears of it again. Two hosts on loopback lost a
        subscription so in 8 of 72 trials; a restarted node re-subscribing as
        its peers reconnect is that window, and a compute node whose
        subscription is lost never hears a job. The topics that changed during
        the handshake are sent again (a repeat is harmless; usually none changed).
        """
        before = set(self.topic_ids)
        await super()._handle_new_peer(peer_id)
        queue = self.peer_queues.get(peer_id)
        if queue is None or peer_id not in self.peers:
            return
        now = set(self.topic_ids)
        for topic in sorted(now ^ before):
            packet, subopt = self._build_announce_rpc(topic, subscribe=topic in now)
            self._enqueue_or_retry_announce(peer_id, queue, packet, subopt)


class BanNotifee(INotifee):
    """Closes a connection from a banned peer as soon as it is made."""

    def __init__(self, guard: PeerGuard) -> None:
        self.guard = guard

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        if self.guard.refuses(peer) and self.guard.disconnect is not None:
            log.info("closing a connection from banned peer %s", peer)
            self.guard.disconnect(peer)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


__all__ = [
    "BanNotifee",
    "GuardedPubsub",
    "PeerGuard",
    "ProtectedPeerStore",
    "host_of",
    "redial_only_known_peers",
]

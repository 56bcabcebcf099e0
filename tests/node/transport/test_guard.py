"""The peer store keeps what matters, the guard bans, the quiet log aggregates."""

from __future__ import annotations

import logging

import multiaddr
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore, PeerStoreError

from crypto.keys import Identity
from node.transport.guard import PeerGuard, ProtectedPeerStore, host_of
from node.transport.mesh import _make_host
from node.transport.quiet import QuietLog
from protocol.limits import DialLimits


def _fresh_id() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def _fill(store: PeerStore, count: int) -> None:
    addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")
    for _ in range(count):
        store.add_addrs(_fresh_id(), [addr], 3600)


def test_stock_peer_store_evicts_its_own_entry_when_flooded() -> None:
    """The crash measured on a devstack: the own entry (keys, no addresses) goes first."""
    key_pair = create_new_key_pair()
    me = ID.from_pubkey(key_pair.public_key)
    store = PeerStore(max_peers=50)
    store.add_key_pair(me, key_pair)
    _fill(store, 60)
    with pytest.raises(PeerStoreError):
        store.pubkey(me)


def test_own_and_connected_entries_survive_a_flood() -> None:
    key_pair = create_new_key_pair()
    me = ID.from_pubkey(key_pair.public_key)
    store = ProtectedPeerStore(max_peers=50)
    store.pinned.add(me)
    store.add_key_pair(me, key_pair)
    other = create_new_key_pair()
    connected = ID.from_pubkey(other.public_key)
    store.add_pubkey(connected, other.public_key)  # identified, no addresses yet
    store.protected = lambda: [connected]
    _fill(store, 5000)
    assert store.pubkey(me) == key_pair.public_key
    assert store.privkey(me) == key_pair.private_key
    assert store.has_peer(connected)
    assert len(store.peer_ids()) == 50
    store._cleanup_expired_records()
    assert store.has_peer(me) and store.has_peer(connected)


def test_a_broken_protected_list_still_keeps_the_pinned_entry() -> None:
    key_pair = create_new_key_pair()
    me = ID.from_pubkey(key_pair.public_key)
    store = ProtectedPeerStore(max_peers=10)
    store.pinned.add(me)
    store.add_key_pair(me, key_pair)

    def broken() -> list[ID]:
        raise RuntimeError("host not ready")

    store.protected = broken
    _fill(store, 100)
    assert store.pubkey(me) == key_pair.public_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_junk_bans_a_peer_once_and_disconnects_it() -> None:
    clock = Clock()
    guard = PeerGuard("me", clock=clock)
    disconnected: list[str] = []
    guard.disconnect = disconnected.append
    for _ in range(30):
        guard.report("spammer", "bid", "MALFORMED_MESSAGE", "not cbor")
    assert disconnected == ["spammer"] and guard.bans == 1
    assert guard.refuses("spammer") and not guard.refuses("honest")
    assert not guard.admit_gossip("spammer")
    clock.now += guard.scores.params.longest_ban + 1
    assert not guard.refuses("spammer")
    guard.report("me", "bid", "X", "our own")  # never scores itself
    assert not guard.refuses("me")


def test_a_forwarder_over_its_gossip_budget_is_refused_then_banned() -> None:
    clock = Clock()
    guard = PeerGuard("me", gossip_rate=10.0, gossip_burst=20.0, clock=clock)
    disconnected: list[str] = []
    guard.disconnect = disconnected.append
    admitted = [guard.admit_gossip("flooder") for _ in range(200)]
    assert admitted[:20] == [True] * 20 and not any(admitted[20:])
    assert disconnected == ["flooder"]  # 100 excess messages at 1 point each
    assert all(guard.admit_gossip("me") for _ in range(1000))  # our own publishes
    clock.now += 1.0
    assert guard.admit_gossip("other")  # budgets are per forwarder


def test_the_dial_budget_is_per_host() -> None:
    guard = PeerGuard("me", dial_limits=DialLimits(per_host=2), clock=Clock())
    addr = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1")]
    assert [guard.may_dial(f"p{i}", addr) for i in range(4)] == [True, True, False, False]
    assert guard.may_dial("q", [multiaddr.Multiaddr("/dns4/example.org/tcp/1")])
    assert host_of(multiaddr.Multiaddr("/ip6/::1/tcp/1")) == "ip6/::1"


def test_quiet_log_writes_one_line_then_one_summary_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    quiet = QuietLog(logging.getLogger("test.quiet"), window=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.quiet"):
        for i in range(5000):
            clock.now += 0.001
            quiet.dropped("job spec", "peerX", "SIGNATURE_INVALID", f"bad signature #{i}")
        quiet.dropped("job spec", "peerX", "MALFORMED_MESSAGE", "not cbor")  # a new kind
        clock.now += 10.0
        quiet.flush()
        quiet.flush()  # nothing new: no second summary
        clock.now += 10.0
        quiet.flush()  # an idle window ends the entry
        quiet.dropped("job spec", "peerX", "SIGNATURE_INVALID", "again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "dropped job spec from peerX: bad signature #0",
        "dropped job spec from peerX: bad signature #1",
        "dropped job spec from peerX: bad signature #2",
        "dropped job spec from peerX: not cbor",
        "dropped 4997 more job specs from peerX in the last 15 s "
        "(SIGNATURE_INVALID; last: bad signature #4999)",
        "dropped job spec from peerX: again",
    ]
    assert quiet.total == 5002


def test_quiet_log_folds_too_many_peers_into_others(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    quiet = QuietLog(logging.getLogger("test.quiet2"), max_keys=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.quiet2"):
        for i in range(1000):
            quiet.dropped("bid", f"peer{i}", "MALFORMED_MESSAGE", "junk")
        clock.now += 11.0
        quiet.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # 3 peers, the first of "others", one summary
    assert lines[-1].startswith("dropped 996 more bids from others in the last 11 s")
    assert lines[-1].endswith("(MALFORMED_MESSAGE; last: junk (from peer999))")


async def test_the_auto_connector_only_redials_peers_that_identified() -> None:
    host = _make_host(Identity.generate())
    store = host.get_peerstore()
    addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")
    stranger, known = _fresh_id(), _fresh_id()
    store.add_addrs(stranger, [addr], 3600)  # only named in a signed message
    store.add_addrs(known, [addr], 3600)
    store.add_protocols(known, ["/meshrun/bid/1"])  # identified once
    candidates = await host.get_network().auto_connector._get_candidate_peers()
    assert candidates == [known]

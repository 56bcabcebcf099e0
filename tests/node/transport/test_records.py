"""The signed-peer-record memo: real py-libp2p records, real signatures."""

from __future__ import annotations

from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.utils import maybe_consume_signed_record

from node.transport.records import CONSUME_TTL, MAX_REMEMBERED, SEND_TTL, RecordCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _host(seed: bytes) -> tuple[object, ID]:
    pair = create_new_key_pair(seed)
    return new_host(key_pair=pair), ID.from_pubkey(pair.public_key)


def _rpc(record: bytes) -> rpc_pb2.RPC:
    rpc = rpc_pb2.RPC()
    rpc.senderRecord = record
    return rpc


def test_a_record_is_checked_once_then_remembered_for_a_while() -> None:
    clock = Clock()
    cache = RecordCache(env_to_send_in_RPC, maybe_consume_signed_record, clock)
    sender, sender_id = _host(b"s" * 32)
    receiver, _ = _host(b"r" * 32)
    record, _ = env_to_send_in_RPC(sender)  # type: ignore[arg-type]

    assert cache.consume(_rpc(record), receiver, sender_id)  # type: ignore[arg-type]
    assert cache.consume(_rpc(record), receiver, sender_id)  # type: ignore[arg-type]
    assert cache.checked == 1
    clock.now += CONSUME_TTL
    assert cache.consume(_rpc(record), receiver, sender_id)  # type: ignore[arg-type]
    assert cache.checked == 2  # checked again: the peer store's address TTL is refreshed


def test_nothing_a_peer_sends_skips_a_check_it_would_fail() -> None:
    cache = RecordCache(env_to_send_in_RPC, maybe_consume_signed_record, Clock())
    sender, sender_id = _host(b"s" * 32)
    receiver, _ = _host(b"r" * 32)
    _, other_id = _host(b"o" * 32)
    record, _ = env_to_send_in_RPC(sender)  # type: ignore[arg-type]
    assert cache.consume(_rpc(record), receiver, sender_id)  # type: ignore[arg-type]

    # The same accepted bytes relayed by someone else: checked, and refused.
    assert not cache.consume(_rpc(record), receiver, other_id)  # type: ignore[arg-type]
    assert not cache.consume(_rpc(record), receiver, other_id)  # type: ignore[arg-type]
    # A tampered copy: checked, refused, never remembered.
    forged = bytearray(record)
    forged[-1] ^= 1
    for _ in range(2):
        assert not cache.consume(_rpc(bytes(forged)), receiver, sender_id)  # type: ignore[arg-type]
    assert cache.checked == 5
    # An RPC with no record needs nothing.
    assert cache.consume(rpc_pb2.RPC(), receiver, sender_id)  # type: ignore[arg-type]


def test_the_memory_is_bounded() -> None:
    cache = RecordCache(env_to_send_in_RPC, lambda msg, host, peer: True, Clock())
    receiver, sender_id = _host(b"r" * 32)
    for i in range(MAX_REMEMBERED + 10):
        cache.consume(_rpc(i.to_bytes(4, "big")), receiver, sender_id)  # type: ignore[arg-type]
    assert len(cache._accepted) == MAX_REMEMBERED
    cache.consume(_rpc((0).to_bytes(4, "big")), receiver, sender_id)  # type: ignore[arg-type]
    assert cache.checked == MAX_REMEMBERED + 11  # the oldest was forgotten


def test_what_we_send_is_made_once_per_ttl() -> None:
    clock = Clock()
    cache = RecordCache(env_to_send_in_RPC, maybe_consume_signed_record, clock)
    host, host_id = _host(b"h" * 32)
    first, _ = cache.env_to_send_in_rpc(host)  # type: ignore[arg-type]
    again, fresh = cache.env_to_send_in_rpc(host)  # type: ignore[arg-type]
    assert again == first and not fresh and cache.made == 1
    clock.now += SEND_TTL
    cache.env_to_send_in_rpc(host)  # type: ignore[arg-type]
    assert cache.made == 2
    # What it sends is a record another node accepts.
    receiver, _ = _host(b"r" * 32)
    assert maybe_consume_signed_record(_rpc(first), receiver, host_id)  # type: ignore[arg-type]

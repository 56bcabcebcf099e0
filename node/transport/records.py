"""Signed peer records on pubsub RPCs, made and checked once rather than per RPC.

py-libp2p 0.8 attaches the sender's signed peer record to every pubsub RPC it
sends and consumes the one on every RPC it receives. Sending rebuilds the
host's address list (multiaddr parsing) and re-serializes the cached record
each time; receiving verifies its Ed25519 signature again and clears and
re-adds the peer's addresses in the peer store, although a peer sends the same
record bytes on every RPC until its addresses change. Profiled on the 1 + 4
devstack running jobs back to back, the two took about 17 % of a bidding
compute node's CPU and 5 % of the executor's (``env_to_send_in_RPC`` and
``maybe_consume_signed_record``), once per job message per hop.

The library calls both as module-level functions from ``libp2p.pubsub``, with
no hook to override on the host or the router, so :func:`install` swaps in
memoized versions there:

- what we send is remembered per host for :data:`SEND_TTL` seconds (a change
  of listen addresses shows in the next record after at most that long);
- a record received is accepted without a second check when the same peer
  sent the very same bytes, and they were accepted, less than
  :data:`CONSUME_TTL` seconds ago. Identical bytes verify identically, so
  nothing a hostile peer sends skips a check it would fail; a new record, or
  one from another peer, is checked as before. At most :data:`MAX_REMEMBERED`
  (peer, record) pairs are kept.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID

# Rebuilding the record costs ~3 ms (py-libp2p recomputes the host's address
# list): once a second it was 8 % of a bidding node's CPU at N = 32.
SEND_TTL = 10.0
CONSUME_TTL = 60.0
MAX_REMEMBERED = 4096
_MODULES = ("libp2p.pubsub.pubsub", "libp2p.pubsub.gossipsub", "libp2p.pubsub.floodsub")


class RecordCache:
    """The memo behind :func:`install`; separate so tests can drive it with a clock."""

    def __init__(
        self,
        make: Callable[[IHost], tuple[bytes, bool]],
        consume: Callable[[Any, IHost, ID], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._consume = consume
        self._clock = clock
        self._sent: weakref.WeakKeyDictionary[IHost, tuple[float, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._accepted: OrderedDict[tuple[int, bytes, bytes], float] = OrderedDict()
        self.made = 0
        self.checked = 0

    def env_to_send_in_rpc(self, host: IHost) -> tuple[bytes, bool]:
        now = self._clock()
        hit = self._sent.get(host)
        if hit is not None and now - hit[0] < SEND_TTL:
            return hit[1], False
        envelope, fresh = self._make(host)
        self.made += 1
        self._sent[host] = (now, envelope)
        return envelope, fresh

    def consume(self, msg: Any, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (id(host), peer_id.to_bytes(), bytes(msg.senderRecord))
        now = self._clock()
        at = self._accepted.get(key)
        if at is not None and now - at < CONSUME_TTL:
            return True
        self.checked += 1
        ok = self._consume(msg, host, peer_id)
        if ok:
            self._accepted[key] = now
            self._accepted.move_to_end(key)
            while len(self._accepted) > MAX_REMEMBERED:
                self._accepted.popitem(last=False)
        return ok


_installed: RecordCache | None = None


def install() -> RecordCache:
    """Put the memoized functions where py-libp2p's pubsub looks them up (idempotent)."""
    global _installed
    if _installed is not None:
        return _installed
    import importlib

    from libp2p.peer.peerstore import env_to_send_in_RPC
    from libp2p.pubsub.utils import maybe_consume_signed_record

    cache = RecordCache(env_to_send_in_RPC, maybe_consume_signed_record)
    for name in _MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "env_to_send_in_RPC"):
            module.env_to_send_in_RPC = cache.env_to_send_in_rpc  # type: ignore[attr-defined]
        if hasattr(module, "maybe_consume_signed_record"):
            module.maybe_consume_signed_record = cache.consume  # type: ignore[attr-defined]
    _installed = cache
    return cache


__all__ = ["CONSUME_TTL", "MAX_REMEMBERED", "SEND_TTL", "RecordCache", "install"]

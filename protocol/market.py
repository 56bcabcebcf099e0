"""Bid selection and bid pacing: pure functions the requester and compute roles call."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from protocol.messages import Bid, JobSpec
from protocol.reputation import STRANGER, Standing


def bid_acceptable(spec: JobSpec, bid: Bid, now: float) -> bool:
    if now > spec.expires_at:
        return False
    return spec.max_price is None or bid.price <= spec.max_price


def effective_price(price: float, standing: Standing) -> float:
    """`price * (1.5 - score)`: what a bid costs once its bidder's past is counted.

    A stranger (0.5) pays its price exactly, so with no history the ranking is
    the plain price ranking. A proven peer (score near 1) counts at about half
    its price and a peer with a bad record at up to 1.5 times, so at equal
    price the proven peer wins, yet a stranger asking less than about half of
    a proven peer's price still wins: newcomers can always enter by price.
    """
    return price * (1.5 - min(1.0, max(0.0, standing.score)))


def rank_bids(
    bids: Sequence[Bid],
    standings: Mapping[str, Standing] | None = None,
    now: float | None = None,
) -> list[Bid]:
    """Best first: lowest effective price, then shortest ETA, then PeerID so ties are stable.

    Bids of excluded peers are dropped (with `now` None, any standing that
    carries an `excluded_until` counts as excluded). Peers absent from
    `standings` are strangers; without `standings` this is the plain ranking
    by price, ETA and PeerID.
    """
    if not standings:
        return sorted(bids, key=lambda b: (b.price, b.eta_seconds, b.provider))

    def of(bid: Bid) -> Standing:
        return standings.get(bid.provider, STRANGER)

    def excluded(standing: Standing) -> bool:
        if now is None:
            return standing.excluded_until is not None
        return standing.excluded(now)

    eligible = [b for b in bids if not excluded(of(b))]
    return sorted(
        eligible, key=lambda b: (effective_price(b.price, of(b)), b.eta_seconds, b.provider)
    )


def bid_delay(job_id: str, peer_id: str, live_peers: int, max_delay: float = 0.05) -> float:
    """How long a compute node waits before bidding, to spread a bid storm.

    Nodes closer to the job id (XOR of hashes) bid first; the spread grows with
    the live peer count instead of assuming a network of one (Bacalhau's mistake).
    With few peers the delay is near zero, so small meshes stay fast.
    """
    if live_peers <= 1:
        return 0.0
    a = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    b = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big")
    distance = (a ^ b) / 2**64
    return distance * max_delay * min(1.0, live_peers / 64)


class ExpiringSet:
    """Keys remembered until their expiry, at most `limit` of them.

    A compute node remembers which job ids it has considered and what it
    offered; every key here can be minted by a stranger (a fresh key signs a
    fresh spec), so the set is pruned by time and, past `limit`, loses the
    entries closest to expiry first instead of growing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._expiry: dict[str, float] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: str, expires_at: float, now: float) -> list[str]:
        """Remember `key`; returns the keys dropped to make room or because they expired."""
        dropped = [k for k, t in self._expiry.items() if t <= now]
        for k in dropped:
            del self._expiry[k]
        self._expiry[key] = expires_at
        excess = len(self._expiry) - self.limit
        if excess > 0:
            others = sorted((k for k in self._expiry if k != key), key=self._expiry.__getitem__)
            for k in others[:excess]:
                del self._expiry[k]
                dropped.append(k)
        return dropped

    def discard(self, key: str) -> None:
        self._expiry.pop(key, None)

"""Bid selection and bid pacing: pure functions the requester and compute roles call."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from protocol.messages import Bid, JobSpec


def bid_acceptable(spec: JobSpec, bid: Bid, now: float) -> bool:
    if now > spec.expires_at:
        return False
    return spec.max_price is None or bid.price <= spec.max_price


def rank_bids(bids: Sequence[Bid]) -> list[Bid]:
    """Best first: lowest price, then shortest ETA, then PeerID so ties are stable."""
    return sorted(bids, key=lambda b: (b.price, b.eta_seconds, b.provider))


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

"""Budgets and scores that keep hostile peers from hurting a node: pure, clock passed in.

Everything a stranger can mint for free (a fresh key, a fresh spec, a junk
frame) must cost it more than it costs us, so each structure here is bounded
in memory and O(1) per call, and every decision takes `now` from the caller:

- :class:`TokenBucket` / :class:`KeyedBuckets`: `rate` tokens a second up to
  `burst`; keyed ones remember at most `max_keys` keys (least recently charged
  forgotten first: a forgotten key is the one that had the longest to refill).
- :class:`DialBudget`: when a node may dial an address it only read in a
  signed message (a job spec's requester_addrs): one dial per peer per 30 s,
  4 per host (IP or DNS name) a minute, 20 a minute overall. A refused check
  charges nothing and remembers nothing.
- :class:`PeerScores`: a decaying penalty score per peer, in the spirit of
  gossipsub v1.1 scoring (P4 invalid messages, graylist threshold): penalties
  add up, the score halves every `half_life` seconds, and a peer whose score
  is below `threshold` is banned until it decays back above it. Crossing the
  threshold drops the score to `floor`, so a ban lasts `longest_ban` seconds
  (60 by default) after the last penalty, however much junk came before.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full."""

    rate: float
    burst: float
    tokens: float = math.nan
    stamp: float | None = None

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 0:
            raise ValueError("a token bucket needs rate >= 0 and burst >= 0")
        if math.isnan(self.tokens):
            self.tokens = self.burst

    def available(self, now: float) -> float:
        """Tokens there at `now` (a clock that went backwards refills nothing)."""
        if self.stamp is None or now <= self.stamp:
            return self.tokens
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate)

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many; False (and nothing spent) if not."""
        tokens = self.available(now)
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        if tokens + 1e-9 < cost:
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True


class KeyedBuckets(Generic[K]):
    """One :class:`TokenBucket` per key, at most `max_keys` of them.

    A key never charged has a full bucket, so asking (:meth:`allows`) about a
    stranger stores nothing: only a successful :meth:`take` makes an entry.
    Past `max_keys` the least recently charged key is forgotten; it comes back
    with a full bucket, which is why a global budget must sit behind any budget
    keyed by something a stranger can mint.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        TokenBucket(rate, burst)  # validates
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def available(self, key: K, now: float) -> float:
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else bucket.available(now)

    def allows(self, key: K, now: float, cost: float = 1.0) -> bool:
        return self.available(key, now) + 1e-9 >= cost

    def take(self, key: K, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if self.burst + 1e-9 < cost:
                return False
            bucket = TokenBucket(self.rate, self.burst)
            self._buckets[key] = bucket
        taken = bucket.take(now, cost)
        if taken:
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return taken


@dataclass(frozen=True)
class DialLimits:
    """How often a node may dial addresses it only read in a signed message."""

    peer_interval: float = 30.0  # one dial per peer per this many seconds
    per_host: int = 4  # dials per host (IP or DNS name) ...
    host_window: float = 60.0  # ... per this many seconds
    overall: int = 20  # dials in all ...
    overall_window: float = 60.0  # ... per this many seconds
    max_keys: int = 4096  # peers and hosts remembered, each

    def most_dials(self, seconds: float, hosts: int = 1) -> int:
        """The most dials these limits allow in `seconds` to peers on `hosts` hosts."""
        per_host = self.per_host + seconds * self.per_host / self.host_window
        overall = self.overall + seconds * self.overall / self.overall_window
        return math.floor(min(overall, hosts * per_host) + 1e-9)


class DialBudget:
    """May we dial `peer` at `hosts` now? Yes only if every limit agrees; then all are charged.

    A refusal charges nothing and stores nothing, so a flood of specs each
    signed by a fresh key and pointing anywhere costs a few integer compares
    each and at most `overall` dials a window.
    """

    def __init__(self, limits: DialLimits | None = None) -> None:
        self.limits = limits or DialLimits()
        lim = self.limits
        self._peers: KeyedBuckets[str] = KeyedBuckets(1.0 / lim.peer_interval, 1.0, lim.max_keys)
        self._hosts: KeyedBuckets[str] = KeyedBuckets(
            lim.per_host / lim.host_window, float(lim.per_host), lim.max_keys
        )
        self._overall = TokenBucket(lim.overall / lim.overall_window, float(lim.overall))
        self.allowed = 0
        self.refused = 0

    def allow(self, peer: str, hosts: Iterable[str], now: float) -> bool:
        distinct = sorted(set(hosts))
        ok = (
            bool(distinct)
            and self._overall.available(now) + 1e-9 >= 1.0
            and self._peers.allows(peer, now)
            and all(self._hosts.allows(h, now) for h in distinct)
        )
        if not ok:
            self.refused += 1
            return False
        self._overall.take(now)
        self._peers.take(peer, now)
        for host in distinct:
            self._hosts.take(host, now)
        self.allowed += 1
        return True


@dataclass(frozen=True)
class ScoreParams:
    """A peer is banned while its score is below `threshold` (gossipsub's graylist)."""

    threshold: float = -100.0
    half_life: float = 30.0  # seconds for a score to halve
    floor: float = -400.0  # a ban's score: it lasts log2(floor/threshold) half-lives
    max_peers: int = 4096

    def __post_init__(self) -> None:
        if not (self.floor < self.threshold < 0 and self.half_life > 0 and self.max_peers >= 1):
            raise ValueError("need floor < threshold < 0, half_life > 0 and max_peers >= 1")

    @property
    def longest_ban(self) -> float:
        """Seconds from the floor back up to the threshold, with no new penalty."""
        return self.half_life * math.log2(self.floor / self.threshold)


@dataclass
class PeerScores:
    """Decaying penalty scores; see the module docstring."""

    params: ScoreParams = field(default_factory=ScoreParams)
    _scores: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._scores)

    def score(self, peer: str, now: float) -> float:
        entry = self._scores.get(peer)
        if entry is None:
            return 0.0
        value, stamp = entry
        return value * math.pow(0.5, max(0.0, now - stamp) / self.params.half_life)

    def banned(self, peer: str, now: float) -> bool:
        return self.score(peer, now) < self.params.threshold

    def penalize(self, peer: str, amount: float, now: float) -> bool:
        """Lower `peer`'s score by `amount` (> 0); True when this penalty starts a ban.

        A ban sends the score to the floor, so it lasts `longest_ban` seconds
        after the last penalty, not the instant it takes -101 to decay to -100.
        """
        if amount <= 0:
            raise ValueError("a penalty must be > 0")
        before = self.score(peer, now)
        after = before - amount
        banned = after < self.params.threshold
        if banned:
            after = self.params.floor
        self._scores[peer] = (after, now)
        self._scores.move_to_end(peer)
        while len(self._scores) > self.params.max_peers:
            self._scores.popitem(last=False)
        return banned and before >= self.params.threshold

    def forget_settled(self, now: float, below: float = 1.0) -> int:
        """Drop scores that have decayed to almost nothing; returns how many."""
        settled = [p for p in self._scores if abs(self.score(p, now)) < below]
        for peer in settled:
            del self._scores[peer]
        return len(settled)


__all__ = [
    "DialBudget",
    "DialLimits",
    "KeyedBuckets",
    "PeerScores",
    "ScoreParams",
    "TokenBucket",
]

"""What a node knows of each peer's past, as a pure function of its counters.

A node judges only what it saw itself: no gossip of scores, since any stranger
could forge praise for its own sybils. The record keeps two things per outcome:
a plain count (what happened, shown to the owner and never forgotten) and an
evidence weight that halves every `HALF_LIFE` (what the score is made of).

Score: the mean of a Beta(1, 1) prior updated with the decayed evidence,

    score = (good + 1) / (good + bad + 2)

so a stranger sits at 0.5, every piece of evidence moves it less than the one
before, and it never reaches 0 or 1. Executors: `verified` adds 1 to good,
`completed` 0.5 (receipt checks prove who signed which bytes, not that the
bytes are right), `won` nothing; `failed`, `timed_out` and `lost` add 1 to
bad, `disputed` adds `DISPUTE_WEIGHT` and excludes the peer (`exclusion`).
Requesters: `settled` adds 1 to good, `disputed` 1 to bad, and each accepted
job not (yet) settled or disputed counts `UNSETTLED_WEIGHT` as bad.

Latency is kept as an EWMA for the owner to read but stays out of the score:
it depends on the job's size, so it cannot compare peers across jobs (bid ETA
does that per job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

HALF_LIFE = 7 * 24 * 3600.0
"""Evidence weight halves each week: a week-old dispute still weighs half, so a
cheater cannot wash it out with a day of good work, yet a month on, a peer is
judged on what it does now (hardware, owners and software change at that pace)
and an old record neither shields nor haunts it for ever."""

EXCLUDE_FOR = 24 * 3600.0
"""First exclusion after a dispute; each further dispute doubles it."""

EXCLUDE_MAX = 30 * 24 * 3600.0
"""Cap on one exclusion: past a month the key is as cheap to replace as to keep,
so longer bans protect nothing and only bloat the record."""

DISPUTE_WEIGHT = 5.0
"""Bad evidence of one outvoted result: a stranger drops to 1/7; a peer with 12
verified results drops from 0.93 to 0.68 and must earn its place back."""

UNSETTLED_WEIGHT = 0.5
"""Bad evidence of a job a requester has not (yet) settled: light, since jobs in
flight count too, but a requester that never pays sinks."""

LATENCY_ALPHA = 0.2
"""EWMA weight of the newest latency: about the last five jobs dominate."""

EXECUTOR_OUTCOMES = ("won", "completed", "verified", "disputed", "failed", "timed_out", "lost")
REQUESTER_OUTCOMES = ("accepted", "settled", "disputed")
OUTCOMES: Mapping[str, tuple[str, ...]] = {
    "executor": EXECUTOR_OUTCOMES,
    "requester": REQUESTER_OUTCOMES,
}

_GOOD: Mapping[str, Mapping[str, float]] = {
    "executor": {"verified": 1.0, "completed": 0.5},
    "requester": {"settled": 1.0},
}
_BAD: Mapping[str, Mapping[str, float]] = {
    "executor": {"failed": 1.0, "timed_out": 1.0, "lost": 1.0, "disputed": DISPUTE_WEIGHT},
    "requester": {"disputed": 1.0},
}


@dataclass(frozen=True)
class Standing:
    """A peer as the job machine sees it when its bid arrives.

    `score` in [0, 1] (0.5 for a stranger) enters bid ranking next to price and
    ETA; `excluded_until` (epoch seconds) keeps a peer caught returning wrong
    results out of every job until then; `audits_passed` counts the times its
    result agreed with another executor's, so sampling can audit strangers
    more often than proven peers.
    """

    score: float = 0.5
    excluded_until: float | None = None
    audits_passed: int = 0
    why: str = "no history"

    def excluded(self, now: float) -> bool:
        return self.excluded_until is not None and now < self.excluded_until


STRANGER = Standing()


@dataclass(frozen=True)
class PeerRecord:
    """Everything kept about one peer in one role; `record` makes the next one.

    `weights` are the decayed evidence per outcome as of `last_seen`; `counts`
    are never decayed. `latency` is the EWMA of observed latencies (seconds).
    """

    role: str = "executor"
    counts: Mapping[str, int] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    last_seen: float | None = None
    latency: float | None = None
    excluded_until: float | None = None

    @property
    def disputes(self) -> int:
        return self.counts.get("disputed", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "counts": dict(self.counts),
            "weights": dict(self.weights),
            "last_seen": self.last_seen,
            "latency": self.latency,
            "excluded_until": self.excluded_until,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerRecord:
        return cls(
            role=str(data.get("role", "executor")),
            counts={str(k): int(v) for k, v in dict(data.get("counts") or {}).items()},
            weights={str(k): float(v) for k, v in dict(data.get("weights") or {}).items()},
            last_seen=_opt_float(data.get("last_seen")),
            latency=_opt_float(data.get("latency")),
            excluded_until=_opt_float(data.get("excluded_until")),
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def decay(elapsed: float) -> float:
    """The factor evidence keeps after `elapsed` seconds (1 for none or a clock step back)."""
    return math.pow(0.5, max(0.0, elapsed) / HALF_LIFE)


def _decayed(rec: PeerRecord, now: float) -> dict[str, float]:
    factor = 1.0 if rec.last_seen is None else decay(now - rec.last_seen)
    return {k: w * factor for k, w in rec.weights.items()}


def exclusion(disputes: int) -> float:
    """How long the `disputes`-th dispute excludes a peer: EXCLUDE_FOR, doubling, capped."""
    if disputes <= 0:
        return 0.0
    return min(EXCLUDE_MAX, EXCLUDE_FOR * 2.0 ** min(disputes - 1, 32))


def record(rec: PeerRecord, outcome: str, latency: float | None, now: float) -> PeerRecord:
    """`rec` after `outcome` was seen at `now`; raises ValueError for an outcome the role lacks.

    A dispute of an executor's result excludes it from `now` for `exclusion()`
    of its dispute count, never shortening an exclusion already running.
    Requesters are never excluded: a requester disputing our result may be
    right, and refusing to bid is the compute node's own choice.
    """
    if outcome not in OUTCOMES.get(rec.role, ()):
        raise ValueError(f"{outcome!r} is not an outcome of a {rec.role}")
    weights = _decayed(rec, now)
    weights[outcome] = weights.get(outcome, 0.0) + 1.0
    counts = {**rec.counts, outcome: rec.counts.get(outcome, 0) + 1}
    ewma = rec.latency
    if latency is not None and math.isfinite(latency) and latency >= 0:
        ewma = latency if ewma is None else ewma + LATENCY_ALPHA * (latency - ewma)
    excluded_until = rec.excluded_until
    if outcome == "disputed" and rec.role == "executor":
        until = now + exclusion(counts["disputed"])
        excluded_until = until if excluded_until is None else max(excluded_until, until)
    last_seen = now if rec.last_seen is None else max(rec.last_seen, now)
    return replace(
        rec,
        counts=counts,
        weights=weights,
        last_seen=last_seen,
        latency=ewma,
        excluded_until=excluded_until,
    )


def evidence(rec: PeerRecord, now: float) -> tuple[float, float]:
    """(good, bad) evidence weights decayed to `now`."""
    weights = _decayed(rec, now)
    good = sum(weights.get(o, 0.0) * w for o, w in _GOOD.get(rec.role, {}).items())
    bad = sum(weights.get(o, 0.0) * w for o, w in _BAD.get(rec.role, {}).items())
    if rec.role == "requester":
        open_jobs = weights.get("accepted", 0.0) - weights.get("settled", 0.0)
        bad += UNSETTLED_WEIGHT * max(0.0, open_jobs - weights.get("disputed", 0.0))
    return good, bad


def score(rec: PeerRecord, now: float) -> float:
    good, bad = evidence(rec, now)
    return (good + 1.0) / (good + bad + 2.0)


def standing(rec: PeerRecord, now: float) -> Standing:
    """How `rec`'s peer stands at `now`: score, exclusion, audits passed, and why."""
    if not rec.counts:
        return STRANGER
    excluded = rec.excluded_until is not None and now < rec.excluded_until
    return Standing(
        score=score(rec, now),
        excluded_until=rec.excluded_until if excluded else None,
        audits_passed=rec.counts.get("verified", 0),
        why=why(rec, now),
    )


def _clock(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f}"


def why(rec: PeerRecord, now: float) -> str:
    """A short line for the owner: the exclusion if one runs, then the counts that matter."""
    shown = [o for o in OUTCOMES.get(rec.role, ()) if rec.counts.get(o, 0) and o != "won"]
    tally = ", ".join(f"{rec.counts[o]} {o.replace('_', ' ')}" for o in shown) or "no results yet"
    if rec.role == "requester":
        unsettled = rec.counts.get("accepted", 0) - rec.counts.get("settled", 0)
        unsettled -= rec.counts.get("disputed", 0)
        if unsettled > 0:
            tally += f" ({unsettled} not settled)"
    if rec.excluded_until is not None and now < rec.excluded_until:
        when = _clock(rec.excluded_until)
        outvoted = rec.disputes
        results = "result" if outvoted == 1 else "results"
        return f"excluded until {when}: {outvoted} {results} outvoted; {tally}"
    return tally

"""Peer scoring (protocol.reputation): pure, bounded, decaying, and a dispute excludes."""

from __future__ import annotations

import math
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.reputation import (
    DISPUTE_WEIGHT,
    EXCLUDE_FOR,
    EXCLUDE_MAX,
    EXECUTOR_OUTCOMES,
    HALF_LIFE,
    REQUESTER_OUTCOMES,
    STRANGER,
    PeerRecord,
    exclusion,
    record,
    score,
    standing,
)

T0 = 1_700_000_000.0
DAY = 24 * 3600.0


def seen(outcomes: list[str], role: str = "executor", start: float = T0) -> PeerRecord:
    return reduce(
        lambda rec, step: record(rec, step[1], None, start + step[0]),
        enumerate(outcomes),
        PeerRecord(role=role),
    )


def test_a_stranger_stands_at_one_half_with_no_history() -> None:
    assert standing(PeerRecord(), T0) == STRANGER
    assert STRANGER.score == 0.5 and not STRANGER.excluded(T0) and STRANGER.why == "no history"
    assert score(PeerRecord(), T0) == 0.5


def test_record_is_pure_and_counts() -> None:
    empty = PeerRecord()
    once = record(empty, "verified", 2.0, T0)
    assert empty == PeerRecord() and once is not empty
    assert once.counts == {"verified": 1} and once.last_seen == T0 and once.latency == 2.0
    twice = record(once, "verified", 4.0, T0 + 1)
    assert twice.counts == {"verified": 2}
    assert twice.latency == pytest.approx(2.0 + 0.2 * (4.0 - 2.0))
    assert record(twice, "won", None, T0 + 2).latency == twice.latency


def test_verified_raises_and_failures_lower() -> None:
    assert standing(seen(["verified"]), T0).score > 0.5
    assert standing(seen(["completed"]), T0).score > 0.5
    assert standing(seen(["verified"]), T0).score > standing(seen(["completed"]), T0).score
    assert standing(seen(["won"]), T0).score == 0.5
    for bad in ("failed", "timed_out", "lost"):
        assert standing(seen([bad]), T0).score < 0.5, bad
    proven = seen(["verified"] * 12 + ["lost"])
    held = standing(proven, T0 + 20)
    assert held.audits_passed == 12 and held.why == "12 verified, 1 lost"
    assert held.score == pytest.approx(13 / 15, rel=1e-4)


def test_a_dispute_lowers_a_lot_and_excludes() -> None:
    proven = seen(["verified"] * 12)
    before = standing(proven, T0 + 20).score
    caught = record(proven, "disputed", None, T0 + 20)
    held = standing(caught, T0 + 20)
    assert held.score < before - 0.2
    assert held.score == pytest.approx(13 / (12 + DISPUTE_WEIGHT + 2), rel=1e-4)
    assert held.excluded(T0 + 21) and held.excluded_until == T0 + 20 + EXCLUDE_FOR
    assert held.why.startswith("excluded until 2023-11-15 22:13 UTC: 1 result outvoted;")
    assert "12 verified, 1 disputed" in held.why
    after = standing(caught, T0 + 20 + EXCLUDE_FOR)
    assert not after.excluded(T0 + 20 + EXCLUDE_FOR) and after.excluded_until is None
    assert after.why == "12 verified, 1 disputed"
    assert standing(seen(["disputed"]), T0).score == pytest.approx(1 / (DISPUTE_WEIGHT + 2))


def test_repeat_offenders_are_excluded_longer_up_to_a_cap() -> None:
    assert [exclusion(n) / DAY for n in range(6)] == [0, 1, 2, 4, 8, 16]
    assert exclusion(6) == EXCLUDE_MAX == exclusion(10_000)
    rec = PeerRecord()
    for n in range(1, 8):
        now = T0 + n * 60 * DAY  # every exclusion has ended before the next dispute
        rec = record(rec, "disputed", None, now)
        assert rec.excluded_until == now + min(EXCLUDE_MAX, EXCLUDE_FOR * 2 ** (n - 1))


def test_a_dispute_never_shortens_a_running_exclusion() -> None:
    rec = seen(["disputed"] * 5)  # the fifth excludes for 16 days
    assert rec.excluded_until == T0 + 4 + 16 * DAY
    stepped_back = record(rec, "disputed", None, T0 - 20 * DAY)  # the clock jumped back
    assert stepped_back.excluded_until == rec.excluded_until
    assert stepped_back.last_seen == rec.last_seen


def test_old_evidence_decays_with_the_half_life() -> None:
    rec = seen(["verified"] * 4)
    good_now = standing(rec, T0 + 3).score
    assert good_now == pytest.approx(5 / 6)
    a_week = standing(rec, T0 + 3 + HALF_LIFE).score
    assert a_week == pytest.approx(3 / 4)  # 4 verified weigh 2 a week later
    assert standing(rec, T0 + 3 + 50 * HALF_LIFE).score == pytest.approx(0.5)
    later = record(rec, "lost", None, T0 + 3 + HALF_LIFE)
    assert standing(later, T0 + 3 + HALF_LIFE).score == pytest.approx(3 / 5)
    assert later.counts == {"verified": 4, "lost": 1}  # counts are never decayed
    assert standing(rec, T0 - DAY).score == good_now  # a clock step back adds no weight


def test_requesters_are_judged_by_settling() -> None:
    paying = seen(["accepted", "settled"] * 3, role="requester")
    assert standing(paying, T0 + 6).score == pytest.approx(4 / 5)
    assert standing(paying, T0 + 6).why == "3 accepted, 3 settled"
    in_flight = seen(["accepted"], role="requester")
    assert standing(in_flight, T0).score == pytest.approx(1 / 2.5)
    deadbeat = seen(["accepted"] * 6 + ["settled"], role="requester")
    held = standing(deadbeat, T0 + 7)
    assert held.score < 0.4 and held.why == "6 accepted, 1 settled (5 not settled)"
    disputer = seen(["accepted", "disputed"], role="requester")
    held = standing(disputer, T0 + 2)
    assert held.score == pytest.approx(1 / 3) and not held.excluded(T0 + 2)
    assert held.why == "1 accepted, 1 disputed"


def test_outcomes_belong_to_a_role() -> None:
    with pytest.raises(ValueError, match="not an outcome of a executor"):
        record(PeerRecord(), "settled", None, T0)
    with pytest.raises(ValueError, match="requester"):
        record(PeerRecord(role="requester"), "verified", None, T0)
    with pytest.raises(ValueError):
        record(PeerRecord(role="auditor"), "won", None, T0)


def test_records_round_trip_through_json_dicts() -> None:
    rec = record(seen(["verified", "disputed"]), "lost", 1.5, T0 + 9)
    assert PeerRecord.from_dict(rec.to_dict()) == rec
    assert PeerRecord.from_dict({}) == PeerRecord()


def test_bad_latencies_are_ignored() -> None:
    for bad in (math.nan, math.inf, -1.0):
        assert record(PeerRecord(), "completed", bad, T0).latency is None


# ---- properties -----------------------------------------------------------------------------

ROLES = {"executor": EXECUTOR_OUTCOMES, "requester": REQUESTER_OUTCOMES}


@st.composite
def histories(draw: st.DrawFn) -> tuple[str, list[tuple[str, float, float | None]]]:
    role = draw(st.sampled_from(sorted(ROLES)))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(ROLES[role]),
                st.floats(0, 30 * DAY),
                st.none() | st.floats(0, 1e4),
            ),
            max_size=40,
        )
    )
    return role, steps


def replay(role: str, steps: list[tuple[str, float, float | None]]) -> tuple[PeerRecord, float]:
    rec, now = PeerRecord(role=role), T0
    for outcome, gap, latency in steps:
        now += gap
        rec = record(rec, outcome, latency, now)
    return rec, now


@given(histories(), st.floats(0, 400 * DAY))
def test_score_stays_in_the_unit_interval(
    history: tuple[str, list[tuple[str, float, float | None]]], later: float
) -> None:
    rec, now = replay(*history)
    held = standing(rec, now + later)
    assert 0.0 < held.score < 1.0
    assert held.audits_passed == rec.counts.get("verified", 0)
    assert sum(rec.counts.values()) == len(history[1])
    assert held.why


@given(histories(), st.floats(0, 400 * DAY))
def test_only_executor_disputes_exclude_and_never_past_the_cap(
    history: tuple[str, list[tuple[str, float, float | None]]], later: float
) -> None:
    role, steps = history
    rec, now = replay(role, steps)
    held = standing(rec, now + later)
    if role == "requester" or rec.disputes == 0:
        assert rec.excluded_until is None and held.excluded_until is None
    else:
        assert rec.excluded_until is not None and rec.excluded_until <= now + EXCLUDE_MAX
        assert held.excluded(now + later) == (now + later < rec.excluded_until)
        assert held.why.startswith("excluded") == held.excluded(now + later)


@given(histories(), st.sampled_from(["verified", "completed"]), st.floats(0, 30 * DAY))
def test_good_news_never_lowers_an_executors_score(
    history: tuple[str, list[tuple[str, float, float | None]]], good: str, gap: float
) -> None:
    _, steps = history
    rec, now = replay("executor", [s for s in steps if s[0] in EXECUTOR_OUTCOMES])
    assert score(record(rec, good, None, now + gap), now + gap) >= score(rec, now + gap)


@given(histories(), st.sampled_from(["failed", "timed_out", "lost", "disputed"]))
def test_bad_news_never_raises_an_executors_score(
    history: tuple[str, list[tuple[str, float, float | None]]], bad: str
) -> None:
    _, steps = history
    rec, now = replay("executor", [s for s in steps if s[0] in EXECUTOR_OUTCOMES])
    assert score(record(rec, bad, None, now), now) < score(rec, now)

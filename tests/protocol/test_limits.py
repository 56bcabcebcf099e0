"""Budgets and scores against hostile peers (protocol/limits.py): pure, clock passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.limits import (
    DialBudget,
    DialLimits,
    KeyedBuckets,
    PeerScores,
    ScoreParams,
    TokenBucket,
)

# ---- token buckets ---------------------------------------------------------------


def test_bucket_starts_full_spends_and_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 token
    assert bucket.take(0.5)  # 1.0 token
    assert bucket.available(100.0) == 3.0  # never more than the burst


def test_a_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert not bucket.take(0.0, cost=3.0)
    assert bucket.available(0.0) == 2.0


def test_a_clock_going_backwards_refills_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_bad_bucket_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=-1.0, burst=1.0)
    with pytest.raises(ValueError):
        KeyedBuckets(1.0, 1.0, max_keys=0)


@settings(max_examples=200)
@given(
    rate=st.floats(0.0, 50.0),
    burst=st.integers(0, 20),
    gaps=st.lists(st.floats(0.0, 5.0), max_size=200),
)
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=float(burst))
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        granted += bucket.take(now)
    assert granted <= burst + rate * now + 1e-6
    assert 0.0 <= bucket.available(now) <= burst


def test_asking_about_a_stranger_stores_nothing() -> None:
    buckets: KeyedBuckets[str] = KeyedBuckets(rate=1.0, burst=1.0)
    for i in range(10_000):
        assert buckets.allows(f"stranger-{i}", 0.0)
    assert len(buckets) == 0


@settings(max_examples=100)
@given(keys=st.lists(st.integers(0, 50), max_size=300), max_keys=st.integers(1, 10))
def test_keyed_buckets_stay_bounded(keys: list[int], max_keys: int) -> None:
    buckets: KeyedBuckets[int] = KeyedBuckets(rate=0.1, burst=2.0, max_keys=max_keys)
    for step, key in enumerate(keys):
        buckets.take(key, float(step))
        assert len(buckets) <= max_keys


def test_the_least_recently_charged_key_is_forgotten_first() -> None:
    buckets: KeyedBuckets[str] = KeyedBuckets(rate=0.0, burst=1.0, max_keys=2)
    assert buckets.take("a", 0.0) and buckets.take("b", 1.0)
    assert not buckets.take("a", 2.0)  # spent, and rate 0 never refills it
    assert buckets.take("c", 3.0)  # evicts "a" (charged least recently)
    assert buckets.take("a", 4.0)  # a forgotten key comes back full
    assert not buckets.take("c", 5.0)


# ---- the dial budget -------------------------------------------------------------


def test_one_dial_per_peer_per_interval() -> None:
    budget = DialBudget(DialLimits(peer_interval=30.0, per_host=100, overall=100))
    assert budget.allow("peerA", ["ip4/10.0.0.1"], 0.0)
    assert not budget.allow("peerA", ["ip4/10.0.0.1"], 29.0)
    assert budget.allow("peerA", ["ip4/10.0.0.1"], 30.0)


def test_per_host_and_overall_limits() -> None:
    budget = DialBudget(DialLimits(per_host=4, host_window=60.0, overall=20, overall_window=60.0))
    same_host = [budget.allow(f"peer{i}", ["ip4/127.0.0.1"], 0.0) for i in range(10)]
    assert same_host == [True] * 4 + [False] * 6
    many_hosts = [budget.allow(f"p{i}", [f"ip4/10.0.0.{i}"], 0.0) for i in range(30)]
    assert sum(many_hosts) == 16  # 20 overall, 4 already spent on 127.0.0.1
    assert budget.allowed == 20 and budget.refused == 6 + 14
    assert budget.allow("late", ["ip4/10.9.9.9"], 3.0)  # 20 a minute: one more every 3 s


def test_a_dial_needs_every_host_it_names_to_have_budget() -> None:
    budget = DialBudget(DialLimits(per_host=1, overall=100))
    assert budget.allow("a", ["ip4/10.0.0.1"], 0.0)
    assert not budget.allow("b", ["ip4/10.0.0.1", "ip4/10.0.0.2"], 0.0)
    assert budget.allow("c", ["ip4/10.0.0.2"], 0.0)  # the refusal charged nothing
    assert not budget.allow("d", [], 0.0)  # nowhere to dial


def test_refusals_remember_nothing() -> None:
    budget = DialBudget(DialLimits(overall=1))
    assert budget.allow("first", ["ip4/1.1.1.1"], 0.0)
    for i in range(5000):
        assert not budget.allow(f"fresh-key-{i}", [f"ip4/10.{i % 250}.0.1"], 0.0)
    assert len(budget._peers) == 1 and len(budget._hosts) == 1


@settings(max_examples=100)
@given(
    dials=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3), st.floats(0.0, 3.0)), max_size=300
    )
)
def test_dials_stay_within_the_stated_bound(dials: list[tuple[int, int, float]]) -> None:
    limits = DialLimits()
    budget = DialBudget(limits)
    now = 0.0
    per_host: dict[int, int] = {}
    last_dial: dict[int, float] = {}
    for peer, host, gap in dials:
        now += gap
        if budget.allow(f"peer{peer}", [f"ip4/10.0.0.{host}"], now):
            per_host[host] = per_host.get(host, 0) + 1
            assert now - last_dial.get(peer, -math.inf) >= limits.peer_interval - 1e-6
            last_dial[peer] = now
    assert budget.allowed <= limits.most_dials(now, hosts=4)
    for count in per_host.values():
        assert count <= limits.most_dials(now, hosts=1)


# ---- peer scores -----------------------------------------------------------------


def test_penalties_past_the_threshold_ban_a_peer_once() -> None:
    scores = PeerScores(ScoreParams(threshold=-100.0, half_life=30.0, floor=-400.0))
    starts = [scores.penalize("spammer", 10.0, 0.0) for _ in range(15)]
    assert starts.count(True) == 1 and starts.index(True) == 10  # the 11th: -110 < -100
    assert scores.banned("spammer", 0.0)
    assert scores.score("spammer", 0.0) == -400.0
    assert not scores.banned("bystander", 0.0)


def test_a_ban_lasts_longest_ban_then_the_score_decays_back() -> None:
    params = ScoreParams(threshold=-100.0, half_life=30.0, floor=-400.0)
    assert params.longest_ban == pytest.approx(60.0)
    scores = PeerScores(params)
    for _ in range(11):
        scores.penalize("p", 10.0, 0.0)
    assert scores.banned("p", 59.0)
    assert not scores.banned("p", 61.0)
    assert scores.score("p", 300.0) == pytest.approx(-400.0 / 2**10)
    # One more offence right after the ban: the memory of the last one bans again.
    assert scores.penalize("p", 10.0, 61.0)


def test_a_slow_trickle_of_mistakes_never_bans() -> None:
    scores = PeerScores(ScoreParams(threshold=-100.0, half_life=30.0))
    for second in range(0, 3600, 10):  # one rejected message every 10 s, for an hour
        assert not scores.penalize("honest", 10.0, float(second))
    assert not scores.banned("honest", 3600.0)


def test_settled_scores_are_forgotten_and_the_table_is_bounded() -> None:
    scores = PeerScores(ScoreParams(max_peers=3))
    for i in range(10):
        scores.penalize(f"p{i}", 5.0, 0.0)
    assert len(scores) == 3
    assert scores.forget_settled(1000.0) == 3
    assert len(scores) == 0


def test_bad_score_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        ScoreParams(threshold=-100.0, floor=-100.0)
    with pytest.raises(ValueError):
        ScoreParams(threshold=10.0)
    with pytest.raises(ValueError):
        PeerScores().penalize("p", 0.0, 0.0)


@settings(max_examples=200)
@given(
    events=st.lists(st.tuples(st.floats(0.1, 50.0), st.floats(0.0, 20.0)), max_size=100),
)
def test_scores_stay_between_floor_and_zero(events: list[tuple[float, float]]) -> None:
    params = ScoreParams()
    scores = PeerScores(params)
    now = 0.0
    for amount, gap in events:
        now += gap
        scores.penalize("p", amount, now)
        assert params.floor <= scores.score("p", now) <= 0.0
        # Banned right after a penalty exactly when the score is below the threshold.
        assert scores.banned("p", now) == (scores.score("p", now) < params.threshold)

"""Bid selection and pacing (protocol.market): pure, ordered, deterministic."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.keys import Identity
from protocol.market import bid_acceptable, bid_delay, effective_price, rank_bids
from protocol.messages import Bid, JobSpec
from protocol.reputation import STRANGER, Standing
from tests.protocol.test_messages import ALICE, JOB_ID, sample_fields

SPEC_FIELDS = sample_fields("jobspec", ALICE.peer_id)
EXPIRES = SPEC_FIELDS["expires_at"]
PEERS = sorted(Identity(bytes([i]) * 32).peer_id for i in range(6))
peer_ids = st.sampled_from(PEERS)
money = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
bids = st.builds(
    lambda provider, price, eta: Bid(
        job_id=JOB_ID,
        provider=provider,
        price=price,
        eta_seconds=eta,
        execution_providers=["CPUExecutionProvider"],
        device="cpu",
        created_at=1.0,
    ),
    peer_ids,
    st.sampled_from([0.0, 0.5, 1.0]) | money,
    st.sampled_from([0.0, 1.0, 2.0]) | money,
)


def spec(max_price: float | None) -> JobSpec:
    return JobSpec.model_validate({**SPEC_FIELDS, "max_price": max_price})


def bid(price: float, eta: float = 1.0, provider: str = ALICE.peer_id) -> Bid:
    return Bid.model_validate(
        {**sample_fields("bid", provider), "price": price, "eta_seconds": eta}
    )


# ---- rank_bids ------------------------------------------------------------------------------


@given(st.lists(bids, max_size=12))
def test_rank_bids_is_a_sorted_permutation(offers: list[Bid]) -> None:
    ranked = rank_bids(offers)
    assert Counter(map(id, ranked)) == Counter(map(id, offers))
    for a, b in itertools.pairwise(ranked):
        assert (a.price, a.eta_seconds, a.provider) <= (b.price, b.eta_seconds, b.provider)
        if a.price < b.price:
            continue
        assert a.price == b.price
        if a.eta_seconds < b.eta_seconds:
            continue
        assert a.eta_seconds == b.eta_seconds and a.provider <= b.provider


@given(st.lists(bids, max_size=12), st.randoms())
def test_rank_bids_ignores_arrival_order(offers: list[Bid], rnd: object) -> None:
    shuffled = list(offers)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    key = [(b.price, b.eta_seconds, b.provider) for b in rank_bids(offers)]
    assert key == [(b.price, b.eta_seconds, b.provider) for b in rank_bids(shuffled)]


def test_rank_bids_examples() -> None:
    p1, p2 = sorted([ALICE.peer_id, sample_fields("accept", ALICE.peer_id)["provider"]])
    cheap_slow = bid(0.1, 9.0, p2)
    cheap_fast = bid(0.1, 1.0, p2)
    cheap_fast_low_id = bid(0.1, 1.0, p1)
    dear_fast = bid(5.0, 0.0, p1)
    offers = [dear_fast, cheap_slow, cheap_fast, cheap_fast_low_id]
    assert rank_bids(offers) == [cheap_fast_low_id, cheap_fast, cheap_slow, dear_fast]
    assert rank_bids([]) == []
    assert offers == [dear_fast, cheap_slow, cheap_fast, cheap_fast_low_id]  # input untouched


# ---- rank_bids with standings ---------------------------------------------------------------

NOW = 1_700_000_000.0
standings_of = st.dictionaries(
    peer_ids,
    st.builds(
        Standing,
        score=st.floats(0, 1),
        excluded_until=st.none() | st.sampled_from([NOW - 1, NOW, NOW + 1, NOW + 86400]),
    ),
)


def _old_key(b: Bid) -> tuple[float, float, str]:
    return (b.price, b.eta_seconds, b.provider)


@given(st.lists(bids, max_size=12), standings_of)
def test_excluded_peers_are_never_ranked(offers: list[Bid], standings: dict[str, Standing]) -> None:
    ranked = rank_bids(offers, standings, NOW)
    banned = {p for p, s in standings.items() if s.excluded(NOW)}
    assert Counter(map(id, ranked)) == Counter(id(b) for b in offers if b.provider not in banned)


@given(st.lists(bids, max_size=12), st.sets(peer_ids), st.none() | st.just(NOW))
def test_with_all_strangers_the_order_is_the_old_order(
    offers: list[Bid], known: set[str], now: float | None
) -> None:
    strangers = {p: STRANGER for p in known}
    expected = [_old_key(b) for b in rank_bids(offers)]
    assert [_old_key(b) for b in rank_bids(offers, strangers, now)] == expected
    assert [_old_key(b) for b in rank_bids(offers, {}, now)] == expected
    assert [_old_key(b) for b in rank_bids(offers, None, now)] == expected


@given(st.lists(bids, max_size=12), standings_of, st.randoms())
def test_ranking_with_standings_is_sorted_and_ignores_arrival_order(
    offers: list[Bid], standings: dict[str, Standing], rnd: object
) -> None:
    ranked = rank_bids(offers, standings, NOW)
    key = [
        (effective_price(b.price, standings.get(b.provider, STRANGER)), b.eta_seconds, b.provider)
        for b in ranked
    ]
    assert key == sorted(key)
    shuffled = list(offers)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert [_old_key(b) for b in rank_bids(shuffled, standings, NOW)] == list(map(_old_key, ranked))


def test_a_proven_peer_beats_a_stranger_at_equal_price_but_not_a_much_cheaper_one() -> None:
    stranger, proven = PEERS[0], PEERS[1]  # the stranger wins PeerID ties
    standings = {proven: Standing(score=0.9, audits_passed=12)}
    same = [bid(1.0, 1.0, stranger), bid(1.0, 1.0, proven)]
    assert [b.provider for b in rank_bids(same, standings, NOW)] == [proven, stranger]
    assert [b.provider for b in rank_bids(same)] == [stranger, proven]
    cheaper = [bid(1.0, 1.0, proven), bid(0.7, 1.0, stranger)]
    assert [b.provider for b in rank_bids(cheaper, standings, NOW)] == [proven, stranger]
    much_cheaper = [bid(1.0, 1.0, proven), bid(0.5, 1.0, stranger)]
    assert [b.provider for b in rank_bids(much_cheaper, standings, NOW)] == [stranger, proven]
    bad = {stranger: Standing(score=0.2)}
    assert [b.provider for b in rank_bids(same[::-1], bad, NOW)] == [proven, stranger]


def test_exclusion_ends_on_time_and_unknown_now_keeps_it() -> None:
    caught = PEERS[0]
    offers = [bid(0.1, 1.0, caught), bid(1.0, 1.0, PEERS[1])]
    standings = {caught: Standing(score=0.1, excluded_until=NOW + 60)}
    assert [b.provider for b in rank_bids(offers, standings, NOW)] == [PEERS[1]]
    assert [b.provider for b in rank_bids(offers, standings, None)] == [PEERS[1]]
    assert [b.provider for b in rank_bids(offers, standings, NOW + 60)] == [caught, PEERS[1]]


def test_effective_price_formula() -> None:
    assert effective_price(2.0, STRANGER) == 2.0
    assert effective_price(2.0, Standing(score=1.0)) == 1.0
    assert effective_price(2.0, Standing(score=0.0)) == 3.0
    assert effective_price(2.0, Standing(score=7.0)) == 1.0  # clamped to [0, 1]


# ---- bid_acceptable -------------------------------------------------------------------------


@given(money, money)
def test_bid_acceptable_respects_max_price(max_price: float, price: float) -> None:
    assert bid_acceptable(spec(max_price), bid(price), now=EXPIRES - 1) == (price <= max_price)


@given(money)
def test_no_max_price_accepts_any_price(price: float) -> None:
    assert bid_acceptable(spec(None), bid(price), now=EXPIRES - 1)


def test_price_equal_to_max_is_acceptable() -> None:
    assert bid_acceptable(spec(1.5), bid(1.5), now=0.0)
    assert not bid_acceptable(spec(1.5), bid(1.5000001), now=0.0)
    assert bid_acceptable(spec(0.0), bid(0.0), now=0.0)


@given(st.floats(min_value=-1e10, max_value=1e10))
def test_expired_spec_accepts_nothing(offset: float) -> None:
    now = EXPIRES + offset
    assert bid_acceptable(spec(None), bid(0.0), now) == (now <= EXPIRES)


# ---- bid_delay ------------------------------------------------------------------------------

job_ids = st.text(min_size=1, max_size=80)


@given(job_ids, peer_ids, st.integers(-5, 10_000), st.floats(min_value=0, max_value=10))
def test_bid_delay_in_range_and_deterministic(
    job_id: str, peer: str, live: int, max_delay: float
) -> None:
    delay = bid_delay(job_id, peer, live, max_delay)
    assert 0.0 <= delay <= max_delay
    assert delay == bid_delay(job_id, peer, live, max_delay)
    if live <= 1:
        assert delay == 0.0


@given(job_ids, peer_ids)
def test_bid_delay_default_bound(job_id: str, peer: str) -> None:
    assert 0.0 <= bid_delay(job_id, peer, 1000) <= 0.05


@given(job_ids, peer_ids, st.integers(2, 200), st.integers(2, 200))
def test_bid_delay_grows_with_the_mesh(job_id: str, peer: str, small: int, big: int) -> None:
    small, big = min(small, big), max(small, big)
    assert bid_delay(job_id, peer, small) <= bid_delay(job_id, peer, big)


@pytest.mark.parametrize("live", [-1, 0, 1])
def test_bid_delay_zero_for_lonely_nodes(live: int) -> None:
    assert bid_delay(JOB_ID, ALICE.peer_id, live, max_delay=10.0) == 0.0


def test_bid_delay_spreads_peers() -> None:
    delays = {bid_delay(JOB_ID, f"peer-{i}", 64, 1.0) for i in range(50)}
    assert len(delays) == 50  # distinct peers get distinct slots
    assert min(delays) < 0.25 and max(delays) > 0.75


# ---- ExpiringSet ----------------------------------------------------------------------------


def test_expiring_set_forgets_by_time_and_by_size() -> None:
    from protocol.market import ExpiringSet

    seen = ExpiringSet(limit=3)
    assert seen.add("a", 10.0, 0.0) == []
    seen.add("b", 20.0, 0.0)
    seen.add("c", 30.0, 0.0)
    assert seen.add("d", 40.0, 1.0) == ["a"]  # over the limit: the soonest to expire goes
    assert "a" not in seen and "d" in seen and len(seen) == 3
    assert seen.add("e", 50.0, 25.0) == ["b"]  # "b" expired
    seen.discard("c")
    seen.discard("zzz")
    assert len(seen) == 2


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 100)), max_size=200))
def test_expiring_set_never_exceeds_its_limit(adds: list[tuple[int, float]]) -> None:
    from protocol.market import ExpiringSet

    seen = ExpiringSet(limit=8)
    for now, (key, expiry) in enumerate(adds):
        seen.add(str(key), now + expiry + 1, float(now))
        assert len(seen) <= 8 and str(key) in seen

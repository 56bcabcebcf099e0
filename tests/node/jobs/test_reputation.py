"""Durable peer records: observations survive reopening, and the table stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.jobs.reputation import Reputation
from node.jobs.store import JobDB
from protocol.reputation import EXCLUDE_FOR, STRANGER, PeerRecord, record, standing

T0 = 1_700_000_000.0
CHEAT, GOOD, PAYER = "12D3KooWcheat", "12D3KooWgood", "12D3KooWpayer"


def test_observations_survive_a_restart(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "jobs.sqlite")
    rep = Reputation(db)
    for i, outcome in enumerate(["won", "completed", "verified", "won", "completed", "lost"]):
        rep.observe(GOOD, outcome, latency=2.0 + i, now=T0 + i)
    rep.observe(CHEAT, "won", now=T0 + 10)
    rep.observe(CHEAT, "disputed", now=T0 + 11)
    rep.observe(PAYER, "accepted", role="requester", now=T0 + 12)
    before = rep.standing(GOOD, T0 + 20)
    db.close()

    db = JobDB(tmp_path / "jobs.sqlite")
    rep = Reputation(db)
    assert rep.standing(GOOD, T0 + 20) == before
    assert before.audits_passed == 1 and before.why == "2 completed, 1 verified, 1 lost"
    caught = rep.standing(CHEAT, T0 + 20)
    assert caught.excluded(T0 + 20) and caught.excluded_until == T0 + 11 + EXCLUDE_FOR
    assert not rep.standing(CHEAT, T0 + 11 + EXCLUDE_FOR).excluded(T0 + 11 + EXCLUDE_FOR)
    assert rep.standing(PAYER, T0 + 20) == STRANGER  # known as a requester only
    assert rep.standing(PAYER, T0 + 20, role="requester").why == "1 accepted (1 not settled)"
    assert rep.standing("12D3KooWnobody") == STRANGER
    assert rep.standings([GOOD, "12D3KooWnobody"], T0 + 20) == {
        GOOD: before,
        "12D3KooWnobody": STRANGER,
    }
    db.close()


def test_the_store_applies_the_pure_record(tmp_path: Path) -> None:
    rep = Reputation(JobDB(tmp_path / "jobs.sqlite"))
    expected = PeerRecord()
    for i, outcome in enumerate(["won", "completed", "verified", "timed_out"]):
        rep.observe(GOOD, outcome, latency=1.5, now=T0 + i * 3600)
        expected = record(expected, outcome, 1.5, T0 + i * 3600)
    assert rep.record(GOOD) == expected
    assert rep.standing(GOOD, T0 + 86400) == standing(expected, T0 + 86400)


def test_peers_lists_what_the_rpc_shows(tmp_path: Path) -> None:
    rep = Reputation(JobDB(tmp_path / "jobs.sqlite"))
    rep.observe(GOOD, "verified", latency=3.0, now=T0)
    rep.observe(CHEAT, "disputed", now=T0 + 1)
    rep.observe(PAYER, "accepted", role="requester", now=T0 + 2)
    rep.observe(PAYER, "settled", role="requester", now=T0 + 3)
    listed = rep.peers(T0 + 4)
    assert [(p["peer"], p["role"]) for p in listed] == [
        (PAYER, "requester"),
        (CHEAT, "executor"),
        (GOOD, "executor"),
    ]
    payer, cheat, good = listed
    assert payer["counts"] == {"accepted": 1, "settled": 1, "disputed": 0}
    assert payer["excluded_until"] is None and payer["score"] == pytest.approx(2 / 3, abs=1e-3)
    assert cheat["excluded_until"] == T0 + 1 + EXCLUDE_FOR
    assert cheat["why"].startswith("excluded until ")
    assert good == {
        "peer": GOOD,
        "role": "executor",
        "score": pytest.approx(2 / 3, abs=1e-3),
        "why": "1 verified",
        "excluded_until": None,
        "audits_passed": 1,
        "counts": {
            "won": 0,
            "completed": 0,
            "verified": 1,
            "disputed": 0,
            "failed": 0,
            "timed_out": 0,
            "lost": 0,
        },
        "latency": 3.0,
        "last_seen": T0,
    }
    assert [p["peer"] for p in rep.peers(T0 + 4, role="executor", limit=1)] == [CHEAT]
    assert rep.peers(T0 + 4, limit=0) == []
    assert (rep.count(), rep.count("executor"), rep.count("requester")) == (3, 2, 1)


def sybil(i: int) -> str:
    return f"12D3KooWsybil{i:04d}"


def test_a_stranger_army_cannot_grow_the_table(tmp_path: Path) -> None:
    rep = Reputation(JobDB(tmp_path / "jobs.sqlite"), limit=50)
    rep.observe(CHEAT, "disputed", now=T0)  # the oldest, but excluded: kept
    rep.observe(GOOD, "verified", now=T0 + 1)
    for i in range(40):
        rep.observe(sybil(i), "won", now=T0 + 10 + i)
    rep.observe(GOOD, "verified", now=T0 + 100)  # seen again: now among the newest
    for i in range(40, 60):
        rep.observe(sybil(i), "won", now=T0 + 100 + i)
    assert rep.count() == 50
    kept = {p["peer"] for p in rep.peers(T0 + 200)}
    assert {CHEAT, GOOD, sybil(12), sybil(59)} <= kept
    assert not {sybil(i) for i in range(12)} & kept  # the least recently seen went first
    assert rep.standing(GOOD, T0 + 200).audits_passed == 2
    for i in range(60, 400):
        rep.observe(sybil(i), "won", now=T0 + 200 + i)
        assert rep.count() <= 50
    assert rep.standing(CHEAT, T0 + 1000).excluded(T0 + 1000)
    assert rep.record(GOOD) is None  # not seen since: forgotten, like any stranger


def test_once_the_exclusion_ends_the_peer_may_be_evicted(tmp_path: Path) -> None:
    rep = Reputation(JobDB(tmp_path / "jobs.sqlite"), limit=3)
    rep.observe(CHEAT, "disputed", now=T0)
    for i in range(3):
        rep.observe(f"12D3KooWsybil{i}", "won", now=T0 + EXCLUDE_FOR + i)
    assert rep.count() == 3
    assert rep.record(CHEAT) is None


def test_unknown_outcomes_and_roles_are_refused(tmp_path: Path) -> None:
    rep = Reputation(JobDB(tmp_path / "jobs.sqlite"))
    with pytest.raises(ValueError):
        rep.observe(GOOD, "bribed", now=T0)
    with pytest.raises(ValueError):
        rep.observe(GOOD, "won", role="auditor", now=T0)
    assert rep.count() == 0  # the failed transaction left nothing behind

"""Verification policies (protocol/verification.py) and the requester machine running a
job on several executors: every decision without a process, the hostile ones first."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import (
    BidIn,
    CancelAsked,
    CloseStream,
    Compared,
    CompareResults,
    ExecutorFrame,
    FetchResult,
    KeepResult,
    Move,
    Observe,
    RequesterJob,
    ResultFetched,
    SendAccept,
    SendCancel,
    Settle,
    SetVerification,
    Start,
    StreamLost,
    Tick,
)
from protocol.messages import Bid, JobSpec
from protocol.reputation import Standing
from protocol.verification import (
    STRANGER_AUDIT,
    TRUST_AFTER,
    Kind,
    Next,
    Policy,
    audit_probability,
    decide,
    groups,
    pair,
    should_audit,
)
from tests.protocol.test_lifecycle import (
    GOOD_DIGESTS,
    JOB_ID,
    ME,
    PEERS,
    POLICY,
    SPEC,
    SPEC_CID,
    T0,
    logs,
    moves,
    of,
    progress,
    receipt,
)

S = JobStatus
A, B, C, D = PEERS[:4]
GOOD = {"outputs/y.npy": "ab" * 32}
WRONG = {"outputs/y.npy": "cd" * 32}
NOISY = {"outputs/y.npy": "ef" * 32}
TRUSTED = Standing(score=0.9, audits_passed=TRUST_AFTER + 2, why="proven")

# ---- the policies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "executors", "quorum"),
    [
        ("receipt", Kind.RECEIPT, 1, 1),
        ("none", Kind.NONE, 1, 1),
        ("redundant:2", Kind.REDUNDANT, 2, 2),
        ("redundant:3", Kind.REDUNDANT, 3, 2),
        ("redundant:5", Kind.REDUNDANT, 5, 3),
        ("sample:0.1", Kind.SAMPLE, 2, 2),
    ],
)
def test_policies_parse_with_their_executors_and_quorum(
    text: str, kind: Kind, executors: int, quorum: int
) -> None:
    policy = Policy.parse(text)
    assert policy.kind == kind and str(policy) == text
    assert policy.executors(True) == executors and policy.quorum(True) == quorum


@pytest.mark.parametrize("text", ["redundant:1", "redundant:10", "sample:2", "majority", ""])
def test_unknown_policies_are_refused_with_the_allowed_forms(text: str) -> None:
    with pytest.raises(MeshrunError) as err:
        Policy.parse(text)
    assert err.value.code == ErrorCode.INVALID_SPEC and "redundant:K" in err.value.message


def test_sampling_audits_strangers_more_than_proven_peers() -> None:
    policy = Policy.parse("sample:0.1")
    assert audit_probability(policy, Standing()) == STRANGER_AUDIT
    assert audit_probability(policy, TRUSTED) == pytest.approx(0.1)
    assert audit_probability(Policy.parse("receipt"), Standing()) == 0.0
    assert should_audit(policy, TRUSTED, 0.05) and not should_audit(policy, TRUSTED, 0.2)
    assert should_audit(policy, Standing(), 0.2)


# ---- deciding from answers -------------------------------------------------------------


def test_equal_digests_agree_without_any_comparison() -> None:
    decision = decide(2, {1: GOOD, 2: GOOD}, {}, running=0, can_add=False)
    assert decision.next == Next.ACCEPT and decision.winners == (1, 2)


def test_different_digests_are_compared_before_anything_is_decided() -> None:
    decision = decide(2, {1: GOOD, 2: NOISY}, {}, running=0, can_add=True)
    assert decision.next == Next.COMPARE and decision.pairs == (pair(1, 2),)
    waiting = decide(2, {1: GOOD, 2: NOISY}, {}, running=0, comparing=[pair(1, 2)], can_add=True)
    assert waiting.next == Next.WAIT


def test_a_split_calls_a_tiebreaker_then_the_majority_wins() -> None:
    same = {pair(1, 2): False}
    assert decide(2, {1: GOOD, 2: WRONG}, same, running=0, can_add=True).next == Next.TIEBREAK
    assert decide(2, {1: GOOD, 2: WRONG}, same, running=0, can_add=False).next == Next.MISMATCH
    settled = decide(
        2, {1: WRONG, 2: GOOD, 3: GOOD}, same | {pair(1, 3): False}, running=0, can_add=False
    )
    assert settled.next == Next.ACCEPT and settled.winners == (2, 3) and settled.losers == (1,)


def test_an_outvoted_answer_is_compared_before_it_is_disputed() -> None:
    # Two agree; the third differs in its digests but may be honest noise.
    answers = {1: GOOD, 2: GOOD, 3: NOISY}
    decision = decide(2, answers, {}, running=0, can_add=False)
    assert decision.next == Next.COMPARE and decision.pairs == (pair(3, 1),)
    busy = decide(2, answers, {}, running=0, comparing=[pair(1, 3)], can_add=False)
    assert busy.next == Next.WAIT
    honest = decide(2, answers, {pair(1, 3): True}, running=0, can_add=False)
    assert honest.next == Next.ACCEPT and honest.winners == (1, 2, 3) and not honest.losers
    liar = decide(2, answers, {pair(1, 3): False}, running=0, can_add=False)
    assert liar.next == Next.ACCEPT and liar.losers == (3,)


def test_waiting_while_executors_run() -> None:
    assert decide(2, {1: GOOD}, {}, running=1, can_add=True).next == Next.WAIT
    assert decide(2, {1: GOOD}, {}, running=0, can_add=True).next == Next.TIEBREAK
    assert decide(3, {1: GOOD}, {}, running=0, can_add=True).next == Next.MISMATCH


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=7))
def test_groups_partition_the_answers_by_digest(labels: list[str]) -> None:
    answers = {i + 1: {"y": label} for i, label in enumerate(labels)}
    found = groups(answers, {})
    assert sorted(a for g in found for a in g) == sorted(answers)
    for g in found:
        assert len({answers[a]["y"] for a in g}) == 1
    assert [len(g) for g in found] == sorted((len(g) for g in found), reverse=True)


# ---- the machine with several executors ------------------------------------------------


def spec(verification: str, **tolerance: Any) -> JobSpec:
    fields = SPEC.model_dump() | {"verification": verification}
    if tolerance:
        fields["tolerance"] = tolerance
    return JobSpec.model_validate(fields)


def job_for(verification: str, draw: float = 0.0) -> RequesterJob:
    job = RequesterJob(
        job_id=JOB_ID,
        me=ME,
        spec=spec(verification),
        spec_cid=SPEC_CID,
        policy=POLICY,
        audit_draw=draw,
    )
    job.create()
    job.handle(Start(4), T0)
    return job


def bid_in(provider: str, price: float, standing: Standing | None = None) -> BidIn:
    message = Bid(
        job_id=JOB_ID,
        provider=provider,
        price=price,
        eta_seconds=1.0,
        execution_providers=["CPUExecutionProvider"],
        device="cpu",
        created_at=T0,
    )
    return BidIn(message, b"bid-" + provider.encode(), standing or Standing())


def open_bids(job: RequesterJob, *providers: str, standing: Standing | None = None) -> list[Any]:
    effects: list[Any] = []
    for i, p in enumerate(providers):
        effects += job.handle(bid_in(p, 1.0 + i, standing), T0 + 0.01 * (i + 1))
    effects += job.handle(Tick(4), T0 + 3)  # the bid window closes
    return effects


def answer(job: RequesterJob, attempt: int, digests: dict[str, str], now: float) -> list[Any]:
    run = job.runs[attempt]
    result = f"bafybeiresult{run.executor[-12:].lower()}{attempt}"
    message = receipt(run.executor, output_digests=digests, result_cid=result)
    return job.handle(ExecutorFrame(attempt, run.executor, message, b"env" + bytes([attempt])), now)


def fetched(job: RequesterJob, attempt: int, now: float) -> list[Any]:
    run = job.runs[attempt]
    assert run.receipt is not None
    files = {**GOOD_DIGESTS, **run.receipt.output_digests}
    return job.handle(ResultFetched(attempt, run.receipt.result_cid, files), now)


def settled(effects: list[Any]) -> dict[str, tuple[float, str]]:
    return {s.executor: (s.price, s.outcome) for s in of(effects, Settle)}


def observed(effects: list[Any]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for o in of(effects, Observe):
        seen.setdefault(o.peer, []).append(o.outcome)
    return seen


def test_redundant_runs_k_executors_and_equal_digests_need_one_fetch() -> None:
    job = job_for("redundant:2")
    effects = open_bids(job, A, B, C)
    accepts = of(effects, SendAccept)
    assert [a.accept.provider for a in accepts] == [A, B] and job.status == S.ASSIGNED
    assert logs(effects).count("BidAccepted") == 2 and "VerificationPlanned" in logs(effects)
    first = answer(job, 1, GOOD, T0 + 4)
    assert [f.provider for f in of(first, FetchResult)] == [A]  # fetched at once
    second = answer(job, 2, GOOD, T0 + 4.1)
    assert not of(second, FetchResult)  # B's bytes are A's: nothing more to fetch
    done = fetched(job, 1, T0 + 4.2)
    assert job.status == S.COMPLETED
    assert settled(done) == {A: (1.0, "verified"), B: (2.0, "verified")}
    assert observed(done) == {A: ["verified"], B: ["verified"]}
    final = next(m for m in done if hasattr(m, "fields") and "verification" in m.fields)
    summary = final.fields["verification"]
    assert summary["agreed"] == [A, B] and summary["disputed"] == []
    assert [e["receipt_envelope_b64"] is not None for e in summary["executors"]] == [True, True]


def test_redundant_with_a_wrong_answer_calls_a_tiebreaker_and_disputes_the_liar() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B, C)  # A bids lowest and lies
    answer(job, 1, WRONG, T0 + 4)
    fetched(job, 1, T0 + 4.1)
    both = answer(job, 2, GOOD, T0 + 4.2)
    assert [f.provider for f in of(both, FetchResult)] == [B]  # needed for the comparison
    compare = of(fetched(job, 2, T0 + 4.3), CompareResults)
    assert [(c.a, c.b) for c in compare] == [(1, 2)]
    split = job.handle(Compared(1, 2, False, 3.0, 1.0, "outputs differ"), T0 + 4.4)
    assert "ResultsCompared" in logs(split) and "TieBreakStarted" in logs(split)
    assert [a.accept.provider for a in of(split, SendAccept)] == [C]
    assert job.status == S.RUNNING
    tie = answer(job, 3, GOOD, T0 + 5)
    assert job.status == S.COMPLETED
    assert settled(tie) == {B: (2.0, "verified"), C: (3.0, "verified"), A: (0.0, "disputed")}
    assert observed(tie)[A] == ["disputed"]
    assert "ResultDisputed" in logs(tie)
    kept = {k.cid for k in of(tie, KeepResult)}
    assert job.runs[1].receipt is not None and job.runs[1].receipt.result_cid in kept


def test_no_quorum_and_no_one_left_fails_the_job_keeping_every_result() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B)
    answer(job, 1, WRONG, T0 + 4)
    fetched(job, 1, T0 + 4.1)
    answer(job, 2, GOOD, T0 + 4.2)
    fetched(job, 2, T0 + 4.3)
    effects = job.handle(Compared(1, 2, False, 3.0, 1.0, "outputs differ"), T0 + 4.4)
    assert job.status == S.FAILED
    move = next(m for m in effects if hasattr(m, "fields") and "error" in m.fields)
    assert move.fields["error"]["code"] == "VERIFICATION_MISMATCH"
    assert len(of(effects, KeepResult)) == 2 and not of(effects, Settle)


def test_honest_noise_within_tolerance_is_never_disputed() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B)
    answer(job, 1, GOOD, T0 + 4)
    fetched(job, 1, T0 + 4.1)
    answer(job, 2, NOISY, T0 + 4.2)
    fetched(job, 2, T0 + 4.3)
    done = job.handle(Compared(1, 2, True, 1e-7, 1e-6, ""), T0 + 4.4)
    assert job.status == S.COMPLETED
    assert settled(done) == {A: (1.0, "verified"), B: (2.0, "verified")}
    assert "disputed" not in {o for outs in observed(done).values() for o in outs}


def test_redundant_needs_k_bids() -> None:
    job = job_for("redundant:3")
    effects = open_bids(job, A, B)
    assert job.status == S.FAILED and not of(effects, SendAccept)
    assert "needs 3 distinct executors" in str(effects[-1].fields["error"]["message"])


def test_an_excluded_peer_never_runs_the_job() -> None:
    job = job_for("receipt")
    banned = Standing(score=0.0, excluded_until=T0 + 3600, why="result outvoted")
    effects = job.handle(bid_in(A, 0.1, banned), T0 + 0.01)
    assert logs(effects) == ["BidRejected"] and A not in job.bids
    effects = open_bids(job, B)
    assert [a.accept.provider for a in of(effects, SendAccept)] == [B]


def test_sampling_audits_a_stranger_and_not_always_a_proven_peer() -> None:
    audited = job_for("sample:0.1", draw=0.3)  # a stranger is audited at one in two
    effects = open_bids(audited, A, B)
    assert [a.accept.provider for a in of(effects, SendAccept)] == [A, B] and audited.audited
    trusted = job_for("sample:0.1", draw=0.3)
    effects = open_bids(trusted, A, B, standing=TRUSTED)
    assert [a.accept.provider for a in of(effects, SendAccept)] == [A] and not trusted.audited
    answer(trusted, 1, GOOD, T0 + 4)
    done = fetched(trusted, 1, T0 + 4.1)
    assert trusted.status == S.COMPLETED and settled(done) == {A: (1.0, "unaudited")}


def test_a_caught_sample_goes_to_a_tiebreak_and_the_cheater_is_disputed() -> None:
    job = job_for("sample:0.1", draw=0.0)
    open_bids(job, A, B, C)
    answer(job, 1, WRONG, T0 + 4)
    fetched(job, 1, T0 + 4.1)
    answer(job, 2, GOOD, T0 + 4.2)
    fetched(job, 2, T0 + 4.3)
    split = job.handle(Compared(1, 2, False, 3.0, 1.0, ""), T0 + 4.4)
    assert [a.accept.provider for a in of(split, SendAccept)] == [C]
    done = answer(job, 3, GOOD, T0 + 5)
    assert job.status == S.COMPLETED and settled(done)[A] == (0.0, "disputed")
    assert job.runs[2].outcome == "verified"


def test_sampling_with_one_bid_runs_unaudited() -> None:
    job = job_for("sample:1", draw=0.0)
    effects = open_bids(job, A)
    assert [a.accept.provider for a in of(effects, SendAccept)] == [A] and job.audited is False
    plan = [e for e in effects if getattr(e, "log", None) and e.log.value == "VerificationPlanned"]
    assert plan[0].data["why"].startswith("no second executor")


def test_a_lost_replica_is_replaced_while_the_other_keeps_running() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B, C)
    job.handle(ExecutorFrame(1, A, progress(A), b"p"), T0 + 3.5)
    lost = job.handle(StreamLost(2, "EOF"), T0 + 4)
    assert [a.accept.provider for a in of(lost, SendAccept)] == [C]
    assert [c.attempt for c in of(lost, CloseStream)] == [2]
    assert job.status == S.RUNNING and not moves(lost)
    answer(job, 1, GOOD, T0 + 5)
    answer(job, 3, GOOD, T0 + 5.1)
    done = fetched(job, 1, T0 + 5.2)
    assert job.status == S.COMPLETED and set(settled(done)) == {A, C}


def test_a_silent_replica_is_lost_by_the_clock() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B)
    job.handle(ExecutorFrame(1, A, progress(A), b"p"), T0 + 7)
    effects = job.handle(Tick(), T0 + 8.1)
    assert logs(effects)[0] == "ExecutorLost" and job.runs[2].outcome == "lost"
    assert job.runs[1].outcome == "running" and job.status == S.RUNNING
    # A answers alone; no second executor is left: no quorum.
    final = answer(job, 1, GOOD, T0 + 9)
    assert job.status == S.FAILED and "VERIFICATION_MISMATCH" in str(final)
    assert "1 of the 2 executors" in str(final)


def test_cancel_reaches_every_running_executor() -> None:
    job = job_for("redundant:2")
    open_bids(job, A, B)
    effects = job.handle(CancelAsked("user"), T0 + 4)
    assert sorted(c.attempt for c in of(effects, SendCancel)) == [1, 2]
    assert job.status == S.CANCELING
    job.handle(StreamLost(1, "EOF"), T0 + 4.1)
    assert job.status == S.CANCELING  # B has not confirmed yet
    job.handle(StreamLost(2, "EOF"), T0 + 4.2)
    assert job.status == S.CANCELED


def test_the_verification_summary_follows_every_step() -> None:
    job = job_for("redundant:2")
    effects = open_bids(job, A, B)
    summaries = of(effects, SetVerification)
    assert summaries and summaries[-1].summary["policy"] == "redundant:2"
    assert [e["peer"] for e in summaries[-1].summary["executors"]] == [A, B]


def test_the_summary_is_written_only_when_it_changed() -> None:
    """Each write re-encodes every run's receipt; the verdict's move carries the last."""
    job = job_for("redundant:2")
    effects = open_bids(job, A, B)
    effects += answer(job, 1, GOOD_DIGESTS, T0 + 4)
    effects += fetched(job, 1, T0 + 4.1)  # nothing the summary shows changed
    assert len(of(effects, SetVerification)) == 2
    effects = answer(job, 2, GOOD_DIGESTS, T0 + 4.2)
    assert job.status == S.COMPLETED and not of(effects, SetVerification)
    final = of(effects, Move)[-1].fields["verification"]
    assert final["agreed"] == [A, B]  # type: ignore[index]

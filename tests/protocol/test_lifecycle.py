"""Both job machines (protocol.lifecycle) without any I/O: every branch, the hostile ones too.

A requester job is driven here exactly as node/roles/requester.py drives it:
events in, effects out. Nothing is mocked because nothing does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crypto.keys import Identity
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import TERMINAL, JobStatus
from protocol.lifecycle import (
    MAX_BIDS,
    TABLE,
    AcceptNotDelivered,
    BadFrame,
    BidIn,
    CancelAsked,
    CancelFrame,
    CloseStream,
    ComputeJob,
    Crashed,
    Effect,
    ExecutorFrame,
    FetchPartial,
    FetchResult,
    KeepResult,
    LogEvent,
    Move,
    NoBidIn,
    PartialFetched,
    Progressed,
    Publish,
    Record,
    Recovered,
    RequesterGone,
    RequesterJob,
    Restarted,
    ResultFetched,
    ResultUnavailable,
    ResumeAsked,
    Role,
    RunFailed,
    RunSucceeded,
    SaveBid,
    SendAccept,
    SendCancel,
    SendFrame,
    SendResume,
    SetProgress,
    Settle,
    Stage,
    Start,
    StopWork,
    StreamLost,
    Tick,
    Trigger,
    WorkStarted,
    WorkStopped,
    legal_moves,
    next_status,
    state_table_markdown,
)
from protocol.messages import Accept, Bid, Failure, JobSpec, NoBid, Progress, Receipt, Resume
from protocol.policy import RequesterPolicy
from tests.protocol.test_messages import ALICE, JOB_ID, sample_fields

S = JobStatus
ME = ALICE.peer_id
PEERS = [Identity(bytes([i + 40]) * 32).peer_id for i in range(6)]
A, B, C, D = PEERS[:4]
T0 = 1_700_000_000.0
SPEC = JobSpec.model_validate(
    {
        **sample_fields("jobspec", ME),
        "max_price": 5.0,
        "expires_at": T0 + 600,
        "timeout_seconds": 60.0,
        "verification": "receipt",
    }
)
SPEC_CID = "bafkreispeccidspeccidspeccidspeccid"
RESULT = "bafybeiresultresultresultresult"
OTHER = "bafkreiotherjobotherjobotherjob"
POLICY = RequesterPolicy(bid_window=2.0, bid_settle=0.1, max_retries=2, silence=5.0)


def bid(provider: str, price: float = 1.0, eta: float = 1.0, job_id: str = JOB_ID) -> BidIn:
    message = Bid(
        job_id=job_id,
        provider=provider,
        price=price,
        eta_seconds=eta,
        execution_providers=["CPUExecutionProvider"],
        device="cpu",
        created_at=T0,
    )
    return BidIn(message, b"bid-envelope")


def nobid(provider: str, reason: str = "NO_GPU") -> NoBidIn:
    return NoBidIn(NoBid(job_id=JOB_ID, provider=provider, reason=reason, message="x"), b"nb")


def receipt(provider: str, **overrides: Any) -> Receipt:
    fields: dict[str, Any] = {
        "job_id": JOB_ID,
        "spec_cid": SPEC_CID,
        "model_cid": SPEC.model_cid,
        "inputs_cid": SPEC.inputs_cid,
        "result_cid": RESULT,
        "result_bytes": 4096,
        "provider": provider,
        "execution_provider": "CPUExecutionProvider",
        "device": "cpu",
        "output_digests": {"outputs/y.npy": "ab" * 32},
        "timings_ms": {},
        "started_at": T0,
        "finished_at": T0 + 1,
    }
    return Receipt.model_validate({**fields, **overrides})


def progress(provider: str, substate: str = "processing", pct: float = 50.0) -> Progress:
    return Progress(
        job_id=JOB_ID,
        provider=provider,
        substate=substate,  # type: ignore[arg-type]
        progress=pct,
        at=T0,
    )


def failure(provider: str, code: str = "EXECUTION_FAILED", **kw: Any) -> Failure:
    return Failure(job_id=JOB_ID, provider=provider, code=code, message="boom", **kw)


def frame(job: RequesterJob, message: Any, signer: str | None = None) -> ExecutorFrame:
    return ExecutorFrame(job.attempt, signer or message.provider, message, b"env")


GOOD_DIGESTS = {"outputs/y.npy": "ab" * 32, "output.json": "00" * 32}


def moves(effects: Sequence[Effect]) -> list[tuple[JobStatus | None, JobStatus]]:
    return [(e.source, e.target) for e in effects if isinstance(e, Move)]


def logs(effects: Sequence[Effect]) -> list[str]:
    return [e.log.value for e in effects if isinstance(e, (Move, Record))]


def of(effects: Sequence[Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def new_job(policy: RequesterPolicy = POLICY, window: float | None = None) -> RequesterJob:
    job = RequesterJob(
        job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=policy, window=window
    )
    created = job.create()
    assert (created.source, created.target, created.log) == (None, S.PENDING, LogEvent.CREATED)
    return job


def bidding(topic_peers: int = 2, **kw: Any) -> RequesterJob:
    job = new_job(**kw)
    effects = job.handle(Start(topic_peers), T0)
    assert moves(effects) == [(S.PENDING, S.BIDDING)]
    assert of(effects, Publish)
    return job


def assigned(*providers: str, now: float = T0 + 0.5) -> RequesterJob:
    job = bidding(topic_peers=len(providers))
    for i, p in enumerate(providers):
        job.handle(bid(p, price=1.0 + i), T0 + 0.01 * (i + 1))
    if job.executor is None:
        job.handle(Tick(len(providers)), now)
    assert job.status == S.ASSIGNED and job.executor == providers[0]
    return job


def completes(job: RequesterJob, now: float = T0 + 2) -> list[Effect]:
    ex = job.executor
    assert ex is not None
    effects = job.handle(frame(job, receipt(ex)), now)
    fetch = of(effects, FetchResult)
    assert fetch and fetch[0].provider == ex and fetch[0].cid == RESULT
    return effects + job.handle(ResultFetched(job.attempt, RESULT, GOOD_DIGESTS), now + 0.1)


# ---- the table ------------------------------------------------------------------------


def test_every_status_change_in_the_table_is_a_designed_move() -> None:
    designed = {
        (S.PENDING, S.BIDDING),
        (S.BIDDING, S.ASSIGNED),
        (S.ASSIGNED, S.RUNNING),
        (S.RUNNING, S.COMPLETED),
        (S.ASSIGNED, S.BIDDING),
        (S.RUNNING, S.BIDDING),
        (S.CANCELING, S.CANCELED),
    }
    for (_, source, _), target in TABLE.items():
        if source is None or (source, target) in designed:
            continue
        # Everything else ends the job early: a failure, a timeout or a cancel.
        assert target in (S.FAILED, S.TIMEOUT, S.CANCELING, S.CANCELED), (source, target)
    for status in TERMINAL:
        assert not legal_moves()[status]


def test_every_live_state_can_be_canceled_and_ended_by_a_restart() -> None:
    for status in (S.PENDING, S.BIDDING, S.ASSIGNED, S.RUNNING):
        assert next_status(Role.REQUESTER, status, Trigger.CANCEL_ASKED) == S.CANCELING
        assert next_status(Role.REQUESTER, status, Trigger.NOT_RESUMABLE).terminal
    for status in (S.ASSIGNED, S.RUNNING, S.CANCELING):
        assert next_status(Role.COMPUTE, status, Trigger.RESTARTED).terminal


def test_an_illegal_move_raises_with_a_stable_code() -> None:
    with pytest.raises(MeshrunError) as info:
        next_status(Role.REQUESTER, S.COMPLETED, Trigger.CANCEL_ASKED)
    assert info.value.code == ErrorCode.ILLEGAL_TRANSITION
    with pytest.raises(MeshrunError):
        Move(Role.REQUESTER, Trigger.PUBLISHED, S.BIDDING, S.BIDDING, LogEvent.PUBLISHED, None)
    with pytest.raises(ValueError, match="cannot set"):
        Move(
            Role.REQUESTER,
            Trigger.PUBLISHED,
            S.PENDING,
            S.BIDDING,
            LogEvent.PUBLISHED,
            None,
            fields={"status": "completed"},
        )


def test_the_compute_role_never_bids_through_states_it_does_not_have() -> None:
    compute = legal_moves(Role.COMPUTE)
    assert not compute[S.PENDING] and not compute[S.BIDDING]
    assert legal_moves(Role.REQUESTER)[S.PENDING] == {S.BIDDING, S.CANCELING, S.FAILED}


def test_state_table_markdown_lists_every_row() -> None:
    text = state_table_markdown()
    assert text.count("\n") == len(TABLE) + 2
    assert "| requester | (new) | submitted | pending |" in text


# ---- bidding ----------------------------------------------------------------------------


def test_happy_path_records_every_step() -> None:
    job = bidding(topic_peers=2)
    e1 = job.handle(bid(A, price=1.0), T0 + 0.01)
    assert of(e1, SaveBid) and logs(e1) == ["BidReceived"]
    e2 = job.handle(bid(B, price=2.0), T0 + 0.02)  # every topic peer answered: close now
    assert moves(e2) == [(S.BIDDING, S.ASSIGNED)]
    accept = of(e2, SendAccept)[0]
    assert accept.accept.provider == A and accept.accept.price == 1.0
    assert accept.accept.requester == ME and accept.attempt == 1
    e3 = job.handle(frame(job, progress(A)), T0 + 0.1)
    assert moves(e3) == [(S.ASSIGNED, S.RUNNING)]
    assert of(e3, SetProgress)[0].progress == 50.0
    e4 = completes(job)
    assert logs(e4) == ["ResultsPublished", "ReceiptVerified", "Completed"]
    assert of(e4, KeepResult)[0].cid == RESULT
    done = [e for e in e4 if isinstance(e, Move)][-1]
    assert done.target == S.COMPLETED and done.fields["result_cid"] == RESULT
    assert job.finished and job.handle(Tick(2), T0 + 99) == []


def test_window_closes_after_settle_when_not_everyone_answers() -> None:
    job = bidding(topic_peers=5)
    job.handle(bid(B, price=2.0), T0 + 0.5)
    assert job.next_deadline(T0 + 0.5) == pytest.approx(T0 + 0.6)
    assert job.handle(Tick(5), T0 + 0.55) == []
    job.handle(bid(A, price=1.0), T0 + 0.58)
    effects = job.handle(Tick(5), T0 + 0.61)
    assert of(effects, SendAccept)[0].accept.provider == A  # the cheaper late bid won


def test_no_bids_fails_with_the_refusals() -> None:
    job = bidding(topic_peers=2)
    job.handle(nobid(A, "NO_GPU"), T0 + 0.1)
    job.handle(nobid(A, "NO_GPU"), T0 + 0.1)  # a duplicate refusal counts once
    assert len(job.refusals) == 1
    assert job.handle(Tick(2), T0 + 1.0) == []
    effects = job.handle(Tick(2), T0 + 2.0)
    move = of(effects, Move)[0]
    assert move.target == S.FAILED and move.trigger == Trigger.NO_BIDS
    error = move.fields["error"]
    assert isinstance(error, dict) and error["code"] == "NO_BIDS"
    assert A in error["details"]["refusals"]


def test_rejected_and_foreign_bids() -> None:
    job = bidding()
    assert logs(job.handle(bid(A, price=50.0), T0 + 0.1)) == ["BidRejected"]
    assert job.handle(bid(B, job_id="bafkreiotherjobotherjob"), T0 + 0.1) == []
    assert not job.bids


def test_replayed_bid_counts_once_and_does_not_close_the_window() -> None:
    job = bidding(topic_peers=3)
    job.handle(bid(A), T0 + 0.01)
    for _ in range(5):
        assert job.handle(bid(A), T0 + 0.02) == []
    assert len(job.bids) == 1 and job.status == S.BIDDING


def test_a_refusal_then_a_bid_from_the_same_peer_is_ignored() -> None:
    job = bidding(topic_peers=3)
    job.handle(nobid(A), T0 + 0.01)
    assert job.handle(bid(A), T0 + 0.02) == []


def test_bid_flood_is_bounded() -> None:
    job = bidding(topic_peers=10_000)
    for i in range(MAX_BIDS + 50):
        job.handle(bid(Identity(i.to_bytes(32, "big")).peer_id), T0 + 0.01)
    assert len(job.bids) <= MAX_BIDS


def test_republish_when_topic_peers_join_late() -> None:
    job = bidding(topic_peers=0)
    assert job.next_deadline(T0) == pytest.approx(T0 + 0.25)
    assert job.handle(Tick(0), T0 + 1.9) == []
    effects = job.handle(Tick(2), T0 + 1.95)
    assert of(effects, Publish) and logs(effects) == ["Republished"]
    assert job.window_end == pytest.approx(T0 + 1.95 + 2.0)  # a full window for them
    assert job.handle(Tick(2), T0 + 2.5) == []  # not closed at the old window end
    assert job.handle(Tick(2), T0 + 3.0) == []  # same peers: no second republish
    effects = job.handle(bid(A), T0 + 3.1)
    effects += job.handle(bid(B), T0 + 3.11)
    assert of(effects, SendAccept)


def test_republish_to_more_peers_keeps_the_window() -> None:
    job = bidding(topic_peers=1)
    effects = job.handle(Tick(3), T0 + 0.5)
    assert of(effects, Publish) and job.window_end == T0 + 2.0 and job.expected == 3


# ---- attempts on executors ------------------------------------------------------------


def test_executor_lost_moves_to_the_next_bid_then_fails_when_bids_run_out() -> None:
    job = assigned(A, B)
    effects = job.handle(StreamLost(1, "EOF"), T0 + 1)
    assert moves(effects) == [(S.ASSIGNED, S.BIDDING), (S.BIDDING, S.ASSIGNED)]
    assert logs(effects) == ["ExecutorLost", "Retried", "BidAccepted"]
    assert of(effects, SendAccept)[0].accept.provider == B
    retried = of(effects, Move)[0]
    assert retried.fields["retry_count"] == 1
    effects = job.handle(AcceptNotDelivered(2, "dial failed"), T0 + 2)
    move = of(effects, Move)[-1]
    assert move.target == S.FAILED and move.trigger == Trigger.RETRIES_EXHAUSTED
    error = move.fields["error"]
    assert isinstance(error, dict) and error["code"] == "EXECUTOR_LOST"
    assert "every accepted executor was lost" in str(error["message"])


def test_retry_budget_is_bounded() -> None:
    job = assigned(A, B, C, D)
    for attempt in (1, 2):
        job.handle(StreamLost(attempt, "EOF"), T0 + attempt)
    assert job.executor == C
    effects = job.handle(StreamLost(3, "EOF"), T0 + 3)
    assert job.status == S.FAILED and not of(effects, SendAccept)
    assert job.tried == [A, B, C]


def test_late_words_from_an_abandoned_attempt_are_ignored() -> None:
    job = assigned(A, B)
    job.handle(StreamLost(1, "EOF"), T0 + 1)
    assert job.handle(StreamLost(1, "EOF again"), T0 + 1.1) == []
    assert job.handle(ExecutorFrame(1, A, receipt(A), b""), T0) == []
    assert job.executor == B and job.status == S.ASSIGNED


def test_silent_executor_is_given_up_after_the_silence_limit() -> None:
    job = assigned(A, B, now=T0 + 0.5)
    assert job.next_deadline(T0 + 0.5) == pytest.approx(T0 + 5.5)
    job.handle(frame(job, progress(A)), T0 + 3.0)  # a heartbeat resets the clock
    assert job.handle(Tick(2), T0 + 7.9) == []
    effects = job.handle(Tick(2), T0 + 8.0)
    assert logs(effects)[:2] == ["ExecutorLost", "Retried"]
    assert of(effects, CloseStream)[0].cancel  # the silent one is told to stop
    assert job.executor == B


def test_heartbeats_repeat_progress_without_new_events() -> None:
    job = assigned(A)
    first = job.handle(frame(job, progress(A, pct=10.0)), T0 + 1)
    again = job.handle(frame(job, progress(A, pct=10.0)), T0 + 2)
    assert logs(first) == ["ExecutionStarted", "Progress"] and again == []
    assert job.current is not None and job.current.last_heard == T0 + 2


def test_a_job_queued_on_its_executor_stays_assigned_until_it_starts() -> None:
    job = assigned(A)
    queued = job.handle(frame(job, progress(A, substate="queued", pct=0.0)), T0 + 1)
    assert logs(queued) == ["Progress"] and job.status == S.ASSIGNED
    assert of(queued, SetProgress)[0].substate == "queued"
    # Its heartbeats keep the attempt alive while it waits for a slot.
    assert job.handle(frame(job, progress(A, substate="queued", pct=0.0)), T0 + 4.5) == []
    assert job.handle(Tick(1), T0 + 9.0) == []
    started = job.handle(frame(job, progress(A, substate="warming_up", pct=0.0)), T0 + 9.5)
    assert logs(started) == ["ExecutionStarted", "Progress"] and job.status == S.RUNNING


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (lambda: receipt(A, inputs_cid="bafkreiwronginputswronginputs"), "VERIFICATION_MISMATCH"),
        (lambda: receipt(A, spec_cid="bafkreiwrongspecwrongspec"), "VERIFICATION_MISMATCH"),
        (lambda: receipt(A, model_cid="bafkreiwrongmodelwrongmodel"), "VERIFICATION_MISMATCH"),
    ],
)
def test_a_receipt_that_disagrees_with_the_spec_moves_to_the_next_bid(
    message: Any, code: str
) -> None:
    job = assigned(A, B)
    effects = job.handle(frame(job, message()), T0 + 1)
    assert logs(effects)[:3] == ["ReceiptRejected", "ExecutorLost", "Retried"]
    lost = of(effects, Record)[1]
    assert lost.data["code"] == code
    assert job.executor == B and A in job.tried
    completes(job)
    assert job.status == S.COMPLETED


def test_a_receipt_signed_by_another_key_is_not_the_executors() -> None:
    job = assigned(A, B)
    effects = job.handle(ExecutorFrame(1, C, receipt(C), b""), T0 + 1)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"
    assert job.executor == B


def test_a_frame_for_another_job_costs_the_attempt() -> None:
    job = assigned(A)
    other = Progress(
        job_id="bafkreiotherjobotherjob",
        provider=A,
        substate="processing",
        progress=1.0,
        at=T0,
    )
    effects = job.handle(frame(job, other), T0 + 1)
    move = of(effects, Move)[-1]
    assert move.target == S.FAILED
    error = move.fields["error"]
    assert isinstance(error, dict) and error["code"] == "SIGNATURE_INVALID"
    assert "no other bid" in str(error["message"])


def test_bad_bytes_or_unexpected_messages_on_the_job_stream() -> None:
    job = assigned(A, B, C)
    effects = job.handle(BadFrame(1, "garbage"), T0 + 1)
    assert of(effects, Record)[0].data["code"] == "MALFORMED_MESSAGE"
    accept = Accept(job_id=JOB_ID, requester=B, provider=B, price=1.0, accepted_at=T0)
    effects = job.handle(ExecutorFrame(2, B, accept, b""), T0 + 2)
    assert of(effects, Record)[0].data["code"] == "MALFORMED_MESSAGE"
    bid_frame = bid(C).bid
    effects = job.handle(ExecutorFrame(3, C, bid_frame, b""), T0 + 3)
    assert job.status == S.FAILED
    assert "no executor left to try" in str(of(effects, Move)[-1].fields["error"])


def test_a_result_that_does_not_rehash_is_rejected() -> None:
    job = assigned(A, B)
    job.handle(frame(job, receipt(A)), T0 + 1)
    effects = job.handle(ResultFetched(1, "bafkreisomethingelse", GOOD_DIGESTS), T0 + 1.5)
    assert logs(effects)[:2] == ["ReceiptRejected", "ExecutorLost"]
    assert job.executor == B
    effects = job.handle(frame(job, receipt(B)), T0 + 2)
    bad = {"outputs/y.npy": "cd" * 32}
    effects = job.handle(ResultFetched(2, RESULT, bad), T0 + 2.5)
    move = of(effects, Move)[-1]
    assert move.target == S.FAILED
    assert move.fields["error"]["code"] == "VERIFICATION_MISMATCH"  # type: ignore[index]


def test_result_fetch_failure_moves_on() -> None:
    job = assigned(A, B)
    job.handle(frame(job, receipt(A)), T0 + 1)
    assert job.handle(StreamLost(1, "closed after receipt"), T0 + 1.1) == []
    effects = job.handle(ResultUnavailable(1, "CID_NOT_FOUND"), T0 + 2)
    assert of(effects, Record)[0].data["code"] == "FETCH_FAILED" and job.executor == B
    assert job.handle(ResultUnavailable(2, "not fetching"), T0 + 2) == []


def test_frames_after_the_receipt_are_ignored() -> None:
    job = assigned(A)
    job.handle(frame(job, receipt(A)), T0 + 1)
    assert job.handle(frame(job, progress(A)), T0 + 1.2) == []
    assert job.handle(ExecutorFrame(1, C, receipt(C), b""), T0 + 1.2) == []
    assert job.stage == Stage.FETCHING


def test_retryable_failure_and_unasked_cancel_are_lost_attempts() -> None:
    job = assigned(A, B, C)
    job.handle(frame(job, failure(A, retryable=True)), T0 + 1)
    assert job.executor == B
    job.handle(frame(job, failure(B, code="CANCELED")), T0 + 2)
    assert job.executor == C
    effects = job.handle(frame(job, failure(C, code="RESOURCE_EXHAUSTED", retryable=True)), T0 + 3)
    error = of(effects, Move)[-1].fields["error"]
    assert isinstance(error, dict) and error["code"] == "RESOURCE_EXHAUSTED"


def test_executor_failure_ends_the_job_with_its_code() -> None:
    job = assigned(A, B)
    effects = job.handle(frame(job, failure(A, code="EXECUTION_FAILED")), T0 + 1)
    move = of(effects, Move)[-1]
    assert move.target == S.FAILED and move.trigger == Trigger.EXECUTOR_FAILED
    assert of(effects, CloseStream)
    error = move.fields["error"]
    assert isinstance(error, dict) and "reported: boom" in str(error["message"])


def test_executor_timeout_and_unknown_codes() -> None:
    job = assigned(A)
    job.handle(frame(job, progress(A)), T0 + 1)
    effects = job.handle(frame(job, failure(A, code="TIMEOUT")), T0 + 2)
    assert of(effects, Move)[-1].target == S.TIMEOUT
    job = assigned(A)
    effects = job.handle(frame(job, failure(A, code="SOMETHING_NEW")), T0 + 2)
    assert of(effects, Move)[-1].fields["error"]["code"] == "EXECUTION_FAILED"  # type: ignore[index]


def test_partial_results_are_fetched_then_the_job_fails_naming_them() -> None:
    job = assigned(A)
    partial = "bafybeipartialpartialpartial"
    effects = job.handle(frame(job, failure(A, partial_result_cid=partial)), T0 + 1)
    assert of(effects, FetchPartial)[0].cid == partial and job.status == S.ASSIGNED
    effects = job.handle(PartialFetched(1, partial), T0 + 2)
    assert logs(effects) == ["PartialResultsKept", "Failed"]
    error = of(effects, Move)[0].fields["error"]
    assert isinstance(error, dict) and error["details"]["partial_result_cid"] == partial


def test_a_partial_result_that_could_not_be_kept() -> None:
    job = assigned(A)
    job.handle(frame(job, failure(A, partial_result_cid="bafybeipartialpartial")), T0 + 1)
    effects = job.handle(PartialFetched(1, None), T0 + 2)
    assert logs(effects) == ["Failed"]
    assert "partial_result_cid" not in of(effects, Move)[0].fields["error"]["details"]  # type: ignore[index]
    assert job.handle(PartialFetched(1, None), T0 + 2) == []


def test_deadline_times_the_job_out_and_stops_the_executor() -> None:
    job = assigned(A)
    job.handle(frame(job, progress(A)), T0 + 1)
    deadline = T0 + 2.0 + 60.0 + POLICY.receipt_grace
    assert job.deadline == pytest.approx(deadline)
    for t in range(2, 60, 4):
        job.handle(frame(job, progress(A, pct=float(t))), T0 + t)
    job.last_heard = deadline  # a live executor, just too slow
    effects = job.handle(Tick(1), deadline)
    assert of(effects, CloseStream)[0].cancel
    assert of(effects, Move)[0].target == S.TIMEOUT


def test_deadline_while_bidding() -> None:
    job = bidding(topic_peers=0, window=200.0)
    effects = job.handle(Tick(0), T0 + 200.0 + 60.0 + POLICY.receipt_grace)
    assert moves(effects) == [(S.BIDDING, S.TIMEOUT)] and not of(effects, CloseStream)


# ---- cancel ------------------------------------------------------------------------------


def test_cancel_while_bidding_ends_at_once() -> None:
    job = bidding()
    effects = job.handle(CancelAsked("user"), T0 + 0.1)
    assert moves(effects) == [(S.BIDDING, S.CANCELING), (S.CANCELING, S.CANCELED)]
    assert job.handle(bid(A), T0 + 0.2) == []


def test_cancel_before_publishing() -> None:
    job = new_job()
    assert job.next_deadline(T0) is None
    assert job.handle(Tick(1), T0) == []
    effects = job.handle(CancelAsked("user"), T0)
    assert moves(effects) == [(S.PENDING, S.CANCELING), (S.CANCELING, S.CANCELED)]
    assert job.handle(Start(1), T0) == []


def test_cancel_reaches_the_executor_which_confirms() -> None:
    job = assigned(A)
    job.handle(frame(job, progress(A)), T0 + 1)
    effects = job.handle(CancelAsked("user"), T0 + 2)
    assert moves(effects) == [(S.RUNNING, S.CANCELING)]
    assert of(effects, SendCancel)[0].reason == "user"
    assert job.handle(CancelAsked("again"), T0 + 2.1) == []
    assert job.handle(frame(job, progress(A)), T0 + 2.2) == []
    confirm = failure(A, code="CANCELED", resources={"wall_seconds": 2.0})
    effects = job.handle(frame(job, confirm), T0 + 2.5)
    move = of(effects, Move)[0]
    assert move.target == S.CANCELED and move.data["resources"] == {"wall_seconds": 2.0}


def test_cancel_racing_completion_ends_canceled() -> None:
    job = assigned(A)
    job.handle(CancelAsked("user"), T0 + 1)
    effects = job.handle(frame(job, receipt(A)), T0 + 1.1)
    assert of(effects, Move)[0].target == S.CANCELED
    assert not of(effects, FetchResult)


def test_cancel_while_the_result_is_being_fetched() -> None:
    job = assigned(A)
    job.handle(frame(job, receipt(A)), T0 + 1)
    effects = job.handle(CancelAsked("user"), T0 + 1.1)
    assert moves(effects)[-1] == (S.CANCELING, S.CANCELED)
    assert job.handle(ResultFetched(1, RESULT, GOOD_DIGESTS), T0 + 1.2) == []


def test_cancel_whose_executor_never_answers_ends_after_the_grace() -> None:
    job = assigned(A)
    job.handle(CancelAsked("user"), T0 + 1)
    assert job.next_deadline(T0 + 1) == pytest.approx(T0 + 1 + POLICY.cancel_grace)
    assert job.handle(Tick(1), T0 + 2) == []
    effects = job.handle(Tick(1), T0 + 1 + POLICY.cancel_grace)
    assert of(effects, Move)[0].target == S.CANCELED


def test_cancel_whose_executor_goes_away() -> None:
    job = assigned(A)
    job.handle(CancelAsked("user"), T0 + 1)
    effects = job.handle(StreamLost(1, "EOF"), T0 + 1.5)
    assert of(effects, Move)[0].target == S.CANCELED


def test_cancel_during_a_partial_fetch() -> None:
    job = assigned(A)
    job.handle(frame(job, failure(A, partial_result_cid="bafybeipartialpartial")), T0 + 1)
    effects = job.handle(CancelAsked("user"), T0 + 1.5)
    assert moves(effects)[-1] == (S.CANCELING, S.CANCELED)


def test_other_executor_frames_while_canceling_end_it() -> None:
    job = assigned(A)
    job.handle(CancelAsked("user"), T0 + 1)
    effects = job.handle(frame(job, failure(A, code="EXECUTION_FAILED")), T0 + 1.5)
    assert of(effects, Move)[0].target == S.CANCELED


# ---- restart ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [S.PENDING, S.BIDDING, S.ASSIGNED, S.RUNNING])
def test_restart_fails_a_live_job_retryably(status: JobStatus) -> None:
    job = RequesterJob(
        job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=POLICY, status=status
    )
    effects = job.handle(Restarted(), T0)
    move = of(effects, Move)[0]
    assert move.target == S.FAILED
    error = move.fields["error"]
    assert isinstance(error, dict) and error["retryable"] is True
    assert error["code"] == "EXECUTOR_LOST" and "restarted" in str(error["message"])


def test_restart_while_canceling_ends_canceled() -> None:
    job = RequesterJob(
        job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=POLICY, status=S.CANCELING
    )
    assert of(job.handle(Restarted(), T0), Move)[0].target == S.CANCELED
    fresh = RequesterJob(job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=POLICY)
    assert fresh.handle(Restarted(), T0) == []
    assert fresh.handle(CancelAsked("x"), T0) == []


# ---- resume after a restart ----------------------------------------------------------------


def restarted_job(
    status: JobStatus, executor: str | None = None, verification: str = "receipt", **kw: Any
) -> RequesterJob:
    spec = SPEC.model_copy(update={"verification": verification, **kw})
    return RequesterJob(
        job_id=JOB_ID,
        me=ME,
        spec=spec,
        spec_cid=SPEC_CID,
        policy=POLICY,
        status=status,
        executor=executor,
    )


def recovered(**kw: Any) -> Recovered:
    defaults: dict[str, Any] = {
        "topic_peers": 2,
        "bids": (bid(A), bid(B, price=2.0)),
        "accepted_at": T0 - 10,
        "price": 1.0,
    }
    return Recovered(**{**defaults, **kw})


@pytest.mark.parametrize("status", [S.ASSIGNED, S.RUNNING])
def test_a_restarted_requester_asks_the_executor_and_completes_from_its_receipt(
    status: JobStatus,
) -> None:
    job = restarted_job(status, executor=A)
    effects = job.handle(recovered(), T0)
    assert logs(effects) == ["Resumed"] and not of(effects, Move)
    sent = of(effects, SendResume)[0]
    assert isinstance(sent.resume, Resume)
    assert (sent.resume.job_id, sent.resume.requester, sent.resume.provider) == (JOB_ID, ME, A)
    assert sent.resume.accepted_at == T0 - 10 and sent.resume.created_at == T0
    assert job.status == status and job.executor == A and job.runs[sent.attempt].resumed
    assert job.next_deadline(T0) == T0 + POLICY.resume_wait  # a silent executor is given up
    done = completes(job, now=T0 + 1)
    assert job.status == S.COMPLETED
    settle = of(done, Settle)[0]
    assert settle.executor == A and settle.price == 1.0


def test_a_resumed_run_is_followed_like_any_other() -> None:
    job = restarted_job(S.ASSIGNED, executor=A)
    job.handle(recovered(price=None), T0)
    assert job.runs[job.attempt].price == 1.0  # the accepted bid's price
    effects = job.handle(frame(job, progress(A)), T0 + 0.5)
    assert moves(effects) == [(S.ASSIGNED, S.RUNNING)]
    assert job.status == S.RUNNING


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            lambda job: frame(job, failure(A, code="JOB_NOT_FOUND", retryable=True)),
            "resume refused",
        ),
        (lambda job: frame(job, failure(A, code="EXPIRED", retryable=True)), "resume refused"),
        (lambda job: frame(job, failure(A, code="CANCELED", retryable=True)), "CANCELED"),
        (lambda job: AcceptNotDelivered(job.attempt, "no route"), "cannot open a resume stream"),
        (lambda job: StreamLost(job.attempt, "EOF"), "resume stream ended"),
    ],
)
def test_an_executor_that_cannot_resume_is_replaced_by_the_next_bid(
    answer: Any, reason: str
) -> None:
    job = restarted_job(S.RUNNING, executor=A)
    job.handle(recovered(), T0)
    effects = job.handle(answer(job), T0 + 1)
    lost = of(effects, Record)[0]
    assert lost.log == LogEvent.EXECUTOR_LOST and reason in str(lost.data["reason"])
    assert lost.data["code"] == "EXECUTOR_LOST"
    assert moves(effects) == [(S.RUNNING, S.BIDDING), (S.BIDDING, S.ASSIGNED)]
    accept = of(effects, SendAccept)[0].accept
    assert accept.provider == B and job.executor == B


def test_a_resume_that_fails_with_no_bid_left_fails_the_job_naming_the_step() -> None:
    job = restarted_job(S.RUNNING, executor=A)
    job.handle(recovered(bids=(bid(A),)), T0)
    effects = job.handle(AcceptNotDelivered(job.attempt, "OSError: refused"), T0 + 20)
    move = of(effects, Move)[0]
    assert move.target == S.FAILED
    assert "cannot open a resume stream" in move.fields["error"]["message"]  # type: ignore[index]


def test_recovery_keeps_the_retry_budget_and_skips_executors_already_lost() -> None:
    job = restarted_job(S.RUNNING, executor=B)
    job.handle(
        recovered(bids=(bid(A), bid(B, price=2.0), bid(C, price=3.0)), tried=(A,), retries=1),
        T0,
    )
    effects = job.handle(StreamLost(job.attempt, "EOF"), T0 + 1)
    assert of(effects, SendAccept)[0].accept.provider == C  # not A again
    assert job.handle(StreamLost(job.attempt, "EOF"), T0 + 2)[-1].target == S.FAILED  # type: ignore[union-attr]


def test_a_failed_run_reported_to_a_resume_fails_the_job_when_not_retryable() -> None:
    job = restarted_job(S.RUNNING, executor=A)
    job.handle(recovered(), T0)
    effects = job.handle(frame(job, failure(A)), T0 + 1)
    assert of(effects, Move)[-1].target == S.FAILED


def test_a_restarted_requester_re_opens_bidding_with_the_bids_it_kept() -> None:
    job = restarted_job(S.BIDDING)
    effects = job.handle(recovered(bids=(bid(A, price=2.0), bid(B), bid(A, job_id=OTHER))), T0)
    assert logs(effects) == ["Resumed"] and of(effects, Publish)
    assert of(effects, Record)[0].data == {"step": "bidding", "bids": 2}
    assert set(job.bids) == {A, B}
    assert job.next_deadline(T0) == T0 + POLICY.bid_settle
    effects = job.handle(Tick(2), T0 + POLICY.bid_settle)
    assert of(effects, SendAccept)[0].accept.provider == B  # the cheaper kept bid


def test_a_restarted_requester_with_no_bid_kept_waits_a_full_window() -> None:
    job = restarted_job(S.BIDDING)
    effects = job.handle(recovered(topic_peers=0, bids=()), T0)
    assert of(effects, Publish) and job.status == S.BIDDING
    effects = job.handle(Tick(2), T0 + 1)  # peers joined: told again, the window starts anew
    assert logs(effects) == ["Republished"] and of(effects, Publish)
    job.handle(bid(A), T0 + 1.5)
    effects = job.handle(Tick(2), T0 + 1.5 + POLICY.bid_settle)
    assert of(effects, SendAccept)


@pytest.mark.parametrize("status", [S.PENDING, S.BIDDING])
def test_a_window_re_opened_with_nobody_on_the_topic_waits_for_peers(status: JobStatus) -> None:
    """A restarted node recovers its jobs before its mesh forms: the window must not
    close on an empty topic after the usual bid window."""
    job = restarted_job(status)
    job.handle(recovered(topic_peers=0, bids=()), T0)
    assert not of(job.handle(Tick(0), T0 + POLICY.bid_window + 0.5), Move)
    effects = job.handle(Tick(1), T0 + 5)  # a compute node is back: a full window from now
    assert logs(effects) == ["Republished"]
    move = of(job.handle(Tick(1), T0 + 5 + POLICY.bid_window), Move)[0]
    assert move.target == S.FAILED and move.trigger == Trigger.NO_BIDS
    assert "within 7.0s" in move.fields["error"]["message"]  # type: ignore[index]


def test_a_window_re_opened_on_an_empty_topic_gives_up_after_resume_wait() -> None:
    job = restarted_job(S.BIDDING)
    job.handle(recovered(topic_peers=0, bids=()), T0)
    assert not of(job.handle(Tick(0), T0 + POLICY.resume_wait - 0.1), Move)
    move = of(job.handle(Tick(0), T0 + POLICY.resume_wait), Move)[0]
    assert move.target == S.FAILED and move.trigger == Trigger.NO_BIDS


def test_a_window_re_opened_with_peers_on_the_topic_keeps_its_length() -> None:
    job = restarted_job(S.BIDDING)
    job.handle(recovered(topic_peers=2, bids=()), T0)
    move = of(job.handle(Tick(2), T0 + POLICY.bid_window), Move)[0]
    assert move.trigger == Trigger.NO_BIDS


def test_a_pending_job_is_published_after_a_restart() -> None:
    job = restarted_job(S.PENDING)
    effects = job.handle(recovered(bids=()), T0)
    assert logs(effects) == ["Resumed", "Published"]
    assert moves(effects) == [(S.PENDING, S.BIDDING)] and of(effects, Publish)


@pytest.mark.parametrize("status", [S.PENDING, S.BIDDING])
def test_a_bidding_job_whose_spec_expired_fails_at_restart(status: JobStatus) -> None:
    job = restarted_job(status)
    move = of(job.handle(recovered(), SPEC.expires_at + 1), Move)[0]
    assert move.target == S.FAILED and move.trigger == Trigger.NOT_RESUMABLE
    error = move.fields["error"]
    assert isinstance(error, dict) and error["retryable"] is True
    assert "spec expired" in str(error["message"]) and error["details"]["step"]


def test_a_job_with_no_accept_on_record_cannot_be_resumed() -> None:
    job = restarted_job(S.ASSIGNED, executor=A)
    move = of(job.handle(recovered(accepted_at=None), T0), Move)[0]
    assert move.target == S.FAILED
    assert "no accepted executor" in move.fields["error"]["message"]  # type: ignore[index]
    job = restarted_job(S.RUNNING, executor=None)
    assert of(job.handle(recovered(), T0), Move)[0].target == S.FAILED


def test_the_runs_of_a_multi_executor_job_are_not_resumed() -> None:
    job = restarted_job(S.RUNNING, executor=A, verification="redundant:2")
    move = of(job.handle(recovered(), T0), Move)[0]
    assert move.target == S.FAILED and "redundant:2" in move.fields["error"]["message"]  # type: ignore[index]


def test_recovery_ends_a_canceling_job_and_ignores_a_new_one() -> None:
    job = restarted_job(S.CANCELING)
    assert of(job.handle(recovered(), T0), Move)[0].target == S.CANCELED
    fresh = RequesterJob(job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=POLICY)
    assert fresh.handle(recovered(), T0) == []


def test_an_accept_records_when_it_was_signed_for_a_later_resume() -> None:
    job = bidding(topic_peers=1)
    effects = job.handle(bid(A), T0 + 0.01)
    accepted = next(m for m in of(effects, Move) if m.log == LogEvent.BID_ACCEPTED)
    assert accepted.data["accepted_at"] == of(effects, SendAccept)[0].accept.accepted_at


# ---- random event sequences ----------------------------------------------------------------


EVENTS = st.one_of(
    st.builds(lambda p: ("bid", p), st.sampled_from(PEERS)),
    st.builds(lambda p: ("nobid", p), st.sampled_from(PEERS)),
    st.just(("progress", None)),
    st.just(("receipt", None)),
    st.just(("bad_receipt", None)),
    st.just(("failure", None)),
    st.just(("retryable", None)),
    st.just(("lost", None)),
    st.just(("fetched", None)),
    st.just(("unavailable", None)),
    st.just(("partial", None)),
    st.just(("cancel", None)),
    st.just(("canceled", None)),
    st.just(("tick", None)),
    st.just(("restart", None)),
)


def feed(job: RequesterJob, kind: str, peer: str | None, now: float) -> list[Effect]:
    ex = job.executor or A
    event: Any
    if kind == "bid":
        event = bid(peer or A)
    elif kind == "nobid":
        event = nobid(peer or A)
    elif kind == "progress":
        event = frame(job, progress(ex))
    elif kind == "receipt":
        event = frame(job, receipt(ex))
    elif kind == "bad_receipt":
        event = frame(job, receipt(ex, inputs_cid="bafkreiwronginputswronginputs"))
    elif kind == "failure":
        event = frame(job, failure(ex, partial_result_cid="bafybeipartialpartial"))
    elif kind == "retryable":
        event = frame(job, failure(ex, retryable=True))
    elif kind == "lost":
        event = StreamLost(job.attempt, "EOF")
    elif kind == "fetched":
        event = ResultFetched(job.attempt, RESULT, GOOD_DIGESTS)
    elif kind == "unavailable":
        event = ResultUnavailable(job.attempt, "gone")
    elif kind == "partial":
        event = PartialFetched(job.attempt, "bafybeipartialpartial")
    elif kind == "cancel":
        event = CancelAsked("user")
    elif kind == "canceled":
        event = frame(job, failure(ex, code="CANCELED"))
    elif kind == "restart":
        event = Restarted()
    else:
        event = Tick(3)
    return job.handle(event, now)


def run_sequence(steps: list[tuple[str, str | None]]) -> tuple[RequesterJob, list[Effect]]:
    job = new_job()
    record = job.handle(Start(3), T0)
    status: JobStatus | None = S.BIDDING
    now = T0
    for kind, peer in steps:
        now += 0.3
        effects = feed(job, kind, peer, now)
        for move in of(effects, Move):
            assert move.source == status, (move, status)  # moves chain: the store's CAS holds
            assert TABLE[Role.REQUESTER, move.source, move.trigger] == move.target
            status = move.target
        record += effects
    assert job.status == status
    return job, record


@given(st.lists(EVENTS, max_size=40))
def test_random_sequences_never_break_the_table(steps: list[tuple[str, str | None]]) -> None:
    job, _ = run_sequence(steps)
    assert len(job.tried) <= POLICY.max_retries + 1
    assert len(set(job.tried)) == len(job.tried)  # never the same executor twice


@given(st.lists(EVENTS, max_size=40))
def test_every_job_ends_terminal_once_time_passes(steps: list[tuple[str, str | None]]) -> None:
    job, _ = run_sequence(steps)
    now = T0 + 0.3 * len(steps)
    for _ in range(50):
        if job.finished:
            break
        deadline = job.next_deadline(now)
        assert deadline is not None, job.status
        now = max(now, deadline)
        job.handle(Tick(3), now)
        # Whatever the executor was doing, time alone ends the job.
    assert job.finished, (job.status, job.stage)


class RequesterMachine(RuleBasedStateMachine):
    """Interleaved bids, executor words, cancels and time: status only ever follows the table."""

    def __init__(self) -> None:
        super().__init__()
        self.job = new_job()
        self.status: JobStatus | None = S.PENDING
        self.now = T0
        self.apply(self.job.handle(Start(2), self.now))

    def apply(self, effects: list[Effect]) -> None:
        for move in of(effects, Move):
            assert move.source == self.status
            self.status = move.target
        accepts = of(effects, SendAccept)
        assert len(accepts) <= 1
        for send in accepts:
            assert send.accept.provider == self.job.executor
            assert send.accept.provider not in self.job.tried

    @rule(kind=EVENTS, dt=st.floats(min_value=0.0, max_value=3.0))
    def step(self, kind: tuple[str, str | None], dt: float) -> None:
        self.now += dt
        self.apply(feed(self.job, kind[0], kind[1], self.now))

    @precondition(lambda self: not self.job.finished)
    @rule()
    def wait_for_deadline(self) -> None:
        deadline = self.job.next_deadline(self.now)
        assert deadline is not None
        self.now = max(self.now, deadline)
        self.apply(self.job.handle(Tick(2), self.now))

    @invariant()
    def consistent(self) -> None:
        assert self.job.status == self.status
        if self.job.finished:
            assert self.job.next_deadline(self.now) is None
        if self.status in (S.ASSIGNED, S.RUNNING):
            assert self.job.executor is not None


TestRequesterMachine = RequesterMachine.TestCase


# ---- compute side ---------------------------------------------------------------------------


def compute(status: JobStatus | None = None) -> ComputeJob:
    return ComputeJob(job_id=JOB_ID, me=A, requester=ME, status=status)


def test_compute_happy_path_and_heartbeats() -> None:
    job = compute()
    move = job.accepted(1.5)
    assert (move.source, move.target, move.fields["executor"]) == (None, S.ASSIGNED, A)
    assert job.next_deadline() is not None
    effects = job.handle(WorkStarted(), T0)
    assert moves(effects) == [(S.ASSIGNED, S.RUNNING)]
    assert isinstance(of(effects, SendFrame)[0].message, Progress)
    assert job.handle(WorkStarted(), T0) == []
    assert job.handle(Tick(), T0 + 0.5) == []
    beat = job.handle(Tick(), T0 + 1.0)
    sent = of(beat, SendFrame)[0].message
    assert isinstance(sent, Progress) and sent.substate == "warming_up"
    effects = job.handle(Progressed("processing", 40.0), T0 + 1.2)
    assert of(effects, SetProgress)[0].progress == 40.0
    beat = job.handle(Tick(), T0 + 2.2)
    assert of(beat, SendFrame)[0].message.progress == 40.0
    effects = job.handle(RunSucceeded(receipt(A)), T0 + 3)
    assert moves(effects) == [(S.RUNNING, S.COMPLETED)]
    assert isinstance(of(effects, SendFrame)[0].message, Receipt)
    assert job.next_deadline() is None and job.handle(Tick(), T0 + 9) == []


def test_compute_progress_points_closer_than_the_interval_are_coalesced() -> None:
    """A point replaced within PROGRESS_INTERVAL is never sent; the newest one is, by a Tick."""
    job = compute()
    job.accepted(1.0)
    dt = job.progress_interval
    first = job.handle(WorkStarted(), T0)
    assert of(first, SendFrame)[0].message.substate == "warming_up"  # always at once
    assert job.next_deadline() == T0 + job.heartbeat
    assert job.handle(Progressed("processing", 5.0), T0 + dt / 4) == []
    assert job.held and job.next_deadline() == T0 + dt  # the driver wakes sooner
    assert job.handle(Progressed("processing", 60.0), T0 + dt / 2) == []
    assert job.handle(Tick(), T0 + dt / 2) == []
    sent = job.handle(Tick(), T0 + 1.01 * dt)
    assert [f.message.progress for f in of(sent, SendFrame)] == [60.0]  # only the newest
    assert of(sent, SetProgress)[0].progress == 60.0
    assert not job.held and job.next_deadline() == T0 + 1.01 * dt + job.heartbeat
    # Far enough apart, every point goes out as it comes.
    later = job.handle(Progressed("finalizing", 92.0), T0 + 2.02 * dt)
    assert of(later, SendFrame)[0].message.substate == "finalizing"
    # A point held back when the run ends is dropped: the receipt says more.
    assert job.handle(Progressed("uploading", 95.0), T0 + 2.02 * dt + 0.001) == []
    done = job.handle(RunSucceeded(receipt(A)), T0 + 2.02 * dt + 0.002)
    assert [type(f.message) for f in of(done, SendFrame)] == [Receipt]
    assert job.next_deadline() is None


def test_compute_queued_is_never_held_back() -> None:
    job = compute()
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    queued = job.handle(Progressed("queued", 0.0), T0 + 0.001)
    assert of(queued, SendFrame)[0].message.substate == "queued"


def test_compute_records_the_slots_a_job_runs_on() -> None:
    job = compute()
    job.accepted(1.0)
    waiting = job.handle(Progressed("queued", 0.0), T0)
    assert job.status == S.ASSIGNED and of(waiting, SendFrame)[0].message.substate == "queued"
    beat = job.handle(Tick(), T0 + 1.0)
    assert of(beat, SendFrame)[0].message.substate == "queued"
    effects = job.handle(WorkStarted(("cpu:1",)), T0 + 2)
    move = next(e for e in effects if isinstance(e, Move))
    assert move.data == {"slots": ["cpu:1"]} and job.status == S.RUNNING


def test_compute_cancel_only_from_the_requester() -> None:
    job = compute()
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    assert job.handle(CancelFrame(B, "not yours"), T0 + 1) == []
    effects = job.handle(CancelFrame(ME, ""), T0 + 1)
    assert moves(effects) == [(S.RUNNING, S.CANCELING)]
    assert of(effects, StopWork)[0].reason == "canceled by the requester"
    assert job.handle(Progressed("processing", 50.0), T0 + 1.1) == []
    assert job.handle(CancelFrame(ME, "again"), T0 + 1.1) == []
    effects = job.handle(WorkStopped({"wall_seconds": 1.0}), T0 + 1.2)
    assert moves(effects) == [(S.CANCELING, S.CANCELED)]
    sent = of(effects, SendFrame)[0].message
    assert isinstance(sent, Failure) and sent.code == "CANCELED"
    assert sent.resources == {"wall_seconds": 1.0}


def test_compute_requester_gone_detaches_the_run_which_goes_on() -> None:
    job = compute()
    job.accepted(1.0, accepted_at=T0)
    effects = job.handle(RequesterGone("EOF"), T0)
    assert logs(effects) == ["RequesterLost"] and not of(effects, StopWork)
    assert job.status == S.ASSIGNED and not job.attached
    assert job.handle(RequesterGone("again"), T0) == []  # said once
    assert job.next_deadline() is None  # no heartbeat to nobody
    started = job.handle(WorkStarted(), T0 + 1)
    assert moves(started) == [(S.ASSIGNED, S.RUNNING)] and not of(started, SendFrame)
    assert of(started, SetProgress)  # the record still follows the run
    assert job.handle(Tick(), T0 + 5) == []
    assert job.handle(WorkStopped(), T0) == []  # nothing was stopped
    done = job.handle(RunSucceeded(receipt(A), b"signed"), T0 + 6)
    assert moves(done) == [(S.RUNNING, S.COMPLETED)] and not of(done, SendFrame)
    assert of(done, Move)[0].fields["receipt_envelope"] == b"signed"  # kept for a Resume


def test_compute_a_resume_re_attaches_a_detached_run() -> None:
    job = compute()
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    job.handle(Progressed("processing", 30.0), T0 + 0.5)
    job.handle(RequesterGone("StreamReset"), T0 + 1)
    assert job.handle(ResumeAsked(B), T0 + 2) == []  # not its requester
    assert not job.attached
    effects = job.handle(ResumeAsked(ME), T0 + 2)
    assert logs(effects) == ["Resumed"] and job.attached
    sent = of(effects, SendFrame)[0].message
    assert isinstance(sent, Progress) and sent.progress == 30.0  # where it stands, at once
    assert job.next_deadline() == T0 + 2 + job.heartbeat
    failed = job.handle(RunFailed(ErrorCode.EXECUTION_FAILED, "boom"), T0 + 3)
    assert isinstance(of(failed, SendFrame)[0].message, Failure)
    assert job.handle(ResumeAsked(ME), T0 + 4) == []  # ended: answered from the record


def test_compute_a_resume_while_canceling_waits_for_the_cancel() -> None:
    job = compute()
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    job.handle(CancelFrame(ME, "stop"), T0 + 1)
    job.handle(RequesterGone("EOF"), T0 + 1.1)  # canceling: nothing to detach
    assert job.attached
    effects = job.handle(ResumeAsked(ME), T0 + 1.2)
    assert logs(effects) == ["Resumed"] and not of(effects, SendFrame)
    stopped = job.handle(WorkStopped(), T0 + 1.3)
    assert of(stopped, SendFrame)[0].message.code == "CANCELED"
    assert compute(None).handle(ResumeAsked(ME), T0) == []


def test_compute_work_stopped_without_a_cancel_is_ignored() -> None:
    job = compute()
    job.accepted(1.0)
    assert job.handle(WorkStopped(), T0) == []


@pytest.mark.parametrize(
    ("code", "details", "status", "retryable"),
    [
        (ErrorCode.EXECUTION_FAILED, {"exit_code": -9}, S.FAILED, True),
        (ErrorCode.EXECUTION_FAILED, {}, S.FAILED, False),
        (ErrorCode.TIMEOUT, {}, S.TIMEOUT, False),
        (ErrorCode.CID_NOT_FOUND, {}, S.FAILED, False),
    ],
)
def test_compute_failures_are_classified(
    code: ErrorCode, details: dict[str, Any], status: JobStatus, retryable: bool
) -> None:
    job = compute()
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    effects = job.handle(RunFailed(code, "broke", details, "bafybeipartialpartial"), T0 + 1)
    move = of(effects, Move)[0]
    assert move.target == status
    sent = of(effects, SendFrame)[0].message
    assert isinstance(sent, Failure)
    assert sent.retryable is retryable and sent.partial_result_cid == "bafybeipartialpartial"
    assert move.fields["error"]["details"]["partial_result_cid"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "target"),
    [(S.ASSIGNED, S.FAILED), (S.RUNNING, S.FAILED), (S.CANCELING, S.CANCELED)],
)
def test_compute_restart_ends_every_live_record(status: JobStatus, target: JobStatus) -> None:
    effects = compute(status).handle(Restarted(), T0)
    assert of(effects, Move)[0].target == target
    assert compute(None).handle(Restarted(), T0) == []
    assert compute(S.COMPLETED).handle(Restarted(), T0) == []


def test_compute_cancel_after_the_end_does_nothing() -> None:
    job = compute(S.CANCELING)
    assert job.handle(RequesterGone("x"), T0) == []
    assert job.handle(RunSucceeded(receipt(A)), T0) == []


@pytest.mark.parametrize("status", [S.BIDDING, S.RUNNING, S.CANCELING])
def test_a_crash_in_the_driver_ends_the_job_instead_of_leaving_it_stuck(status: JobStatus) -> None:
    job = RequesterJob(
        job_id=JOB_ID, me=ME, spec=SPEC, spec_cid=SPEC_CID, policy=POLICY, status=status
    )
    effects = job.handle(Crashed("KeyError: x"), T0)
    move = of(effects, Move)[0]
    assert move.target == (S.CANCELED if status == S.CANCELING else S.FAILED)
    assert move.fields["error"]["code"] == "INTERNAL_ERROR"  # type: ignore[index]
    assert compute(S.RUNNING).handle(Crashed("x"), T0)[0].target == S.FAILED  # type: ignore[union-attr]
    assert compute(None).handle(Crashed("x"), T0) == []


def test_a_result_over_the_nodes_limit_ends_the_job_before_any_fetch() -> None:
    job = assigned(A, B)
    effects = job.handle(frame(job, receipt(A, result_bytes=POLICY.max_result_bytes + 1)), T0 + 1)
    assert not of(effects, FetchResult)
    move = of(effects, Move)[-1]
    assert move.target == S.FAILED
    assert move.fields["error"]["code"] == "CONTENT_TOO_LARGE"  # type: ignore[index]


def test_the_result_fetch_is_bounded_by_what_the_receipt_declares() -> None:
    job = assigned(A)
    effects = job.handle(frame(job, receipt(A, result_bytes=1234)), T0 + 1)
    assert of(effects, FetchResult)[0].max_bytes == 1234
    job = assigned(A)
    partial = failure(A, partial_result_cid="bafybeipartialpartial")
    effects = job.handle(frame(job, partial), T0 + 1)
    assert of(effects, FetchPartial)[0].max_bytes == POLICY.max_result_bytes


def test_a_resumed_executor_has_time_to_come_back_before_it_is_given_up() -> None:
    job = restarted_job(S.RUNNING, executor=A)
    job.handle(recovered(), T0)
    wait = POLICY.resume_wait
    assert job.next_deadline(T0) == T0 + wait  # not the usual silence: it may be reconnecting
    assert job.handle(Tick(), T0 + POLICY.silence + 1) == []
    effects = job.handle(Tick(), T0 + wait)
    assert "no answer to the Resume" in str(of(effects, Record)[0].data["reason"])
    assert job.executor == B  # the next bid
    job = restarted_job(S.RUNNING, executor=A)
    job.handle(recovered(), T0)
    job.handle(frame(job, progress(A)), T0 + 1)  # answered: the usual silence from now on
    assert job.next_deadline(T0 + 1) == T0 + wait
    effects = job.handle(Tick(), T0 + wait + POLICY.silence)
    assert "silent for" in str(of(effects, Record)[0].data["reason"])

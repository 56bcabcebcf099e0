"""Every signed message, replayed or forwarded to a peer it was not meant for, changes nothing.

A signature says who said something, not when or to whom: anyone who has
seen a signed message can send its exact bytes again (a replay) or hand them
to another peer (a forward). For each message type this file replays and
forwards real sealed envelopes (crypto.envelope.seal, then open_envelope as a
node does) into the pure machines and checks that decide what they mean
(protocol.lifecycle, protocol.policy, the gossip validators' open_gossip and
the provider table), and asserts that nothing moves: no new status, no new
record, no bid counted twice, no executor chosen again, no result taken from
the wrong signer.

What needs the wire (an Accept forwarded to and replayed at a real compute
node, a spec replayed over gossip, a Provide replayed and re-authored over
gossip) is in test_replay_wire.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity, b58decode
from node.content.providers import Providers
from node.roles.context import job_id_of
from node.transport.gossip import open_gossip
from protocol.errors import MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import (
    BidIn,
    CancelFrame,
    ComputeJob,
    Effect,
    ExecutorFrame,
    FetchResult,
    KeepResult,
    Move,
    NoBidIn,
    Record,
    RequesterGone,
    RequesterJob,
    ResultFetched,
    ResumeAsked,
    RunSucceeded,
    SaveBid,
    SetProgress,
    Stage,
    StreamLost,
    Tick,
    WorkStarted,
    WorkStopped,
)
from protocol.market import ExpiringSet
from protocol.messages import (
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Provide,
    Receipt,
    Resume,
    WireModel,
)
from protocol.policy import accept_problem, resume_problem
from storage.cid import Cid, cid_for_raw
from tests.protocol.test_lifecycle import (
    GOOD_DIGESTS,
    ME,
    RESULT,
    T0,
    bidding,
    logs,
    of,
    receipt,
)
from tests.protocol.test_messages import ALICE, JOB_ID, sample_fields

S = JobStatus
REQUESTER = ALICE  # signs SPEC (tests.protocol.test_lifecycle.ME)
EXEC_A, EXEC_B, EXEC_C = (Identity(bytes([i + 40]) * 32) for i in range(3))
A, B, C = EXEC_A.peer_id, EXEC_B.peer_id, EXEC_C.peer_id
OTHER_JOB = str(cid_for_raw(b"another job, same network"))
OTHER_REQUESTER = Identity(bytes([77]) * 32)
PROVIDED = str(cid_for_raw(b"a result some node stores"))

assert REQUESTER.peer_id == ME


# ---- sealed messages, opened as a node opens them ---------------------------------------


def sealed(identity: Identity, message: WireModel) -> tuple[WireModel, str, bytes]:
    envelope = seal(identity, message)
    opened = open_envelope(envelope)
    return opened.message, opened.signer, envelope


def bid_in(identity: Identity, job_id: str = JOB_ID, price: float = 1.0) -> BidIn:
    message, _, envelope = sealed(
        identity,
        Bid(
            job_id=job_id,
            provider=identity.peer_id,
            price=price,
            eta_seconds=1.0,
            execution_providers=["CPUExecutionProvider"],
            device="cpu",
            created_at=T0,
        ),
    )
    assert isinstance(message, Bid)
    return BidIn(message, envelope)


def nobid_in(identity: Identity, job_id: str = JOB_ID) -> NoBidIn:
    message, _, envelope = sealed(
        identity,
        NoBid(job_id=job_id, provider=identity.peer_id, reason="NO_GPU", message="no GPU"),
    )
    assert isinstance(message, NoBid)
    return NoBidIn(message, envelope)


def progress_of(identity: Identity, job_id: str = JOB_ID, pct: float = 40.0) -> Progress:
    return Progress(
        job_id=job_id, provider=identity.peer_id, substate="processing", progress=pct, at=T0
    )


def receipt_of(identity: Identity, job_id: str = JOB_ID) -> Receipt:
    return receipt(identity.peer_id, job_id=job_id)


def failure_of(identity: Identity, job_id: str = JOB_ID, **kw: Any) -> Failure:
    return Failure(
        job_id=job_id, provider=identity.peer_id, code="EXECUTION_FAILED", message="boom", **kw
    )


def on_stream(job: RequesterJob, identity: Identity, message: WireModel) -> ExecutorFrame:
    """`message` signed by `identity`, arriving on the job stream of the current attempt."""
    opened, signer, envelope = sealed(identity, message)
    return ExecutorFrame(job.attempt, signer, opened, envelope)


def replayed(frame: ExecutorFrame, attempt: int | None = None) -> ExecutorFrame:
    """The very same bytes again, on the current attempt's stream or an older one's."""
    opened = open_envelope(frame.envelope)
    return ExecutorFrame(
        frame.attempt if attempt is None else attempt, opened.signer, opened.message, frame.envelope
    )


def assigned_to(*executors: Identity, now: float = T0 + 0.5) -> RequesterJob:
    """A job in bidding, one sealed bid per executor (cheapest first), the first one accepted."""
    job = bidding(topic_peers=len(executors))
    for i, ex in enumerate(executors):
        job.handle(bid_in(ex, price=1.0 + i), T0 + 0.01 * (i + 1))
    if job.executor is None:
        job.handle(Tick(len(executors)), now)
    assert job.status == S.ASSIGNED and job.executor == executors[0].peer_id
    return job


def state(job: RequesterJob) -> tuple[Any, ...]:
    """Everything a replay or a forward must leave as it was."""
    return (
        job.status,
        job.executor,
        job.attempt,
        job.stage,
        dict(job.bids),
        dict(job.refusals),
        list(job.tried),
        job.receipt,
        job.failure,
        job.last_progress,
    )


def nothing(effects: list[Effect]) -> bool:
    return effects == []


def completed(job: RequesterJob, executor: Identity, now: float = T0 + 2) -> None:
    effects = job.handle(on_stream(job, executor, receipt_of(executor)), now)
    assert of(effects, FetchResult)
    job.handle(ResultFetched(job.attempt, RESULT, GOOD_DIGESTS), now + 0.1)
    assert job.status == S.COMPLETED


# ---- Bid ----------------------------------------------------------------------------------


def test_a_replayed_bid_counts_once_at_every_stage() -> None:
    job = bidding(topic_peers=3)
    first = bid_in(EXEC_A)
    effects = job.handle(first, T0 + 0.01)
    assert of(effects, SaveBid) and logs(effects) == ["BidReceived"]
    for now in (T0 + 0.02, T0 + 0.03):
        before = state(job)
        assert nothing(job.handle(BidIn(first.bid, first.envelope), now))
        assert state(job) == before
    job.handle(bid_in(EXEC_B, price=2.0), T0 + 0.04)
    job.handle(bid_in(EXEC_C, price=3.0), T0 + 0.05)  # all answered: A wins
    assert job.executor == A
    before = state(job)
    assert nothing(job.handle(first, T0 + 0.5))  # while assigned
    assert state(job) == before
    job.handle(StreamLost(job.attempt, "EOF"), T0 + 1)  # A lost: B next
    assert job.executor == B
    before = state(job)
    assert nothing(job.handle(first, T0 + 1.1))  # A's old bid cannot bring it back
    assert state(job) == before and A in job.tried
    completed(job, EXEC_B)
    assert nothing(job.handle(first, T0 + 3))


def test_a_bid_forwarded_to_another_job_changes_nothing() -> None:
    job = bidding(topic_peers=2)
    before = state(job)
    assert nothing(job.handle(bid_in(EXEC_A, job_id=OTHER_JOB), T0 + 0.01))
    assert state(job) == before and not job.bids


# ---- NoBid --------------------------------------------------------------------------------


def test_a_replayed_refusal_counts_once_and_cannot_withdraw_a_bid() -> None:
    job = bidding(topic_peers=3)
    refusal = nobid_in(EXEC_A)
    assert logs(job.handle(refusal, T0 + 0.01)) == ["NoBid"]
    before = state(job)
    assert nothing(job.handle(refusal, T0 + 0.02))
    assert state(job) == before
    job.handle(bid_in(EXEC_B), T0 + 0.03)
    before = state(job)
    assert nothing(job.handle(nobid_in(EXEC_B), T0 + 0.04))  # B's old refusal, replayed
    assert state(job) == before and B in job.bids


def test_a_refusal_forwarded_to_another_job_changes_nothing() -> None:
    job = bidding(topic_peers=2)
    before = state(job)
    assert nothing(job.handle(nobid_in(EXEC_A, job_id=OTHER_JOB), T0 + 0.01))
    assert state(job) == before


# ---- Accept -------------------------------------------------------------------------------


def _accept(provider: str, signer: Identity = REQUESTER) -> tuple[Accept, str, bytes]:
    message, who, envelope = sealed(
        signer,
        Accept(
            job_id=JOB_ID, requester=signer.peer_id, provider=provider, price=1.0, accepted_at=T0
        ),
    )
    assert isinstance(message, Accept)
    return message, who, envelope


def test_an_accept_forwarded_to_another_bidder_is_refused_before_its_offer_is_touched() -> None:
    accept, signer, _ = _accept(A)
    # B bid on the same job and still holds its offer: the forwarded Accept names A.
    assert accept_problem(accept, signer, B, ME, T0) == "accept names another executor"
    # ... and is refused the same way by a node that never bid at all.
    assert accept_problem(accept, signer, C, None, T0) == "accept names another executor"
    assert accept_problem(accept, signer, A, ME, T0) is None  # the winner takes it


def test_a_replayed_accept_is_refused_once_the_offer_is_taken() -> None:
    accept, signer, _ = _accept(A)
    # The first Accept consumes A's offer (compute role); a replay finds none.
    assert accept_problem(accept, signer, A, None, T0 + 1) == "unknown job"
    # The job's machine, once accepted, cannot be accepted again.
    job = ComputeJob(job_id=JOB_ID, me=A, requester=ME)
    job.accepted(1.0)
    with pytest.raises(MeshrunError):
        job.accepted(1.0)
    assert job.status == S.ASSIGNED


def test_an_accept_re_signed_by_someone_else_is_not_the_requesters() -> None:
    forged, signer, _ = _accept(A, signer=OTHER_REQUESTER)
    assert accept_problem(forged, signer, A, ME, T0) == "accept not signed by the job's requester"


def test_an_accept_forwarded_back_onto_a_job_stream_costs_the_forwarder_only() -> None:
    job = assigned_to(EXEC_A, EXEC_B)
    accept, signer, envelope = _accept(A)
    effects = job.handle(ExecutorFrame(job.attempt, signer, accept, envelope), T0 + 1)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"  # not the executor's word
    assert job.executor == B and job.status == S.ASSIGNED


# ---- Progress -----------------------------------------------------------------------------


def test_a_replayed_progress_is_only_a_heartbeat_and_an_old_attempts_is_ignored() -> None:
    job = assigned_to(EXEC_A, EXEC_B)
    frame = on_stream(job, EXEC_A, progress_of(EXEC_A, pct=40.0))
    effects = job.handle(frame, T0 + 1)
    assert logs(effects) == ["ExecutionStarted", "Progress"]
    before = state(job)
    effects = job.handle(replayed(frame), T0 + 2)
    assert not of(effects, Record) and not of(effects, SetProgress) and not of(effects, Move)
    assert state(job) == before
    job.handle(StreamLost(job.attempt, "EOF"), T0 + 3)  # A lost: B's attempt now
    before = state(job)
    assert nothing(job.handle(replayed(frame, attempt=1), T0 + 3.5))
    assert state(job) == before and job.executor == B


def test_a_forwarded_progress_is_never_taken_as_the_forwarders() -> None:
    job = assigned_to(EXEC_B, EXEC_C)
    # B puts A's genuine Progress for this job on its own stream.
    effects = job.handle(on_stream(job, EXEC_A, progress_of(EXEC_A)), T0 + 1)
    assert not of(effects, SetProgress) and "Progress" not in logs(effects)
    assert "ExecutionStarted" not in logs(effects)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"
    assert job.executor == C and job.last_progress is None
    # A progress signed by the executor but for another job: not this job's progress either.
    effects = job.handle(on_stream(job, EXEC_C, progress_of(EXEC_C, job_id=OTHER_JOB)), T0 + 2)
    assert "Progress" not in logs(effects) and job.status == S.FAILED


# ---- Receipt ------------------------------------------------------------------------------


def test_a_replayed_receipt_is_fetched_once_and_ignored_after_the_end() -> None:
    job = assigned_to(EXEC_A)
    frame = on_stream(job, EXEC_A, receipt_of(EXEC_A))
    assert len(of(job.handle(frame, T0 + 1), FetchResult)) == 1
    before = state(job)
    assert nothing(job.handle(replayed(frame), T0 + 1.1))
    assert state(job) == before and job.stage == Stage.FETCHING
    effects = job.handle(ResultFetched(job.attempt, RESULT, GOOD_DIGESTS), T0 + 1.2)
    assert len(of(effects, KeepResult)) == 1 and job.status == S.COMPLETED
    assert nothing(job.handle(replayed(frame), T0 + 2))


def test_a_receipt_replayed_from_another_job_does_not_complete_this_one() -> None:
    job = assigned_to(EXEC_A, EXEC_B)
    effects = job.handle(on_stream(job, EXEC_A, receipt_of(EXEC_A, job_id=OTHER_JOB)), T0 + 1)
    assert not of(effects, FetchResult) and job.executor == B and A in job.tried


def test_a_forwarded_receipt_is_never_the_forwarders_result() -> None:
    job = assigned_to(EXEC_B, EXEC_C)
    # B hands over A's genuine receipt for this very job (say A ran it elsewhere).
    effects = job.handle(on_stream(job, EXEC_A, receipt_of(EXEC_A)), T0 + 1)
    assert not of(effects, FetchResult) and not of(effects, KeepResult)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"
    assert job.receipt is None and job.executor == C
    assert job.status != S.COMPLETED


# ---- Failure ------------------------------------------------------------------------------


def test_a_failure_replayed_from_an_abandoned_attempt_is_ignored() -> None:
    job = assigned_to(EXEC_A, EXEC_B)
    old = on_stream(job, EXEC_A, failure_of(EXEC_A, retryable=True))
    job.handle(old, T0 + 1)  # retryable (its worker died): A lost, B's attempt
    assert job.executor == B and job.status == S.ASSIGNED
    before = state(job)
    assert nothing(job.handle(replayed(old, attempt=1), T0 + 1.5))
    assert state(job) == before


def test_a_final_failure_replayed_after_the_end_changes_nothing() -> None:
    job = assigned_to(EXEC_A)
    frame = on_stream(job, EXEC_A, failure_of(EXEC_A))
    job.handle(frame, T0 + 1)
    assert job.status == S.FAILED
    before = state(job)
    assert nothing(job.handle(replayed(frame), T0 + 2))
    assert state(job) == before


def test_a_forwarded_failure_does_not_fail_the_job_with_the_signers_code() -> None:
    job = assigned_to(EXEC_B, EXEC_C)
    effects = job.handle(on_stream(job, EXEC_A, failure_of(EXEC_A)), T0 + 1)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"
    assert job.status == S.ASSIGNED and job.executor == C and job.failure is None


# ---- Cancel -------------------------------------------------------------------------------


def _cancel(signer: Identity, job_id: str = JOB_ID) -> tuple[Cancel, str, bytes]:
    message, who, envelope = sealed(
        signer, Cancel(job_id=job_id, requester=signer.peer_id, reason="stop")
    )
    assert isinstance(message, Cancel)
    return message, who, envelope


def test_a_replayed_cancel_after_the_end_changes_nothing() -> None:
    cancel, signer, _ = _cancel(REQUESTER)
    job = ComputeJob(job_id=JOB_ID, me=A, requester=ME)
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    assert of(job.handle(CancelFrame(signer, cancel.reason), T0 + 1), Move)
    assert nothing(job.handle(CancelFrame(signer, cancel.reason), T0 + 1.1))  # while stopping
    job.handle(WorkStopped(), T0 + 1.2)
    assert job.status == S.CANCELED
    assert nothing(job.handle(CancelFrame(signer, cancel.reason), T0 + 2))
    done = ComputeJob(job_id=JOB_ID, me=A, requester=ME)
    done.accepted(1.0)
    done.handle(WorkStarted(), T0)
    done.handle(RunSucceeded(receipt_of(EXEC_A)), T0 + 1)
    assert done.status == S.COMPLETED
    assert nothing(done.handle(CancelFrame(signer, cancel.reason), T0 + 2))


def test_a_cancel_forwarded_from_another_requester_changes_nothing() -> None:
    cancel, signer, envelope = _cancel(OTHER_REQUESTER)
    job = ComputeJob(job_id=JOB_ID, me=A, requester=ME)
    job.accepted(1.0)
    job.handle(WorkStarted(), T0)
    assert nothing(job.handle(CancelFrame(signer, cancel.reason), T0 + 1))
    assert job.status == S.RUNNING
    # As the first frame of a job stream (where an Accept must come), it is not opened at all.
    with pytest.raises(MeshrunError):
        open_envelope(envelope, Accept)


# ---- Resume -------------------------------------------------------------------------------


def _resume(
    signer: Identity, job_id: str = JOB_ID, provider: str = A, created_at: float = T0 + 5
) -> tuple[Resume, str, bytes]:
    message, who, envelope = sealed(
        signer,
        Resume(
            job_id=job_id,
            requester=signer.peer_id,
            provider=provider,
            accepted_at=T0,
            created_at=created_at,
        ),
    )
    assert isinstance(message, Resume)
    return message, who, envelope


def detached_run() -> ComputeJob:
    """A job running on A whose requester's stream broke."""
    job = ComputeJob(job_id=JOB_ID, me=A, requester=ME)
    job.accepted(1.0, accepted_at=T0)
    job.handle(WorkStarted(), T0)
    job.handle(RequesterGone("EOF"), T0 + 1)
    assert not job.attached
    return job


def test_a_resume_is_answered_only_for_its_own_job_executor_and_accept() -> None:
    resume, signer, _ = _resume(REQUESTER)
    # Genuine, at the executor it names, over the requester's own connection.
    assert resume_problem(resume, signer, ME, A, ME, T0, T0 + 6) is None
    # Sent on to another executor that also ran a job for this requester.
    assert resume_problem(resume, signer, ME, B, ME, T0, T0 + 6) == "resume names another executor"
    # Its job id is signed: at an executor that never accepted that job it names nothing.
    assert resume_problem(resume, signer, ME, A, None, None, T0 + 6) == "unknown job"
    # It names the accept it follows: not one of an earlier run of the same job.
    assert resume_problem(resume, signer, ME, A, ME, T0 - 30, T0 + 6) == (
        "resume names another accept"
    )


def test_a_resume_for_another_requesters_job_is_refused() -> None:
    # Signed by someone else, naming a job this requester accepted on A.
    forged, signer, _ = _resume(OTHER_REQUESTER)
    problem = resume_problem(forged, signer, signer, A, ME, T0, T0 + 6)
    assert problem == "resume not signed by the job's requester"
    job = detached_run()
    assert nothing(job.handle(ResumeAsked(signer), T0 + 6))
    assert not job.attached  # the run's stream was not handed to the intruder


def test_a_forwarded_resume_cannot_take_over_the_job_stream() -> None:
    # The requester's genuine Resume, sent by a peer that captured it: the stream
    # comes from that peer, not from the signer.
    resume, signer, _ = _resume(REQUESTER)
    problem = resume_problem(resume, signer, OTHER_REQUESTER.peer_id, A, ME, T0, T0 + 6)
    assert problem == "resume forwarded by a peer that did not sign it"


def test_a_replayed_resume_is_refused_once_stale_and_changes_nothing_before() -> None:
    resume, signer, _ = _resume(REQUESTER)
    assert resume_problem(resume, signer, ME, A, ME, T0, T0 + 5 + 301) == "resume too old"
    job = detached_run()
    first = job.handle(ResumeAsked(signer), T0 + 6)
    assert logs(first) == ["Resumed"] and job.attached
    again = job.handle(ResumeAsked(signer), T0 + 6.5)  # the same request once more
    assert job.status == S.RUNNING and job.attached and not of(again, Move)
    job.handle(RunSucceeded(receipt_of(EXEC_A)), T0 + 7)
    assert nothing(job.handle(ResumeAsked(signer), T0 + 8))  # ended: nothing to re-attach


def test_a_resume_forwarded_onto_a_requesters_job_stream_costs_the_forwarder_only() -> None:
    job = assigned_to(EXEC_A, EXEC_B)
    resume, signer, envelope = _resume(REQUESTER)
    effects = job.handle(ExecutorFrame(job.attempt, signer, resume, envelope), T0 + 1)
    assert of(effects, Record)[0].data["code"] == "SIGNATURE_INVALID"
    assert job.executor == B and job.status == S.ASSIGNED
    # As the first frame of a job stream (where an Accept must come), it is not opened at all.
    with pytest.raises(MeshrunError):
        open_envelope(envelope, Accept)


# ---- JobSpec ------------------------------------------------------------------------------


def _spec_envelope(signer: Identity = REQUESTER) -> bytes:
    return seal(signer, JobSpec.model_validate(sample_fields("jobspec", signer.peer_id)))


def test_a_replayed_spec_is_the_same_job_and_is_remembered() -> None:
    envelope = _spec_envelope()
    again = bytes(envelope)
    assert job_id_of(again) == job_id_of(envelope)  # no second job id from the same bytes
    seen = ExpiringSet(16)  # what a compute node keeps (Compute._seen)
    spec = open_envelope(envelope, JobSpec).message
    assert isinstance(spec, JobSpec)
    seen.add(job_id_of(envelope), spec.expires_at, spec.created_at)
    assert job_id_of(again) in seen


def test_a_spec_re_authored_by_a_relay_is_dropped_at_the_gossip_validator() -> None:
    envelope = _spec_envelope()
    relay = Identity(bytes([90]) * 32).peer_id
    # Forwarded as is (origin = its signer): passes; re-published by the relay: dropped.
    assert open_gossip(envelope, JobSpec, relay, b58decode(ME), "job spec") is not None
    assert open_gossip(envelope, JobSpec, relay, b58decode(relay), "job spec") is None


# ---- Provide ------------------------------------------------------------------------------


class _Me:
    peer_id = Identity(bytes([91]) * 32).peer_id


def _provide(signer: Identity, at: float) -> bytes:
    return seal(
        signer,
        Provide(provider=signer.peer_id, addrs=["/ip4/127.0.0.1/tcp/4001"], cids=[PROVIDED], at=at),
    )


def _table(providers: Providers) -> list[tuple[str, list[str], float]]:
    return [(r.peer_id, r.addrs, r.seen_at) for r in providers.table.get(Cid.decode(PROVIDED))]


def test_a_replayed_provide_changes_no_record_and_cannot_refresh_it() -> None:
    providers = Providers(_Me())  # type: ignore[arg-type]
    announced_at = time.time() - 3600
    envelope = _provide(EXEC_A, announced_at)
    providers._record(envelope)
    before = _table(providers)
    assert before == [(A, ["/ip4/127.0.0.1/tcp/4001"], announced_at)]
    for _ in range(5):
        providers._record(bytes(envelope))
    assert _table(providers) == before  # the same record, as old as its signature says
    assert len(providers.table) == 1


def test_a_provide_re_authored_by_a_relay_is_dropped_at_the_gossip_validator() -> None:
    envelope = _provide(EXEC_A, time.time())
    relay = EXEC_B.peer_id
    assert open_gossip(envelope, Provide, relay, b58decode(A), "provider announcement")
    assert open_gossip(envelope, Provide, relay, b58decode(relay), "provider announcement") is None

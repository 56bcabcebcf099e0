"""The job lifecycle as two sans-io machines, one per role, in the manner of h11's ``_state.py``.

A role's I/O code (node/roles/) never decides anything about a job. It feeds
the job's machine small frozen events (a bid arrived, the executor said X, the
stream was lost, time passed, the user asked to cancel, the node restarted)
through ``handle(event, now)`` and carries out the effects it gets back, in
order: record a move, send an Accept, fetch a result, close the stream. The
machine owns every state decision: timeouts, the retry budget, when bidding
stops, which executor is tried next, what a receipt must say, how a failure
ends. So every branch, including the hostile ones (a receipt signed by someone
else, an executor that goes silent, a cancel racing completion), is a unit
test that starts no process.

All status changes come from one table, ``TABLE``: ``(role, state, trigger)
→ state``. A machine looks its next state up there and the job store refuses
any move whose source is not the record's current status, so the durable
record can only ever follow the table.

Threat: events carry messages from peers. The machine trusts nothing in them
beyond what the envelope layer checked (the signature): it compares signer,
job id and CIDs itself, and an executor that says anything unexpected loses
its attempt and is not chosen again for the job.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import TERMINAL, JobStatus
from protocol.market import bid_acceptable, rank_bids
from protocol.messages import (
    Accept,
    Bid,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Receipt,
    Resume,
    Tolerance,
    WireModel,
)
from protocol.policy import (
    HEARTBEAT,
    PROGRESS_INTERVAL,
    RequesterPolicy,
    classify_failure,
    error_code,
)
from protocol.receipts import Check, failed, receipt_checks, result_checks, summary
from protocol.redact import scrub
from protocol.reputation import STRANGER, Standing
from protocol.verification import Kind as VerifyKind
from protocol.verification import Next, Pair, decide, groups, pair, should_audit
from protocol.verification import Policy as VerifyPolicy


class Role(StrEnum):
    REQUESTER = "requester"
    COMPUTE = "compute"


class LogEvent(StrEnum):
    """Names in a job's durable event log; API clients and SQL match on these strings."""

    CREATED = "Created"
    PUBLISHED = "Published"
    REPUBLISHED = "Republished"
    BID_RECEIVED = "BidReceived"
    NO_BID = "NoBid"
    BID_REJECTED = "BidRejected"
    BID_ACCEPTED = "BidAccepted"
    EXECUTION_STARTED = "ExecutionStarted"
    PROGRESS = "Progress"
    RESULTS_PUBLISHED = "ResultsPublished"
    RECEIPT_VERIFIED = "ReceiptVerified"
    RECEIPT_REJECTED = "ReceiptRejected"
    PARTIAL_RESULTS_KEPT = "PartialResultsKept"
    COMPLETED = "Completed"
    FAILED = "Failed"
    TIMED_OUT = "TimedOut"
    CANCEL_REQUESTED = "CancelRequested"
    CANCELED = "Canceled"
    EXECUTOR_LOST = "ExecutorLost"
    RETRIED = "Retried"
    VERIFICATION_PLANNED = "VerificationPlanned"
    RESULTS_COMPARED = "ResultsCompared"
    TIEBREAK_STARTED = "TieBreakStarted"
    RESULTS_AGREED = "ResultsAgreed"
    RESULT_DISPUTED = "ResultDisputed"
    # A restarted requester picked the job up again (its bid window re-opened, or
    # it asked the executor where the job stands); on the executor, the requester
    # came back for it.
    RESUMED = "Resumed"
    # The executor lost the requester's stream and goes on with the run alone.
    REQUESTER_LOST = "RequesterLost"


class Trigger(StrEnum):
    """What makes a job change state: the event column of the table."""

    SUBMITTED = "submitted"
    PUBLISHED = "published"
    BID_ACCEPTED = "bid accepted"
    NO_BIDS = "no bids"
    EXECUTION_STARTED = "execution started"
    EXECUTOR_LOST = "executor lost, bids left"
    RETRIES_EXHAUSTED = "executor lost, no bids left"
    RESULT_VERIFIED = "result verified"
    VERIFICATION_FAILED = "results disagree"
    EXECUTOR_FAILED = "executor reported failure"
    EXECUTOR_TIMED_OUT = "executor reported timeout"
    DEADLINE_PASSED = "deadline passed"
    CANCEL_ASKED = "cancel asked"
    CANCEL_CONFIRMED = "cancel confirmed"
    RESTARTED = "node restarted"
    NOT_RESUMABLE = "restarted, cannot resume"
    ACCEPTED = "accept received"
    RESULT_SENT = "result published"
    RUN_FAILED = "run failed"
    RUN_TIMED_OUT = "run timed out"
    CRASHED = "internal error"


S, T, R = JobStatus, Trigger, Role
_LIVE_REQ = (S.PENDING, S.BIDDING, S.ASSIGNED, S.RUNNING)
_RUNNING = (S.ASSIGNED, S.RUNNING)


def _table() -> dict[tuple[Role, JobStatus | None, Trigger], JobStatus]:
    t: dict[tuple[Role, JobStatus | None, Trigger], JobStatus] = {
        (R.REQUESTER, None, T.SUBMITTED): S.PENDING,
        (R.REQUESTER, S.PENDING, T.PUBLISHED): S.BIDDING,
        (R.REQUESTER, S.BIDDING, T.BID_ACCEPTED): S.ASSIGNED,
        (R.REQUESTER, S.BIDDING, T.NO_BIDS): S.FAILED,
        (R.REQUESTER, S.ASSIGNED, T.EXECUTION_STARTED): S.RUNNING,
        (R.REQUESTER, S.RUNNING, T.RESULT_VERIFIED): S.COMPLETED,
        (R.REQUESTER, S.RUNNING, T.VERIFICATION_FAILED): S.FAILED,
        (R.REQUESTER, S.CANCELING, T.CANCEL_CONFIRMED): S.CANCELED,
        (R.REQUESTER, S.CANCELING, T.RESTARTED): S.CANCELED,
        (R.REQUESTER, S.CANCELING, T.CRASHED): S.CANCELED,
        (R.COMPUTE, None, T.ACCEPTED): S.ASSIGNED,
        (R.COMPUTE, S.ASSIGNED, T.EXECUTION_STARTED): S.RUNNING,
        (R.COMPUTE, S.RUNNING, T.RESULT_SENT): S.COMPLETED,
        (R.COMPUTE, S.CANCELING, T.CANCEL_CONFIRMED): S.CANCELED,
        (R.COMPUTE, S.CANCELING, T.RESTARTED): S.CANCELED,
        (R.COMPUTE, S.CANCELING, T.CRASHED): S.CANCELED,
    }
    for s in _RUNNING:
        t[R.REQUESTER, s, T.EXECUTOR_LOST] = S.BIDDING
        t[R.REQUESTER, s, T.RETRIES_EXHAUSTED] = S.FAILED
        t[R.REQUESTER, s, T.EXECUTOR_FAILED] = S.FAILED
        t[R.REQUESTER, s, T.EXECUTOR_TIMED_OUT] = S.TIMEOUT
        t[R.COMPUTE, s, T.RUN_FAILED] = S.FAILED
        t[R.COMPUTE, s, T.RUN_TIMED_OUT] = S.TIMEOUT
        t[R.COMPUTE, s, T.CANCEL_ASKED] = S.CANCELING
        t[R.COMPUTE, s, T.RESTARTED] = S.FAILED
        t[R.COMPUTE, s, T.CRASHED] = S.FAILED
    for s in _LIVE_REQ:
        t[R.REQUESTER, s, T.CANCEL_ASKED] = S.CANCELING
        t[R.REQUESTER, s, T.NOT_RESUMABLE] = S.FAILED
        t[R.REQUESTER, s, T.CRASHED] = S.FAILED
        if s != S.PENDING:
            t[R.REQUESTER, s, T.DEADLINE_PASSED] = S.TIMEOUT
    return t


TABLE: Mapping[tuple[Role, JobStatus | None, Trigger], JobStatus] = _table()


def next_status(role: Role, current: JobStatus | None, trigger: Trigger) -> JobStatus:
    try:
        return TABLE[role, current, trigger]
    except KeyError:
        state = current.value if current else "new"
        raise MeshrunError(
            ErrorCode.ILLEGAL_TRANSITION,
            f"a {role.value} job that is {state} cannot take '{trigger.value}'",
            {"role": role.value, "from": state, "trigger": trigger.value},
        ) from None


def legal_moves(role: Role | None = None) -> dict[JobStatus, frozenset[JobStatus]]:
    """Every status each status may move to, derived from the table."""
    moves: dict[JobStatus, set[JobStatus]] = {s: set() for s in JobStatus}
    for (r, source, _), target in TABLE.items():
        if source is not None and (role is None or r == role):
            moves[source].add(target)
    return {s: frozenset(targets) for s, targets in moves.items()}


LEGAL_MOVES: Mapping[JobStatus, frozenset[JobStatus]] = legal_moves()


def can_move(current: JobStatus, new: JobStatus) -> bool:
    """Whether some role may move a job from `current` to `new`."""
    return new in LEGAL_MOVES[current]


def transition(current: JobStatus, new: JobStatus) -> JobStatus:
    if not can_move(current, new):
        raise MeshrunError(
            ErrorCode.ILLEGAL_TRANSITION,
            f"a job cannot move from {current.value} to {new.value}",
            {"from": current.value, "to": new.value},
        )
    return new


def state_table_markdown() -> str:
    """The table as Markdown, for docs/design.md (regenerated by scripts/gen_docs.py)."""
    lines = ["| role | state | event | next state |", "|---|---|---|---|"]
    order = {s: i for i, s in enumerate(JobStatus)}
    for (role, source, trigger), target in sorted(
        TABLE.items(),
        key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else order[kv[0][1]], kv[0][2]),
    ):
        state = "(new)" if source is None else source.value
        lines.append(f"| {role.value} | {state} | {trigger.value} | {target.value} |")
    return "\n".join(lines) + "\n"


# ---- effects: what a driver must do, in order ---------------------------------------

# The record fields a move may set besides the status (the status itself is the move's).
MOVE_FIELDS = frozenset(
    {
        "executor",
        "result_cid",
        "receipt",
        "receipt_envelope",
        "error",
        "retry_count",
        "substate",
        "progress",
        "verification",
    }
)


@dataclass(frozen=True)
class Move:
    """Change the record's status from `source` to `target` and log `log`, atomically."""

    role: Role
    trigger: Trigger
    source: JobStatus | None
    target: JobStatus
    log: LogEvent
    peer: str | None
    data: Mapping[str, object] = field(default_factory=dict)
    fields: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.fields) - MOVE_FIELDS
        if unknown:
            raise ValueError(f"a move cannot set {sorted(unknown)}")
        if TABLE.get((self.role, self.source, self.trigger)) != self.target:
            raise MeshrunError(
                ErrorCode.ILLEGAL_TRANSITION,
                f"{self.source} -[{self.trigger}]-> {self.target} is not in the table",
            )


@dataclass(frozen=True)
class Record:
    """Append an event to the job's log without changing its status."""

    log: LogEvent
    peer: str | None
    data: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SetProgress:
    substate: str | None
    progress: float


@dataclass(frozen=True)
class SaveBid:
    provider: str
    kind: str  # "bid" | "nobid"
    envelope: bytes
    body: Mapping[str, object]


@dataclass(frozen=True)
class Publish:
    """Gossip the signed spec on the jobs topic."""


@dataclass(frozen=True)
class SendAccept:
    """Open a job stream to the accepted bidder and send this Accept on it.

    Everything the driver reports back about that stream carries `attempt`, so
    a late word from an abandoned attempt is never taken for the current one.
    """

    accept: Accept
    attempt: int


@dataclass(frozen=True)
class SendResume:
    """Open a resume stream to the executor of a job this node accepted before it
    restarted and send this Resume on it; report its frames as `attempt`'s, as
    for a SendAccept."""

    resume: Resume
    attempt: int


@dataclass(frozen=True)
class CloseStream:
    """Close the job stream of `attempt` (0: every open one), first asking the executor
    to stop when `cancel` is set."""

    cancel: str | None = None
    attempt: int = 0


@dataclass(frozen=True)
class SendCancel:
    reason: str
    attempt: int = 0


@dataclass(frozen=True)
class CompareResults:
    """Compare the output tensors of two fetched, verified results within `tolerance`,
    then report `Compared`."""

    a: int
    a_cid: str
    b: int
    b_cid: str
    tolerance: Tolerance


@dataclass(frozen=True)
class FetchResult:
    """Fetch the result DAG from `provider`, no more than `max_bytes` of it, then report
    its re-derived CID and file digests."""

    cid: str
    provider: str
    attempt: int
    max_bytes: int


@dataclass(frozen=True)
class FetchPartial:
    cid: str
    provider: str
    attempt: int
    max_bytes: int


@dataclass(frozen=True)
class KeepResult:
    """Pin (and announce, and mirror) a verified result under the job's name."""

    cid: str


@dataclass(frozen=True)
class SetVerification:
    """Store what the job's verification has seen so far (the record's `verification`)."""

    summary: Mapping[str, object]


@dataclass(frozen=True)
class Settle:
    """Sign a Settlement for this executor's receipt and deliver it (durably: resent
    until acknowledged). `outcome` is Settlement.outcome; a disputed one pays 0."""

    executor: str
    receipt: Receipt
    receipt_envelope: bytes
    price: float
    outcome: str


@dataclass(frozen=True)
class Observe:
    """Add to what this node knows of `peer` (node/jobs/reputation.py).

    `outcome`: won, completed, verified, disputed, failed, timed_out, lost.
    """

    peer: str
    outcome: str
    latency: float | None = None


@dataclass(frozen=True)
class SendFrame:
    """Compute side: sign and send this message on the job stream (or send `envelope`,
    the message already signed, when the node keeps those exact bytes)."""

    message: WireModel
    envelope: bytes | None = None


@dataclass(frozen=True)
class StopWork:
    """Compute side: cancel the running work; report `WorkStopped` when it has unwound."""

    reason: str


Effect = (
    Move
    | Record
    | SetProgress
    | SaveBid
    | Publish
    | SendAccept
    | SendResume
    | CloseStream
    | SendCancel
    | FetchResult
    | FetchPartial
    | KeepResult
    | SendFrame
    | StopWork
    | Settle
    | Observe
    | SetVerification
    | CompareResults
)


# ---- requester events ---------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The spec is stored and signed; publish it. `topic_peers`: peers on the jobs topic now."""

    topic_peers: int


@dataclass(frozen=True)
class Tick:
    """Time passed (the driver feeds one at `next_deadline()` or sooner)."""

    topic_peers: int = 0


@dataclass(frozen=True)
class BidIn:
    """A bid, with what this node knows of its bidder when it arrived."""

    bid: Bid
    envelope: bytes
    standing: Standing = STRANGER


@dataclass(frozen=True)
class NoBidIn:
    nobid: NoBid
    envelope: bytes


@dataclass(frozen=True)
class AcceptNotDelivered:
    attempt: int
    reason: str


@dataclass(frozen=True)
class ExecutorFrame:
    """A frame on the job stream, its envelope opened: `signer` signed `message`."""

    attempt: int
    signer: str
    message: WireModel
    envelope: bytes


@dataclass(frozen=True)
class BadFrame:
    """Bytes on the job stream that are not a valid envelope."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class StreamLost:
    attempt: int
    reason: str


@dataclass(frozen=True)
class ResultFetched:
    attempt: int
    rebuilt_cid: str
    file_digests: Mapping[str, str]
    stats: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultUnavailable:
    attempt: int
    reason: str


@dataclass(frozen=True)
class PartialFetched:
    attempt: int
    cid: str | None


@dataclass(frozen=True)
class Compared:
    """The outcome of a CompareResults: whether attempts `a` and `b` agree."""

    a: int
    b: int
    agree: bool
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class CancelAsked:
    reason: str


@dataclass(frozen=True)
class Restarted:
    """The node came back up and finds this job unfinished in its records."""


@dataclass(frozen=True)
class Recovered:
    """The node came back up and finds this job unfinished: pick it up where it was.

    What its records still hold comes with it: the bids (envelopes re-opened,
    with what this node knows of each bidder now), the executors already given
    up, the retries spent and, for the executor the job was assigned to, when
    its Accept was signed (None: not recorded, so there is nothing to resume)
    and at what price.
    """

    topic_peers: int = 0
    bids: tuple[BidIn, ...] = ()
    tried: tuple[str, ...] = ()
    retries: int = 0
    accepted_at: float | None = None
    price: float | None = None


@dataclass(frozen=True)
class Crashed:
    """The node's own code failed while driving the job: end it rather than leave it stuck."""

    message: str


def _crashed(job: _Machine, message: str) -> list[Effect]:
    if job.status is None:
        return []
    err = _error(ErrorCode.INTERNAL_ERROR, message)
    log = LogEvent.CANCELED if job.status == S.CANCELING else LogEvent.FAILED
    return [job._move(Trigger.CRASHED, log, job.me, err, error=err)]


RequesterEvent = (
    Start
    | Tick
    | BidIn
    | NoBidIn
    | AcceptNotDelivered
    | ExecutorFrame
    | BadFrame
    | StreamLost
    | ResultFetched
    | ResultUnavailable
    | PartialFetched
    | Compared
    | CancelAsked
    | Restarted
    | Recovered
    | Crashed
)

MAX_BIDS = 256
"""Bids and refusals kept per job; more peers than this answering is a flood."""

REPUBLISH_POLL = 0.25
"""While no bid has come, how often the topic is looked at for newly joined peers."""


class Stage(StrEnum):
    """Where one executor's run of the job is."""

    NONE = "none"  # over: lost, failed, rejected or stopped
    AWAITING = "awaiting"  # accept sent (or being sent); waiting for frames
    ANSWERED = "answered"  # its receipt passed the checks; its result not fetched (yet)
    FETCHING = "fetching"  # fetching its result
    FETCHED = "fetched"  # its result re-hashed to the receipt's CID and digests
    PARTIAL = "partial"  # a failure named a partial result; fetching it


_ANSWERED = (Stage.ANSWERED, Stage.FETCHING, Stage.FETCHED)


def _error(
    code: ErrorCode, message: str, details: Mapping[str, object] | None = None, retry: bool = False
) -> dict[str, object]:
    return {
        "code": code.value,
        "message": message,
        "details": dict(details or {}),
        "retryable": retry,
    }


class _Machine:
    """What both job machines share: whose move it is and how a move is made."""

    role: Role
    me: str
    status: JobStatus | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def _move(
        self,
        trigger: Trigger,
        log: LogEvent,
        peer: str | None,
        data: Mapping[str, object] | None = None,
        **fields: object,
    ) -> Move:
        target = next_status(self.role, self.status, trigger)
        move = Move(self.role, trigger, self.status, target, log, peer, dict(data or {}), fields)
        self.status = target
        return move


@dataclass
class Run:
    """One executor's run of the job (an attempt): its stream, its answer, its fate."""

    attempt: int
    executor: str
    price: float
    started: float
    purpose: str = "primary"  # primary | replica | audit | tiebreak | retry
    stage: Stage = Stage.AWAITING
    last_heard: float = 0.0
    last_progress: tuple[str, float] | None = None
    receipt: Receipt | None = None
    envelope: bytes | None = None
    outcome: str = "running"
    # Picked up after this node restarted (a Resume), not started by an Accept;
    # until then its silence is not counted (the executor may still be reconnecting).
    resumed: bool = False
    quiet_until: float = 0.0

    def silent_at(self, silence: float) -> float:
        """When this run has been silent too long."""
        return max(self.last_heard + silence, self.quiet_until)

    def summary(self) -> dict[str, object]:
        return {
            "peer": self.executor,
            "attempt": self.attempt,
            "purpose": self.purpose,
            "price": self.price,
            "result_cid": self.receipt.result_cid if self.receipt else None,
            "receipt_envelope_b64": (
                base64.b64encode(self.envelope).decode() if self.envelope else None
            ),
            "outcome": self.outcome,
        }


class RequesterJob(_Machine):
    """One job as its requester sees it: bidding, the runs on executors, the verdict.

    Under the `receipt` policy one executor runs the job at a time (the next bid
    is tried when it is lost). Under `redundant:K` K executors run it at once and
    under an audited `sample:P` two do; their answers settle the job through
    protocol/verification.py.
    """

    role = Role.REQUESTER

    def __init__(
        self,
        *,
        job_id: str,
        me: str,
        spec: JobSpec,
        spec_cid: str,
        policy: RequesterPolicy,
        window: float | None = None,
        status: JobStatus | None = None,
        executor: str | None = None,
        audit_draw: float = 1.0,
    ) -> None:
        self.job_id = job_id
        self.me = me
        self.spec = spec
        self.spec_cid = spec_cid
        self.policy = policy
        self.window = policy.bid_window if window is None else window
        self.status = status
        self.verify = VerifyPolicy.parse(spec.verification)
        self.audit_draw = audit_draw
        self.audited: bool | None = None
        self.bids: dict[str, Bid] = {}
        self.standings: dict[str, Standing] = {}
        self.refusals: dict[str, NoBid] = {}
        self.tried: list[str] = []
        self.runs: dict[int, Run] = {}
        self.attempt = 0
        self._executor = executor
        self.replacements = 0
        self.tiebreaks_left = 0
        self.same: dict[Pair, bool] = {}
        self.comparing: set[Pair] = set()
        self.diffs = (0.0, 0.0)
        self._last_summary: dict[str, object] | None = None
        self.expected = 0
        self.published_to = 0
        self.window_end = 0.0
        self.window_opened = 0.0
        self.settle_end: float | None = None
        self.deadline: float | None = None
        self.cancel_reason: str | None = None
        self.cancel_deadline: float | None = None
        self.failure: Failure | None = None

    # ---- the current run, for callers that think of one executor at a time -----------

    @property
    def current(self) -> Run | None:
        live = [r for r in self.runs.values() if r.stage != Stage.NONE]
        return max(live, key=lambda r: r.attempt) if live else None

    @property
    def executor(self) -> str | None:
        run = self.current
        if run is not None:
            return run.executor
        return self._executor if not self.runs else None

    @property
    def stage(self) -> Stage:
        run = self.current
        return run.stage if run is not None else Stage.NONE

    @property
    def receipt(self) -> Receipt | None:
        run = self.current
        return run.receipt if run is not None else None

    @property
    def last_progress(self) -> tuple[str, float] | None:
        run = self.current
        return run.last_progress if run is not None else None

    def _live(self) -> list[Run]:
        return [r for r in self.runs.values() if r.stage != Stage.NONE]

    def _awaiting(self) -> list[Run]:
        return [r for r in self.runs.values() if r.stage == Stage.AWAITING]

    # ---- moves --------------------------------------------------------------------

    def create(self) -> Move:
        return self._move(
            Trigger.SUBMITTED,
            LogEvent.CREATED,
            self.me,
            {"role": "requester", "verification": str(self.verify)},
        )

    # ---- the one entry point ------------------------------------------------------

    def handle(self, event: RequesterEvent, now: float) -> list[Effect]:
        if self.finished:
            return []
        if isinstance(event, Restarted):
            return self._restarted()
        if isinstance(event, Recovered):
            return self._recovered(event, now)
        if isinstance(event, Crashed):
            return [CloseStream(), *_crashed(self, event.message)]
        if isinstance(event, Start):
            return self._start(event, now)
        if isinstance(event, CancelAsked):
            return self._cancel(event.reason, now)
        if isinstance(event, BidIn):
            return self._on_bid(event, now)
        if isinstance(event, NoBidIn):
            return self._on_nobid(event, now)
        if isinstance(event, Tick):
            return self._tick(event, now)
        if isinstance(event, Compared):
            return self._on_compared(event, now)
        run = self.runs.get(event.attempt)
        if run is None or run.stage == Stage.NONE:
            return []  # a late word from a run already given up
        if isinstance(event, ExecutorFrame):
            return self._on_frame(run, event, now)
        if isinstance(event, BadFrame):
            return self._lost(
                run, f"sent a bad frame: {event.reason}", now, ErrorCode.MALFORMED_MESSAGE
            )
        if isinstance(event, (StreamLost, AcceptNotDelivered)):
            return self._on_stream_gone(run, event, now)
        if isinstance(event, ResultFetched):
            return self._on_result(run, event, now)
        if isinstance(event, ResultUnavailable):
            if run.stage != Stage.FETCHING:
                return []
            if self.status == S.CANCELING:
                run.stage = Stage.NONE
                return self._maybe_canceled()
            return self._lost(
                run, f"result unavailable: {event.reason}", now, ErrorCode.FETCH_FAILED
            )
        return self._on_partial(run, event)

    def next_deadline(self, now: float) -> float | None:
        """When the driver must feed a Tick if nothing else happens first."""
        if self.finished or self.status is None or self.status == S.PENDING:
            return None
        times = [t for t in (self.deadline, self.cancel_deadline) if t is not None]
        if self._collecting():
            times.append(self.window_end)
            if self.settle_end is not None:
                times.append(self.settle_end)
            elif not self.bids:
                times.append(now + REPUBLISH_POLL)
        if self.status != S.CANCELING:
            times += [r.silent_at(self.policy.silence) for r in self._awaiting()]
        return min(times) if times else None

    # ---- bidding ------------------------------------------------------------------

    def _start(self, event: Start, now: float) -> list[Effect]:
        if self.status != S.PENDING:
            return []
        self.expected = self.published_to = event.topic_peers
        self.window_opened, self.window_end = now, now + self.window
        self.deadline = self.policy.deadline(now, self.spec.timeout_seconds, self.window)
        move = self._move(
            Trigger.PUBLISHED, LogEvent.PUBLISHED, self.me, {"topic_peers": event.topic_peers}
        )
        return [move, Publish()]

    def _collecting(self) -> bool:
        return self.status == S.BIDDING and not self._live()

    def _on_bid(self, event: BidIn, now: float) -> list[Effect]:
        bid = event.bid
        if (
            bid.job_id != self.job_id
            or bid.provider in self.bids
            or bid.provider in self.refusals
            or len(self.bids) + len(self.refusals) >= MAX_BIDS
            or self.status == S.CANCELING
        ):
            return []  # replayed, duplicated, flooded or too late to matter
        if event.standing.excluded(now):
            return [
                Record(
                    LogEvent.BID_REJECTED,
                    bid.provider,
                    {"price": bid.price, "reason": f"excluded: {event.standing.why}"},
                )
            ]
        if not bid_acceptable(self.spec, bid, now):
            return [
                Record(
                    LogEvent.BID_REJECTED,
                    bid.provider,
                    {"price": bid.price, "max_price": self.spec.max_price},
                )
            ]
        self.bids[bid.provider] = bid
        self.standings[bid.provider] = event.standing
        effects: list[Effect] = [
            SaveBid(bid.provider, "bid", event.envelope, bid.to_wire()),
            Record(
                LogEvent.BID_RECEIVED,
                bid.provider,
                {"price": bid.price, "eta_seconds": bid.eta_seconds},
            ),
        ]
        if self._collecting():
            if self.settle_end is None:
                self.settle_end = now + self.policy.bid_settle
            effects += self._maybe_close(now)
        return effects

    def _on_nobid(self, event: NoBidIn, now: float) -> list[Effect]:
        nobid = event.nobid
        if (
            nobid.job_id != self.job_id
            or nobid.provider in self.refusals
            or nobid.provider in self.bids
            or len(self.bids) + len(self.refusals) >= MAX_BIDS
        ):
            return []
        self.refusals[nobid.provider] = nobid
        effects: list[Effect] = [
            SaveBid(nobid.provider, "nobid", event.envelope, nobid.to_wire()),
            Record(
                LogEvent.NO_BID, nobid.provider, {"reason": nobid.reason, "message": nobid.message}
            ),
        ]
        if self._collecting():
            effects += self._maybe_close(now)
        return effects

    def _wanted(self) -> int:
        """Bids worth waiting for before bidding closes early."""
        return self.verify.executors(True) if self.verify.kind == VerifyKind.REDUNDANT else 1

    def _maybe_close(self, now: float) -> list[Effect]:
        answered = len(self.bids) + len(self.refusals)
        if len(self.bids) >= self._wanted() and (
            answered >= self.expected or (self.settle_end is not None and now >= self.settle_end)
        ):
            return self._close_window(now)
        if now >= self.window_end:
            return self._close_window(now)
        return []

    def _candidates(self, now: float | None = None) -> list[Bid]:
        bids = rank_bids(list(self.bids.values()), self.standings, now)
        busy = {r.executor for r in self.runs.values()} | set(self.tried)
        return [b for b in bids if b.provider not in busy]

    def _close_window(self, now: float) -> list[Effect]:
        candidates = self._candidates(now)
        if not candidates:
            reasons = {p: f"{r.reason}: {r.message}" for p, r in self.refusals.items()}
            waited = max(self.window, self.window_end - self.window_opened)
            err = _error(
                ErrorCode.NO_BIDS,
                f"no compute node bid within {waited:.1f}s "
                f"({self.expected} peer(s) on the jobs topic, {len(reasons)} declined)",
                {"refusals": reasons},
            )
            return [self._move(Trigger.NO_BIDS, LogEvent.FAILED, None, err, error=err)]
        if not self.verify.multi:
            return self._assign(candidates[0], now)
        first = candidates[0]
        if self.verify.kind == VerifyKind.SAMPLE:
            standing = self.standings.get(first.provider, STRANGER)
            self.audited = should_audit(self.verify, standing, self.audit_draw)
        else:
            self.audited = True
        want = self.verify.executors(self.audited)
        if len(candidates) < want and self.verify.kind == VerifyKind.REDUNDANT:
            err = _error(
                ErrorCode.NO_BIDS,
                f"{self.verify} needs {want} distinct executors; "
                f"{len(candidates)} bid within {self.window:.1f}s",
                {"bids": len(candidates), "needed": want},
            )
            return [self._move(Trigger.NO_BIDS, LogEvent.FAILED, None, err, error=err)]
        self.tiebreaks_left = self.verify.tiebreaks(self.audited)
        plan: dict[str, object] = {
            "policy": str(self.verify),
            "executors": min(want, len(candidates)),
            "quorum": self.verify.quorum(self.audited),
        }
        if self.verify.kind == VerifyKind.SAMPLE:
            plan["audited"] = self.audited and len(candidates) > 1
            if self.audited and len(candidates) < 2:
                self.audited = False
                plan["why"] = "no second executor bid: not audited"
        effects: list[Effect] = [Record(LogEvent.VERIFICATION_PLANNED, self.me, plan)]
        effects += self._assign(first, now)
        purpose = "audit" if self.verify.kind == VerifyKind.SAMPLE else "replica"
        for bid in candidates[1 : self.verify.executors(bool(self.audited))]:
            effects += self._assign(bid, now, purpose=purpose)
        return [*effects, *self._summary()]

    def _assign(self, bid: Bid, now: float, purpose: str = "primary") -> list[Effect]:
        self.attempt += 1
        run = Run(self.attempt, bid.provider, bid.price, now, purpose, last_heard=now)
        self.runs[run.attempt] = run
        # When the Accept was signed: what a Resume names after a restart.
        data = {"price": bid.price, "eta_seconds": bid.eta_seconds, "accepted_at": now}
        if self.verify.multi:
            data["attempt"] = run.attempt
        effects: list[Effect] = []
        if self.status == S.BIDDING:
            effects.append(
                self._move(
                    Trigger.BID_ACCEPTED,
                    LogEvent.BID_ACCEPTED,
                    bid.provider,
                    data,
                    executor=bid.provider,
                )
            )
        else:
            effects.append(Record(LogEvent.BID_ACCEPTED, bid.provider, data))
        accept = Accept(
            job_id=self.job_id,
            requester=self.me,
            provider=bid.provider,
            price=bid.price,
            accepted_at=now,
        )
        # Scored after the Accept goes out: a score is advice, the Accept is the job.
        return [*effects, SendAccept(accept, run.attempt), Observe(bid.provider, "won")]

    # ---- time ---------------------------------------------------------------------

    def _tick(self, event: Tick, now: float) -> list[Effect]:
        if self.status in (None, S.PENDING):
            return []
        if self.status == S.CANCELING:
            if self.cancel_deadline is not None and now >= self.cancel_deadline:
                return self._canceled({"reason": self.cancel_reason or "canceled"})
            return []
        if self.deadline is not None and now >= self.deadline:
            err = _error(ErrorCode.TIMEOUT, "the job did not finish in time")
            effects: list[Effect] = []
            if self._awaiting():
                effects.append(CloseStream(cancel="the job did not finish in time"))
            for run in self._live():
                run.stage, run.outcome = Stage.NONE, "timed_out"
                effects.append(Observe(run.executor, "timed_out", now - run.started))
            effects.append(
                self._move(
                    Trigger.DEADLINE_PASSED, LogEvent.TIMED_OUT, self.executor, err, error=err
                )
            )
            return effects
        if self._collecting():
            effects = []
            if not self.bids and event.topic_peers > self.published_to:
                # Peers joined the topic since the spec went out (a node that just
                # restarted publishes before its mesh has formed): tell them too,
                # and give them a full window if nobody could hear the first publish.
                if self.published_to == 0:
                    self.window_end = now + self.window
                self.published_to = event.topic_peers
                self.expected = max(self.expected, event.topic_peers)
                effects += [
                    Record(LogEvent.REPUBLISHED, self.me, {"topic_peers": event.topic_peers}),
                    Publish(),
                ]
            return effects + self._maybe_close(now)
        effects = []
        for run in sorted(self._awaiting(), key=lambda r: r.attempt):
            if self.finished or run.stage != Stage.AWAITING:
                continue
            if now >= run.silent_at(self.policy.silence):
                unanswered = run.resumed and run.last_heard == run.started
                reason = (
                    f"no answer to the Resume in {now - run.started:.1f}s"
                    if unanswered
                    else f"silent for {now - run.last_heard:.1f}s with its stream open"
                )
                effects += self._lost(run, reason, now, ErrorCode.EXECUTOR_LOST)
        return effects

    # ---- the executor's side of a run ---------------------------------------------

    def _on_frame(self, run: Run, event: ExecutorFrame, now: float) -> list[Effect]:
        message = event.message
        if run.stage != Stage.AWAITING:
            return []  # after a receipt or failure the executor has nothing more to say
        if event.signer != run.executor or getattr(message, "job_id", None) != self.job_id:
            return self._lost(
                run,
                f"job stream carried a {message.KIND} from {event.signer} "
                "that is not for this job or not from its executor",
                now,
                ErrorCode.SIGNATURE_INVALID,
            )
        run.last_heard = now
        if self.status == S.CANCELING:
            return self._frame_while_canceling(run, message)
        if isinstance(message, Progress):
            return self._on_progress(run, message)
        if isinstance(message, Receipt):
            return self._on_receipt(run, message, event, now)
        if isinstance(message, Failure):
            return self._on_failure(run, message, now)
        return self._lost(
            run, f"sent a {message.KIND} on the job stream", now, ErrorCode.MALFORMED_MESSAGE
        )

    def _started(self, peer: str) -> list[Effect]:
        if self.status != S.ASSIGNED:
            return []
        return [self._move(Trigger.EXECUTION_STARTED, LogEvent.EXECUTION_STARTED, peer)]

    def _on_progress(self, run: Run, message: Progress) -> list[Effect]:
        # A job queued on its executor is assigned, not yet running.
        effects = [] if message.substate == "queued" else self._started(message.provider)
        point = (message.substate, message.progress)
        if point == run.last_progress:  # a heartbeat repeats the last point: not news
            return effects
        run.last_progress = point
        if self.verify.multi:
            # The job's progress is its earliest live run's; the others' frames
            # only prove they are alive, which costs no write.
            live = [r.attempt for r in self.runs.values() if r.stage == Stage.AWAITING]
            if run.attempt != min(live):
                return effects
        return [
            *effects,
            SetProgress(message.substate, message.progress),
            Record(
                LogEvent.PROGRESS,
                message.provider,
                {"substate": message.substate, "progress": message.progress},
            ),
        ]

    def _on_receipt(
        self, run: Run, receipt: Receipt, event: ExecutorFrame, now: float
    ) -> list[Effect]:
        checks = receipt_checks(
            receipt,
            signer=event.signer,
            executor=run.executor,
            job_id=self.job_id,
            model_cid=self.spec.model_cid,
            inputs_cid=self.spec.inputs_cid,
            spec_cid=self.spec_cid,
        )
        if failed(checks):
            return self._rejected(run, checks, now)
        limit = self.policy.max_result_bytes
        if receipt.result_bytes > limit:
            # The job's own result is too big for this node: another executor
            # would make the same, so the job ends here, before any byte moves.
            err = _error(
                ErrorCode.CONTENT_TOO_LARGE,
                f"the result is {receipt.result_bytes} bytes, over this node's limit of "
                f"{limit} (--max-result-bytes)",
                {"executor": receipt.provider, "result_cid": receipt.result_cid},
            )
            for other in self._live():
                other.stage = Stage.NONE
            return [
                *self._started(receipt.provider),
                CloseStream(),
                self._move(
                    Trigger.EXECUTOR_FAILED, LogEvent.FAILED, receipt.provider, err, error=err
                ),
            ]
        run.receipt, run.envelope = receipt, event.envelope
        run.stage = Stage.ANSWERED
        effects: list[Effect] = [
            *self._started(receipt.provider),
            Record(
                LogEvent.RESULTS_PUBLISHED,
                receipt.provider,
                {
                    "result_cid": receipt.result_cid,
                    **({"attempt": run.attempt} if self.verify.multi else {}),
                },
            ),
            CloseStream(attempt=run.attempt),
        ]
        if not self.verify.multi or not any(
            r.stage in (Stage.FETCHING, Stage.FETCHED) for r in self.runs.values()
        ):
            effects.append(self._fetch(run))  # the first answer is fetched at once
        if self.verify.multi:
            effects += [*self._verify_step(now), *self._summary()]
        return effects

    def _fetch(self, run: Run) -> FetchResult:
        assert run.receipt is not None
        run.stage = Stage.FETCHING
        receipt = run.receipt
        return FetchResult(receipt.result_cid, receipt.provider, run.attempt, receipt.result_bytes)

    def _rejected(self, run: Run, checks: list[Check], now: float) -> list[Effect]:
        record = Record(
            LogEvent.RECEIPT_REJECTED,
            run.executor,
            {"checks": [c.to_json() for c in failed(checks)]},
        )
        return [
            record,
            *self._lost(
                run,
                f"receipt failed verification: {summary(checks)}",
                now,
                ErrorCode.VERIFICATION_MISMATCH,
            ),
        ]

    def _on_failure(self, run: Run, failure: Failure, now: float) -> list[Effect]:
        if failure.code == ErrorCode.CANCELED.value:
            # An executor that stops a run nobody canceled is as good as lost.
            return self._lost(
                run, f"{failure.code}: {failure.message}", now, ErrorCode.EXECUTOR_LOST
            )
        if run.resumed and failure.code in (ErrorCode.JOB_NOT_FOUND, ErrorCode.EXPIRED):
            # The executor no longer has the job (or no longer keeps its result).
            reason = f"resume refused: {failure.code}: {failure.message}"
            return self._lost(run, reason, now, ErrorCode.EXECUTOR_LOST)
        if failure.retryable or self.verify.multi:
            # Its worker died, or the run outgrew its memory limit: another node
            # may well succeed, and if none is left the job ends with this code.
            # With several executors one's failure says little about the job.
            code = error_code(failure.code)
            return self._lost(run, f"{failure.code}: {failure.message}", now, code)
        self.failure = failure
        if failure.partial_result_cid:
            run.stage = Stage.PARTIAL
            return [
                CloseStream(),
                FetchPartial(
                    failure.partial_result_cid,
                    failure.provider,
                    run.attempt,
                    self.policy.max_result_bytes,
                ),
            ]
        run.stage = Stage.NONE
        return [
            CloseStream(),
            Observe(run.executor, "failed"),
            self._executor_failed(failure, None),
        ]

    def _on_partial(self, run: Run, event: PartialFetched) -> list[Effect]:
        if run.stage != Stage.PARTIAL or self.failure is None:
            return []
        run.stage = Stage.NONE
        if self.status == S.CANCELING:
            return self._maybe_canceled()
        effects: list[Effect] = []
        if event.cid:
            effects.append(
                Record(
                    LogEvent.PARTIAL_RESULTS_KEPT, self.failure.provider, {"result_cid": event.cid}
                )
            )
        return [
            *effects,
            Observe(run.executor, "failed"),
            self._executor_failed(self.failure, event.cid),
        ]

    def _executor_failed(self, failure: Failure, partial: str | None) -> Move:
        code = error_code(failure.code)
        timed_out = code == ErrorCode.TIMEOUT
        err = _error(
            code,
            f"executor {failure.provider[-8:]} reported: {failure.message}",
            {
                "executor": failure.provider,
                "resources": dict(failure.resources),
                **({"partial_result_cid": partial} if partial else {}),
            },
            failure.retryable,
        )
        return self._move(
            Trigger.EXECUTOR_TIMED_OUT if timed_out else Trigger.EXECUTOR_FAILED,
            LogEvent.TIMED_OUT if timed_out else LogEvent.FAILED,
            failure.provider,
            err,
            error=err,
        )

    def _on_stream_gone(
        self, run: Run, event: StreamLost | AcceptNotDelivered, now: float
    ) -> list[Effect]:
        if run.stage != Stage.AWAITING:
            return []  # the stream closing after a receipt or failure is normal
        if self.status == S.CANCELING:
            run.stage = Stage.NONE
            return self._maybe_canceled()
        kind = "resume" if run.resumed else "job"
        what = (
            f"{kind} stream ended"
            if isinstance(event, StreamLost)
            else f"cannot open a {kind} stream"
        )
        return self._lost(run, f"{what}: {event.reason}", now, ErrorCode.EXECUTOR_LOST)

    def _on_result(self, run: Run, event: ResultFetched, now: float) -> list[Effect]:
        if run.stage != Stage.FETCHING or run.receipt is None:
            return []
        receipt = run.receipt
        if self.status == S.CANCELING:
            run.stage = Stage.NONE
            return self._canceled({"reason": "canceled; the executor finished anyway"})
        checks = result_checks(
            receipt, rebuilt_cid=event.rebuilt_cid, file_digests=event.file_digests
        )
        if failed(checks):
            return self._rejected(run, checks, now)
        run.stage = Stage.FETCHED
        record = Record(
            LogEvent.RECEIPT_VERIFIED,
            receipt.provider,
            {"result_cid": receipt.result_cid, "fetch": dict(event.stats)},
        )
        if not self.verify.multi:
            return [record, *self._complete([run], [], now)]
        return [record, *self._verify_step(now), *self._summary()]

    # ---- verification across runs ---------------------------------------------------

    def _answers(self) -> dict[int, Mapping[str, str]]:
        return {
            a: r.receipt.output_digests
            for a, r in self.runs.items()
            if r.stage in _ANSWERED and r.receipt is not None
        }

    def _verify_step(self, now: float) -> list[Effect]:
        """Ask protocol/verification.py what settles the job next, and do it."""
        if self.finished or self.status == S.CANCELING or self.audited is None:
            return []
        answers = self._answers()
        if not answers:
            return []
        decision = decide(
            self.verify.quorum(self.audited),
            answers,
            self.same,
            running=len(self._awaiting()),
            comparing=self.comparing,
            can_add=self.tiebreaks_left > 0 and bool(self._candidates(now)),
        )
        if decision.next == Next.ACCEPT:
            fetched = [a for a in decision.winners if self.runs[a].stage == Stage.FETCHED]
            if fetched:
                winners = [self.runs[fetched[0]]] + [
                    self.runs[a] for a in decision.winners if a != fetched[0]
                ]
                return self._complete(winners, [self.runs[a] for a in decision.losers], now)
            if any(self.runs[a].stage == Stage.FETCHING for a in decision.winners):
                return []
            return [self._fetch(self.runs[decision.winners[0]])]
        if decision.next == Next.COMPARE:
            effects: list[Effect] = []
            for p in decision.pairs:
                a, b = sorted(p)
                ra, rb = self.runs[a], self.runs[b]
                for r in (ra, rb):
                    if r.stage == Stage.ANSWERED:
                        effects.append(self._fetch(r))
                if ra.stage == rb.stage == Stage.FETCHED:
                    assert ra.receipt is not None and rb.receipt is not None
                    self.comparing.add(p)
                    effects.append(
                        CompareResults(
                            a, ra.receipt.result_cid, b, rb.receipt.result_cid, self.spec.tolerance
                        )
                    )
            return effects
        if decision.next == Next.WAIT:
            return []
        if decision.next == Next.TIEBREAK:
            self.tiebreaks_left -= 1
            nxt = self._candidates(now)[0]
            record = Record(
                LogEvent.TIEBREAK_STARTED,
                nxt.provider,
                {"answers": len(answers), "groups": len(groups(answers, self.same))},
            )
            return [record, *self._assign(nxt, now, purpose="tiebreak")]
        return self._mismatch(now)

    def _on_compared(self, event: Compared, now: float) -> list[Effect]:
        p = pair(event.a, event.b)
        if p not in self.comparing or self.finished:
            return []
        self.comparing.discard(p)
        self.same[p] = event.agree
        self.diffs = (
            max(self.diffs[0], event.max_abs_diff),
            max(self.diffs[1], event.max_rel_diff),
        )
        ra, rb = self.runs[event.a], self.runs[event.b]
        record = Record(
            LogEvent.RESULTS_COMPARED,
            None,
            {
                "a": ra.executor,
                "b": rb.executor,
                "agree": event.agree,
                "max_abs_diff": event.max_abs_diff,
                "max_rel_diff": event.max_rel_diff,
                "detail": event.detail[:512],
            },
        )
        if self.status == S.CANCELING:
            return [record]
        return [record, *self._verify_step(now), *self._summary()]

    def _complete(self, winners: list[Run], losers: list[Run], now: float) -> list[Effect]:
        """The job's result is winners[0]'s (fetched and verified); pay and score everyone."""
        best = winners[0]
        receipt = best.receipt
        assert receipt is not None
        agreed = len(winners) > 1
        if not self.verify.multi:
            outcome = "accepted"
        elif agreed:
            outcome = "verified"
        else:
            outcome = "unaudited"
        effects: list[Effect] = []
        if self.verify.multi:
            effects.append(
                Record(
                    LogEvent.RESULTS_AGREED,
                    best.executor,
                    {
                        "policy": str(self.verify),
                        "agreed": [r.executor for r in winners],
                        "disputed": [r.executor for r in losers],
                        "max_abs_diff": self.diffs[0],
                        "max_rel_diff": self.diffs[1],
                    },
                )
            )
        effects.append(KeepResult(receipt.result_cid))
        # After the verdict: scores are advice and the runs left over are moot, so
        # neither holds up the job's completion.
        after: list[Effect] = []
        for run in winners:
            run.outcome = outcome
            assert run.receipt is not None and run.envelope is not None
            effects.append(Settle(run.executor, run.receipt, run.envelope, run.price, outcome))
            outcome_seen = "verified" if agreed else "completed"
            after.append(Observe(run.executor, outcome_seen, now - run.started))
        for run in losers:
            run.outcome = "disputed"
            assert run.receipt is not None and run.envelope is not None
            effects += [
                Record(
                    LogEvent.RESULT_DISPUTED,
                    run.executor,
                    {"result_cid": run.receipt.result_cid, "majority": best.executor},
                ),
                Settle(run.executor, run.receipt, run.envelope, 0.0, "disputed"),
            ]
            after.append(Observe(run.executor, "disputed", now - run.started))
            if run.stage == Stage.FETCHED:
                effects.append(KeepResult(run.receipt.result_cid))
        for run in self._awaiting():
            run.outcome = "stopped"
            after.append(CloseStream(cancel="the job's result is settled", attempt=run.attempt))
        for run in self.runs.values():
            run.stage = Stage.NONE
        effects.append(
            self._move(
                Trigger.RESULT_VERIFIED,
                LogEvent.COMPLETED,
                receipt.provider,
                executor=best.executor,
                result_cid=receipt.result_cid,
                receipt=receipt.to_wire(),
                receipt_envelope=best.envelope,
                substate=None,
                progress=100.0,
                verification=self._final_summary(),
            )
        )
        return effects + after

    def _mismatch(self, now: float) -> list[Effect]:
        answered = [r for r in self.runs.values() if r.stage in _ANSWERED]
        effects: list[Effect] = []
        for run in answered:
            assert run.receipt is not None
            run.outcome = "unsettled"
            if run.stage == Stage.FETCHED:
                effects.append(KeepResult(run.receipt.result_cid))
        for run in self.runs.values():
            run.stage = Stage.NONE
        results = {r.executor: r.receipt.result_cid for r in answered if r.receipt}
        quorum = self.verify.quorum(bool(self.audited))
        if len(answered) < quorum:
            message = (
                f"only {len(answered)} of the {quorum} executors {self.verify} needs answered; "
                "the others were lost and no bid was left to replace them"
            )
        else:
            message = (
                f"{len(answered)} executors answered and no {quorum} agree within the "
                f"tolerance ({self.verify}); every result is kept for inspection"
            )
        err = _error(
            ErrorCode.VERIFICATION_MISMATCH,
            message,
            {
                "results": results,
                "max_abs_diff": self.diffs[0],
                "max_rel_diff": self.diffs[1],
            },
        )
        return [
            *effects,
            self._move(
                Trigger.VERIFICATION_FAILED,
                LogEvent.FAILED,
                None,
                err,
                error=err,
                verification=self._final_summary(),
            ),
        ]

    def _summary_data(self) -> dict[str, object]:
        answers = self._answers()
        found = groups(answers, self.same) if answers else []
        return {
            "policy": str(self.verify),
            "tolerance": self.spec.tolerance.model_dump(),
            "audited": self.audited,
            "quorum": self.verify.quorum(bool(self.audited)),
            "executors": [r.summary() for r in sorted(self.runs.values(), key=lambda r: r.attempt)],
            "agreed": [r.executor for r in self.runs.values() if r.outcome == "verified"],
            "disputed": [r.executor for r in self.runs.values() if r.outcome == "disputed"],
            "groups": [[self.runs[a].executor for a in g] for g in found],
            "max_abs_diff": self.diffs[0],
            "max_rel_diff": self.diffs[1],
        }

    def _final_summary(self) -> dict[str, object]:
        self._last_summary = self._summary_data()
        return self._last_summary

    def _summary(self) -> list[Effect]:
        """The summary for `job.get`, written only when it changed (each write
        re-encodes every run's receipt; a verdict's move carries its own)."""
        data = self._summary_data()
        if data == self._last_summary:
            return []
        self._last_summary = data
        return [SetVerification(data)]

    # ---- losing a run -----------------------------------------------------------------

    def _lost(self, run: Run, reason: str, now: float, code: ErrorCode) -> list[Effect]:
        """End one run; replace it with the next untried bid while the budget lasts."""
        lost = run.executor
        awaiting = run.stage == Stage.AWAITING
        run.stage, run.outcome = Stage.NONE, "lost" if code == ErrorCode.EXECUTOR_LOST else "failed"
        self.tried.append(lost)
        effects: list[Effect] = [
            CloseStream(
                cancel=f"attempt abandoned: {reason}" if awaiting else None,
                attempt=run.attempt,
            ),
            Record(LogEvent.EXECUTOR_LOST, lost, {"reason": reason, "code": code.value}),
            Observe(lost, run.outcome, now - run.started),
        ]
        candidates = self._candidates(now)
        others = self._live()
        if self.verify.multi and (others or self._answers()):
            # Other executors are still at it, or have answered: replace this one
            # while the budget lasts, and let the answers so far decide the rest.
            if candidates and self.replacements < self.policy.max_retries:
                self.replacements += 1
                nxt = candidates[0]
                effects.append(
                    Record(
                        LogEvent.RETRIED,
                        nxt.provider,
                        {"attempt": self.attempt + 1, "after": reason},
                    )
                )
                effects += self._assign(nxt, now, purpose=run.purpose)
            effects += self._verify_step(now)
            if not self.finished and not self._live() and not self._answers():
                effects += self._exhausted(lost, reason, code)
            return [*effects, *self._summary()]
        retries_used = self.replacements
        if candidates and retries_used < self.policy.max_retries:
            self.replacements += 1
            nxt = candidates[0]
            effects.append(
                self._move(
                    Trigger.EXECUTOR_LOST,
                    LogEvent.RETRIED,
                    nxt.provider,
                    {"attempt": len(self.tried), "after": reason},
                    retry_count=len(self.tried),
                )
            )
            effects += self._assign(nxt, now, purpose=run.purpose)
            if self.verify.multi:
                effects += self._summary()
            return effects
        return effects + self._exhausted(lost, reason, code)

    def _exhausted(self, lost: str, reason: str, code: ErrorCode) -> list[Effect]:
        if code == ErrorCode.EXECUTOR_LOST and len(self.tried) > 1:
            message = f"every accepted executor was lost ({len(self.bids)} bid(s)); last: {reason}"
        elif len(self.tried) > 1:
            message = f"no executor left to try ({len(self.tried)} tried); last: {reason}"
        else:
            message = f"executor {lost[-8:]} {reason}; no other bid to try"
        err = _error(code, message, {"executor": lost, "tried": list(self.tried)})
        return [self._move(Trigger.RETRIES_EXHAUSTED, LogEvent.FAILED, lost, err, error=err)]

    # ---- cancel and restart ---------------------------------------------------------

    def _cancel(self, reason: str, now: float) -> list[Effect]:
        if self.status == S.CANCELING or self.status is None:
            return []
        self.cancel_reason = reason
        move = self._move(
            Trigger.CANCEL_ASKED, LogEvent.CANCEL_REQUESTED, self.me, {"reason": reason}
        )
        awaiting = self._awaiting()
        if not awaiting:
            return [move, *self._canceled({"reason": reason})]
        self.cancel_deadline = now + self.policy.cancel_grace
        if not self.verify.multi:
            return [move, SendCancel(reason)]
        return [move, *(SendCancel(reason, r.attempt) for r in awaiting)]

    def _frame_while_canceling(self, run: Run, message: WireModel) -> list[Effect]:
        if isinstance(message, Failure):
            run.stage = Stage.NONE
            if self._awaiting():
                return []
            return self._canceled({"reason": message.message, "resources": dict(message.resources)})
        if isinstance(message, Receipt):
            run.stage = Stage.NONE
            if self._awaiting():
                return []
            return self._canceled({"reason": "canceled; the executor finished anyway"})
        return []

    def _maybe_canceled(self) -> list[Effect]:
        if self._awaiting() or any(r.stage == Stage.FETCHING for r in self.runs.values()):
            return []
        return self._canceled({"reason": self.cancel_reason or "canceled"})

    def _canceled(self, data: Mapping[str, object]) -> list[Effect]:
        for run in self.runs.values():
            run.stage = Stage.NONE
        return [
            CloseStream(),
            self._move(Trigger.CANCEL_CONFIRMED, LogEvent.CANCELED, self.executor, data),
        ]

    def _restarted(self) -> list[Effect]:
        if self.status is None:
            return []
        if self.status == S.CANCELING:
            data = {"reason": "canceled; the node restarted before the executor confirmed"}
            return [self._move(Trigger.RESTARTED, LogEvent.CANCELED, self.me, data)]
        err = _error(
            ErrorCode.EXECUTOR_LOST,
            f"the requester node restarted while the job was {self.status.value}",
            retry=True,
        )
        return [self._move(Trigger.NOT_RESUMABLE, LogEvent.FAILED, self.me, err, error=err)]

    def _reopen_window(self, topic_peers: int, now: float) -> None:
        """A restarted node's mesh forms after it recovers its jobs: with nobody on
        the topic yet, a window of the usual length would close before any compute
        node could hear the spec, so it stays open up to resume_wait (as long as a
        Resume is given) for peers to come back; `_tick` republishes to them and
        gives them a full window from then."""
        window = self.window
        if topic_peers == 0:
            window = max(window, self.policy.resume_wait)
        self.window_opened = now
        self.window_end = min(now + window, max(self.spec.expires_at, now + self.window))
        self.deadline = self.policy.deadline(now, self.spec.timeout_seconds, window)

    def _not_resumable(self, step: str) -> list[Effect]:
        assert self.status is not None
        err = _error(
            ErrorCode.EXECUTOR_LOST,
            f"the requester node restarted while the job was {self.status.value} "
            f"and could not resume it: {step}",
            {"step": step},
            retry=True,
        )
        return [self._move(Trigger.NOT_RESUMABLE, LogEvent.FAILED, self.me, err, error=err)]

    def _recovered(self, event: Recovered, now: float) -> list[Effect]:
        """Pick the job up after a restart: re-open bidding, or ask its executor where
        it stands (a Resume). Only a job that can do neither ends here, saying why."""
        if self.status is None:
            return []
        if self.status == S.CANCELING:
            return self._restarted()
        if self.status in (S.PENDING, S.BIDDING) and now >= self.spec.expires_at:
            return self._not_resumable("its spec expired, so its bid window cannot re-open")
        if self.status in _RUNNING and self.verify.multi:
            return self._not_resumable(f"the runs of a {self.verify} job are not resumed")
        self.tried = list(event.tried)
        self.replacements = event.retries
        for bid_in in event.bids:
            bid = bid_in.bid
            if bid.job_id == self.job_id:  # each was judged when it arrived
                self.bids[bid.provider] = bid
                self.standings[bid.provider] = bid_in.standing
        if self.status == S.PENDING:
            effects = [
                Record(LogEvent.RESUMED, self.me, {"step": "publish"}),
                *self._start(Start(event.topic_peers), now),
            ]
            self._reopen_window(event.topic_peers, now)
            return effects
        self.deadline = self.policy.deadline(now, self.spec.timeout_seconds, self.window)
        if self.status == S.BIDDING:
            self.expected = self.published_to = event.topic_peers
            self._reopen_window(event.topic_peers, now)
            if self.bids:
                self.settle_end = now + self.policy.bid_settle
            data = {"step": "bidding", "bids": len(self.bids)}
            return [Record(LogEvent.RESUMED, self.me, data), Publish()]
        executor = self._executor
        if executor is None or event.accepted_at is None:
            return self._not_resumable("no accepted executor on record to ask")
        self.attempt += 1
        accepted = self.bids.get(executor)
        price = event.price if event.price is not None else accepted.price if accepted else 0.0
        run = Run(self.attempt, executor, price, now, last_heard=now, resumed=True)
        run.quiet_until = now + self.policy.resume_wait
        self.runs[run.attempt] = run
        resume = Resume(
            job_id=self.job_id,
            requester=self.me,
            provider=executor,
            accepted_at=event.accepted_at,
            created_at=now,
        )
        data = {"step": self.status.value, "accepted_at": event.accepted_at}
        return [Record(LogEvent.RESUMED, executor, data), SendResume(resume, run.attempt)]


# ---- the compute side -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkStarted:
    """The accepted job's inputs are being fetched: the run has begun."""

    slots: tuple[str, ...] = ()
    """Where it runs (slot names such as cuda:0, cpu:1), for the job's record."""


@dataclass(frozen=True)
class Progressed:
    substate: str
    progress: float


@dataclass(frozen=True)
class RunSucceeded:
    """The run finished; `envelope` is the receipt as signed, kept so a settlement
    for it can later be matched byte for byte."""

    receipt: Receipt
    envelope: bytes | None = None


@dataclass(frozen=True)
class RunFailed:
    code: ErrorCode
    message: str
    details: Mapping[str, object] = field(default_factory=dict)
    partial_result_cid: str | None = None


@dataclass(frozen=True)
class CancelFrame:
    """A Cancel arrived on the job stream, signed by `signer`."""

    signer: str
    reason: str


@dataclass(frozen=True)
class RequesterGone:
    """The job stream broke (EOF, reset, a write that failed): the run goes on alone."""

    reason: str


@dataclass(frozen=True)
class ResumeAsked:
    """A Resume from `signer` was accepted and its stream is now the job's stream."""

    signer: str


@dataclass(frozen=True)
class WorkStopped:
    resources: Mapping[str, float] = field(default_factory=dict)


ComputeEvent = (
    WorkStarted
    | Progressed
    | RunSucceeded
    | RunFailed
    | CancelFrame
    | RequesterGone
    | ResumeAsked
    | WorkStopped
    | Tick
    | Restarted
    | Crashed
)


class ComputeJob(_Machine):
    """One accepted job as its executor sees it: run, report, stop when told.

    A requester whose stream breaks has not said stop: the run goes on, detached
    (nothing is sent, no heartbeat), and its record ends as it would have, so a
    Resume from that requester finds the job still running (it is re-attached)
    or finished (its receipt is kept). Only a Cancel, the job's timeout or a
    failure stop it.
    """

    role = Role.COMPUTE

    def __init__(
        self,
        *,
        job_id: str,
        me: str,
        requester: str,
        status: JobStatus | None = None,
        heartbeat: float = HEARTBEAT,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.job_id = job_id
        self.me = me
        self.requester = requester
        self.status = status
        self.heartbeat = heartbeat
        self.progress_interval = progress_interval
        self.stop_reason: str | None = None
        self.last_point: tuple[str, float] = ("warming_up", 0.0)
        self.last_sent = 0.0
        # A point not yet sent because the last frame went out too recently.
        self.held = False
        self.attached = True

    def accepted(self, price: float, accepted_at: float | None = None) -> Move:
        data: dict[str, object] = {"price": price}
        if accepted_at is not None:
            data["accepted_at"] = accepted_at  # what a Resume must name
        return self._move(
            Trigger.ACCEPTED, LogEvent.BID_ACCEPTED, self.requester, data, executor=self.me
        )

    def next_deadline(self) -> float | None:
        if self.status in (S.ASSIGNED, S.RUNNING) and self.attached:
            return self.last_sent + self._quiet_for()
        return None

    def _quiet_for(self) -> float:
        """How long after the last frame the next one is due: a held point sooner."""
        return self.progress_interval if self.held else self.heartbeat

    def _progress(self, substate: str, progress: float, now: float) -> list[Effect]:
        self.last_point = (substate, progress)
        self.held = False
        self.last_sent = now
        frame = Progress(
            job_id=self.job_id,
            provider=self.me,
            substate=substate,  # type: ignore[arg-type]
            progress=progress,
            at=now,
        )
        return [SetProgress(substate, progress), SendFrame(frame)]

    def handle(self, event: ComputeEvent, now: float) -> list[Effect]:
        effects = self._handle(event, now)
        if self.attached:
            return effects
        return [e for e in effects if not isinstance(e, SendFrame)]  # nobody to tell

    def _detach(self, event: RequesterGone) -> list[Effect]:
        if not self.attached or self.status not in (S.ASSIGNED, S.RUNNING):
            return []
        self.attached = False
        data = {"reason": f"{event.reason}; the run goes on, its result kept for a Resume"}
        return [Record(LogEvent.REQUESTER_LOST, self.requester, data)]

    def _resume(self, event: ResumeAsked, now: float) -> list[Effect]:
        if event.signer != self.requester or self.status is None:
            return []  # only the job's requester may take it up again
        self.attached = True
        record = Record(LogEvent.RESUMED, self.requester, {"status": self.status.value})
        if self.status == S.CANCELING:
            return [record]  # its Failure (CANCELED) follows when the work has unwound
        return [record, *self._progress(*self.last_point, now)]

    def _handle(self, event: ComputeEvent, now: float) -> list[Effect]:
        if self.finished:
            return []
        if isinstance(event, RequesterGone):
            return self._detach(event)
        if isinstance(event, ResumeAsked):
            return self._resume(event, now)
        if isinstance(event, Crashed):
            return _crashed(self, event.message)
        if isinstance(event, Restarted):
            if self.status == S.CANCELING:
                data = {"reason": "the compute node restarted while the job was canceling"}
                return [self._move(Trigger.RESTARTED, LogEvent.CANCELED, self.me, data)]
            if self.status is None:
                return []
            err = _error(
                ErrorCode.EXECUTOR_LOST,
                f"the compute node restarted while the job was {self.status.value}",
                retry=True,
            )
            return [self._move(Trigger.RESTARTED, LogEvent.FAILED, self.me, err, error=err)]
        if isinstance(event, CancelFrame):
            if event.signer != self.requester:
                return []  # only the job's requester may stop it
            if self.status not in (S.ASSIGNED, S.RUNNING):
                return []
            reason = event.reason or "canceled by the requester"
            self.stop_reason = reason
            move = self._move(
                Trigger.CANCEL_ASKED, LogEvent.CANCEL_REQUESTED, self.requester, {"reason": reason}
            )
            return [move, StopWork(reason)]
        if isinstance(event, WorkStopped):
            if self.status != S.CANCELING:
                return []
            reason = self.stop_reason or "stopped"
            resources = dict(event.resources)
            failure = Failure(
                job_id=self.job_id,
                provider=self.me,
                code=ErrorCode.CANCELED.value,
                message=scrub(reason)[:4096],
                resources=resources,
            )
            move = self._move(
                Trigger.CANCEL_CONFIRMED,
                LogEvent.CANCELED,
                self.requester,
                {"reason": reason, "resources": resources},
            )
            return [move, SendFrame(failure)]
        if self.status == S.CANCELING:
            return []  # the run is being stopped; what it still reports does not matter
        if isinstance(event, WorkStarted):
            if self.status != S.ASSIGNED:
                return []
            where = {"slots": list(event.slots)} if event.slots else None
            move = self._move(Trigger.EXECUTION_STARTED, LogEvent.EXECUTION_STARTED, self.me, where)
            return [move, *self._progress("warming_up", 0.0, now)]
        if isinstance(event, Progressed):
            if event.substate != "queued" and now - self.last_sent < self.progress_interval:
                self.last_point, self.held = (event.substate, event.progress), True
                return []  # sent at the next Tick, unless something newer comes first
            return self._progress(event.substate, event.progress, now)
        if isinstance(event, Tick):
            if self.attached and now - self.last_sent >= self._quiet_for():
                return self._progress(*self.last_point, now)
            return []
        if isinstance(event, RunSucceeded):
            receipt = event.receipt
            move = self._move(
                Trigger.RESULT_SENT,
                LogEvent.RESULTS_PUBLISHED,
                self.me,
                {"result_cid": receipt.result_cid},
                result_cid=receipt.result_cid,
                receipt=receipt.to_wire(),
                receipt_envelope=event.envelope,
                progress=100.0,
            )
            return [move, SendFrame(receipt, event.envelope)]
        return self._failed(event)

    def _failed(self, event: RunFailed) -> list[Effect]:
        verdict = classify_failure(event.code, event.details)
        details = {
            **dict(event.details),
            **(
                {"partial_result_cid": event.partial_result_cid} if event.partial_result_cid else {}
            ),
        }
        err = _error(event.code, event.message, details, verdict.retryable)
        trigger = Trigger.RUN_TIMED_OUT if verdict.status == S.TIMEOUT else Trigger.RUN_FAILED
        move = self._move(trigger, LogEvent.FAILED, self.me, err, error=err)
        failure = Failure(
            job_id=self.job_id,
            provider=self.me,
            code=event.code.value,
            message=scrub(event.message)[:4096],
            retryable=verdict.retryable,
            partial_result_cid=event.partial_result_cid,
        )
        return [move, SendFrame(failure)]

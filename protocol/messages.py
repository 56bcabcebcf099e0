"""The messages nodes exchange, each signed inside an envelope (crypto.envelope).

Models are strict and reject unknown fields: a peer that sends something we do
not understand gets a clear INVALID_SPEC/MALFORMED_MESSAGE, not a guess. Each
message names the field that must equal its signer's PeerID, so "who said
this" is checked once, in one place, when the envelope is opened.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
JOBS_TOPIC = "/meshrun/jobs/1"
BID_PROTOCOL = "/meshrun/bid/1.0.0"
JOB_PROTOCOL = "/meshrun/job/1.0.0"
PROVIDERS_TOPIC = "/meshrun/providers/1"
SETTLE_PROTOCOL = "/meshrun/settle/1.0.0"
# A requester that restarted asks an executor where a job it accepted stands.
RESUME_PROTOCOL = "/meshrun/resume/1.0.0"

Provider = Literal["any", "cpu", "cuda", "tensorrt"]
Priority = Literal["low", "normal", "high", "urgent"]
# "queued": accepted, waiting for a free slot on its executor (the job is not running yet).
Substate = Literal["queued", "warming_up", "processing", "finalizing", "uploading"]

_CID = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9]+$")
_PEER = Field(min_length=40, max_length=64, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    KIND: ClassVar[str]
    SIGNER_FIELD: ClassVar[str]

    def signer(self) -> str:
        value = getattr(self, self.SIGNER_FIELD)
        assert isinstance(value, str)
        return value

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(mode="python")


class Requirements(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    provider: Provider = "any"
    gpu_type: str | None = Field(default=None, max_length=64)
    gpu_count: int = Field(default=0, ge=0, le=64)
    min_vram_gb: float = Field(default=0.0, ge=0)
    max_model_bytes: int | None = Field(default=None, ge=0)
    # Host memory the job needs; nodes whose per-job limit is lower decline it.
    min_memory_gb: float = Field(default=0.0, ge=0)


# How a requester checks a result (protocol/verification.py says what each means):
# "receipt" (signature, signer, CIDs, digests), "redundant:K" (K executors, majority
# within a tolerance), "sample:P" (one executor, audited with probability P).
VERIFICATION_PATTERN = r"^(none|receipt|redundant:[2-9]|sample:(0(\.[0-9]{1,4})?|1(\.0{1,4})?))$"


class Tolerance(BaseModel):
    """How two executors' outputs are compared (protocol/compare.py).

    `values`: element-wise |a - b| <= atol + rtol*|b| for floats (per-dtype
    defaults when atol/rtol are unset), exact for integers and booleans;
    `argmax`: the same class along the last axis; `topk`: the same top `k` set.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["values", "argmax", "topk"] = "values"
    atol: float | None = Field(default=None, ge=0, le=1e6)
    rtol: float | None = Field(default=None, ge=0, le=1e6)
    k: int = Field(default=5, ge=1, le=1000)


class JobSpec(WireModel):
    """What a requester wants run. The job id is the CID of the signed envelope bytes."""

    KIND: ClassVar[str] = "jobspec"
    SIGNER_FIELD: ClassVar[str] = "requester"

    # A node refuses spec versions it does not speak, clearly, rather than guess.
    version: int = Field(default=PROTOCOL_VERSION, ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION)
    model_cid: str = _CID
    inputs_cid: str = _CID
    requester: str = _PEER
    requester_addrs: list[str] = Field(max_length=16)
    nonce: bytes = Field(min_length=16, max_length=32)
    created_at: float
    expires_at: float
    timeout_seconds: float = Field(gt=0, le=7 * 24 * 3600)
    max_price: float | None = Field(default=None, ge=0)
    priority: Priority = "normal"
    requirements: Requirements = Requirements()
    verification: str = Field(default="receipt", max_length=32, pattern=VERIFICATION_PATTERN)
    tolerance: Tolerance = Tolerance()
    model_bytes: int = Field(ge=0)
    inputs_bytes: int = Field(ge=0)
    # Execution knobs, e.g. {"batch_chunk": 8} for per-item progress on batched inputs.
    params: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=32)
    # Which model outputs to keep in the result; empty means all of them.
    output_names: list[str] = Field(default_factory=list, max_length=256)


class Bid(WireModel):
    KIND: ClassVar[str] = "bid"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    provider: str = _PEER
    price: float = Field(ge=0)
    eta_seconds: float = Field(ge=0)
    execution_providers: list[str] = Field(max_length=8)
    device: str = Field(max_length=256)
    created_at: float
    # The executor's per-job memory limit: a job using more fails RESOURCE_EXHAUSTED.
    max_job_memory_bytes: int | None = Field(default=None, ge=0)


class NoBid(WireModel):
    """A compute node's reasoned refusal, so "why isn't my job running?" has an answer."""

    KIND: ClassVar[str] = "nobid"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    provider: str = _PEER
    reason: str = Field(max_length=64)
    message: str = Field(max_length=1024)


class Accept(WireModel):
    KIND: ClassVar[str] = "accept"
    SIGNER_FIELD: ClassVar[str] = "requester"

    job_id: str = _CID
    requester: str = _PEER
    provider: str = _PEER
    price: float = Field(ge=0)
    accepted_at: float


class Progress(WireModel):
    KIND: ClassVar[str] = "progress"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    provider: str = _PEER
    substate: Substate
    progress: float = Field(ge=0, le=100)
    at: float


class Receipt(WireModel):
    """The executor's signed statement of what it ran and what came out."""

    KIND: ClassVar[str] = "receipt"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    spec_cid: str = _CID
    model_cid: str = _CID
    inputs_cid: str = _CID
    result_cid: str = _CID
    # The result DAG's cumulative size (its blocks plus every link's Tsize, as
    # Kubo counts it): the requester fetches no more than this, or its own limit.
    result_bytes: int = Field(ge=0, le=2**64 - 1)  # what canonical CBOR can carry
    provider: str = _PEER
    execution_provider: str = Field(max_length=64)
    device: str = Field(max_length=256)
    output_digests: dict[str, str] = Field(max_length=256)
    timings_ms: dict[str, float] = Field(max_length=32)
    resources: dict[str, float] = Field(default_factory=dict, max_length=32)
    started_at: float
    finished_at: float


class Failure(WireModel):
    KIND: ClassVar[str] = "failure"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    provider: str = _PEER
    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)
    retryable: bool = False
    # What the run had used when it stopped (a canceled job is billed for this).
    resources: dict[str, float] = Field(default_factory=dict, max_length=32)
    # A result package of what finished before the failure, kept for the requester.
    partial_result_cid: str | None = Field(default=None, min_length=8, max_length=128)


class Cancel(WireModel):
    """The requester's order to stop a job, sent on the open job stream."""

    KIND: ClassVar[str] = "cancel"
    SIGNER_FIELD: ClassVar[str] = "requester"

    job_id: str = _CID
    requester: str = _PEER
    reason: str = Field(max_length=256)


class Resume(WireModel):
    """A restarted requester's request to pick up a job it accepted, sent as the first
    frame of a RESUME_PROTOCOL stream to that job's executor.

    `accepted_at` names the Accept the requester signed (its own timestamp, which
    the executor kept), `created_at` dates this request: an executor refuses one
    that names another executor, another accept, a job it never accepted from
    the signer, arrives over a connection that is not the signer's, or is older
    than its freshness window. The answer, on the same stream, is the job's
    signed receipt if it finished, its Progress frames (then its receipt) if it
    still runs, or a signed Failure.
    """

    KIND: ClassVar[str] = "resume"
    SIGNER_FIELD: ClassVar[str] = "requester"

    job_id: str = _CID
    requester: str = _PEER
    provider: str = _PEER
    accepted_at: float
    created_at: float


class Provide(WireModel):
    """A node's signed statement that it stores these DAGs and serves them over bitswap.

    Gossiped on PROVIDERS_TOPIC so any node can fetch a result CID without
    knowing who made it; `addrs` let a node that is not connected dial it.
    """

    KIND: ClassVar[str] = "provide"
    SIGNER_FIELD: ClassVar[str] = "provider"

    provider: str = _PEER
    addrs: list[str] = Field(max_length=16)
    cids: list[Annotated[str, _CID]] = Field(min_length=1, max_length=64)
    at: float


class Settlement(WireModel):
    """The requester's signed word that it accepted (or disputed) an executor's result.

    It binds the job, the exact receipt (by the CID of its signed envelope), the
    price and the verification outcome, so a compute node can prove what it
    earned to anyone holding the requester's public key, with no node running.
    `outcome`: "accepted" (receipt checks only), "verified" (agreed with another
    executor, or passed an audit), "unaudited" (sampling chose not to audit),
    "disputed" (outvoted: price 0).
    """

    KIND: ClassVar[str] = "settlement"
    SIGNER_FIELD: ClassVar[str] = "requester"

    job_id: str = _CID
    requester: str = _PEER
    provider: str = _PEER
    receipt_cid: str = _CID
    result_cid: str = _CID
    price: float = Field(ge=0)
    policy: str = Field(max_length=32, pattern=VERIFICATION_PATTERN)
    outcome: Literal["accepted", "verified", "unaudited", "disputed"]
    settled_at: float


class SettlementAck(WireModel):
    """The executor's signed acknowledgement: the requester stops resending."""

    KIND: ClassVar[str] = "settlement_ack"
    SIGNER_FIELD: ClassVar[str] = "provider"

    job_id: str = _CID
    provider: str = _PEER
    receipt_cid: str = _CID
    recorded: bool
    reason: str = Field(default="", max_length=256)


MESSAGE_TYPES: dict[str, type[WireModel]] = {
    cls.KIND: cls
    for cls in (
        JobSpec,
        Bid,
        NoBid,
        Accept,
        Progress,
        Receipt,
        Failure,
        Cancel,
        Resume,
        Provide,
        Settlement,
        SettlementAck,
    )
}

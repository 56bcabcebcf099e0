"""The pure policy both job machines consult: timeouts, retries, whether to bid
and at what ETA, how a failure is classified, whether an Accept is genuine.

These are decisions, not I/O, so they live here where a unit test can reach
every branch; the roles in node/ only gather the facts (how many jobs run now,
which providers work) and act on the answer.

Threat: every argument that came from the wire (a spec, an accept, a failure
code) is hostile until one of these functions has judged it; none of them
raises on strange input, they answer with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from protocol.errors import ErrorCode
from protocol.jobstate import JobStatus
from protocol.messages import Accept, JobSpec, Resume


@dataclass(frozen=True)
class RequesterPolicy:
    """How long a requester waits for each thing, and how often it retries.

    `silence` is how long an executor may say nothing (no progress, no
    heartbeat) while its stream stays open before the attempt is given up;
    executors send a heartbeat every `compute.HEARTBEAT` seconds, so a few
    missed heartbeats mean a stuck or hostile peer, not a slow model.
    """

    bid_window: float = 2.0
    # After the first acceptable bid, how long later bids may still compete:
    # twice the widest bid_delay spread, so nodes that heard the job together all count.
    bid_settle: float = 0.1
    max_retries: int = 2
    receipt_grace: float = 15.0
    cancel_grace: float = 5.0
    silence: float = 5.0
    spec_ttl: float = 120.0
    max_result_bytes: int = 1024**3
    # After a restart, how long the executor of a resumed job has to answer the
    # Resume (its connections come back first) before the next bid is tried.
    resume_wait: float = 20.0

    def deadline(self, started_at: float, timeout_seconds: float, window: float) -> float:
        """When the whole job is given up: bidding, the run and fetching the result."""
        return started_at + window + timeout_seconds + self.receipt_grace


HEARTBEAT = 1.0
"""Seconds between an executor's progress frames when nothing else changes."""

PROGRESS_INTERVAL = 0.05
"""Least seconds between two progress frames of one run: a point that a newer one
(or the receipt) replaces sooner is never sent. Each frame is signed, sent,
verified and logged on both sides; a job whose run takes 10 ms reported five
points that nobody could have watched, and under `redundant:2` those frames
from two executors at once were a third of the extra latency."""


@dataclass(frozen=True)
class Capabilities:
    """What a compute node can offer, as measured by the node at start."""

    price: float
    providers: Sequence[str]
    device: str
    gpus: Sequence[Mapping[str, object]] = field(default_factory=tuple)
    max_model_bytes: int = 2 * 1024**3
    max_input_bytes: int = 1024**3
    # Resident memory one job may use here (None: not limited).
    max_job_memory_bytes: int | None = None


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def refusal(spec: JobSpec, caps: Capabilities) -> Refusal | None:
    """Why this node will not bid on `spec`, or None when it can run it.

    The reason names are stable (they appear in NoBid messages and users match
    on them), the message is for people.
    """
    req = spec.requirements
    if req.provider == "cuda" and "CUDAExecutionProvider" not in caps.providers:
        return Refusal("PROVIDER_UNAVAILABLE", "this node has no working CUDA provider")
    if req.provider == "tensorrt" and "TensorrtExecutionProvider" not in caps.providers:
        return Refusal("PROVIDER_UNAVAILABLE", "this node has no working TensorRT provider")
    if req.gpu_count > len(caps.gpus):
        have = f"{len(caps.gpus)} GPU(s)" if caps.gpus else "no GPU"
        return Refusal("NO_GPU", f"job needs {req.gpu_count} GPU(s); this node has {have}")
    if req.gpu_type and not any(
        req.gpu_type.lower() in str(g.get("name", "")).lower() for g in caps.gpus
    ):
        return Refusal(
            "GPU_TYPE_MISMATCH", f"job needs a {req.gpu_type} GPU; this node has {caps.device}"
        )
    if req.min_vram_gb > 0:
        vram = max((_int(g.get("vram_bytes")) for g in caps.gpus), default=0) / 1024**3
        if vram < req.min_vram_gb:
            return Refusal(
                "INSUFFICIENT_VRAM",
                f"job needs {req.min_vram_gb:g} GB of GPU memory; this node has {vram:.1f} GB",
            )
    if caps.max_job_memory_bytes is not None and req.min_memory_gb > 0:
        memory = caps.max_job_memory_bytes / 1024**3
        if memory < req.min_memory_gb:
            return Refusal(
                "INSUFFICIENT_MEMORY",
                f"job needs {req.min_memory_gb:g} GB of memory; this node allows "
                f"{memory:.1f} GB per job",
            )
    if spec.max_price is not None and caps.price > spec.max_price:
        return Refusal(
            "PRICE_TOO_LOW", f"max price {spec.max_price} is below this node's {caps.price}"
        )
    limit = min(caps.max_model_bytes, req.max_model_bytes or caps.max_model_bytes)
    if spec.model_bytes > limit:
        return Refusal("MODEL_TOO_LARGE", f"model of {spec.model_bytes} bytes exceeds {limit}")
    if spec.inputs_bytes > caps.max_input_bytes:
        return Refusal(
            "INPUT_TOO_LARGE",
            f"inputs of {spec.inputs_bytes} bytes exceed {caps.max_input_bytes}",
        )
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def eta_seconds(running: int) -> float:
    """The ETA a compute node promises: half a second per job ahead of this one, and this one."""
    return max(0.05, 0.5 * (1 + max(running, 0)))


def accept_problem(
    accept: Accept, signer: str, me: str, offered_to: str | None, now: float
) -> str | None:
    """Why an Accept must be refused before anything changes, or None.

    Checked in this order so a forwarded Accept (a genuine one meant for another
    executor) is refused without touching this node's offer for the job.
    """
    if accept.provider != me:
        return "accept names another executor"
    if offered_to is None:
        return "unknown job"
    if signer != offered_to or accept.requester != offered_to:
        return "accept not signed by the job's requester"
    if accept.accepted_at > now + 300:
        return "accept dated in the future"
    return None


RESUME_WINDOW = 300.0
"""How old (or how far in the future) a Resume may be dated and still be answered."""


def resume_problem(
    resume: Resume,
    signer: str,
    remote: str,
    me: str,
    requester: str | None,
    accepted_at: float | None,
    now: float,
    window: float = RESUME_WINDOW,
) -> str | None:
    """Why a Resume must be refused, or None.

    `remote` is the peer the stream comes from (authenticated by the transport),
    `requester` the job's requester in this node's records (None: no such job
    accepted here) and `accepted_at` the time its Accept was signed with (None:
    not recorded). A Resume replayed for another job cannot pass (the job id is
    signed); one forwarded by another peer fails the connection check, so nobody
    but the requester can take over a job's stream.
    """
    if resume.provider != me:
        return "resume names another executor"
    if remote != signer:
        return "resume forwarded by a peer that did not sign it"
    if requester is None:
        return "unknown job"
    if signer != requester:
        return "resume not signed by the job's requester"
    if accepted_at is not None and resume.accepted_at != accepted_at:
        return "resume names another accept"
    if resume.created_at > now + window:
        return "resume dated in the future"
    if resume.created_at < now - window:
        return "resume too old"
    return None


@dataclass(frozen=True)
class Classified:
    status: JobStatus
    retryable: bool


def classify_failure(code: ErrorCode, details: Mapping[str, object]) -> Classified:
    """How a failed run ends on the executor and whether another node may well succeed.

    A worker process that died (it has an exit code) says nothing about the
    job: the model may have hit a bad driver, so another node is worth a try;
    so is a run that outgrew this node's memory limit, since others may allow
    more. Everything else is the job's own fault.
    """
    status = JobStatus.TIMEOUT if code == ErrorCode.TIMEOUT else JobStatus.FAILED
    died = code == ErrorCode.EXECUTION_FAILED and "exit_code" in details
    retryable = died or code == ErrorCode.RESOURCE_EXHAUSTED
    return Classified(status, retryable)


def error_code(name: str) -> ErrorCode:
    """A peer's error code, or EXECUTION_FAILED for names this node does not know."""
    try:
        return ErrorCode(name)
    except ValueError:
        return ErrorCode.EXECUTION_FAILED

"""Pure policy (protocol.policy): whether to bid, at what ETA, accept checks, failure classes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.keys import Identity
from protocol.errors import ErrorCode
from protocol.jobstate import JobStatus
from protocol.messages import Accept, JobSpec, Resume
from protocol.policy import (
    Capabilities,
    RequesterPolicy,
    accept_problem,
    classify_failure,
    error_code,
    eta_seconds,
    refusal,
    resume_problem,
)
from tests.protocol.test_messages import ALICE, BOB, JOB_ID, sample_fields

CPU = Capabilities(price=1.0, providers=("CPUExecutionProvider",), device="cpu")
H100 = Capabilities(
    price=1.0,
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    device="NVIDIA H100",
    gpus=({"name": "NVIDIA H100 80GB HBM3", "vram_bytes": 80 * 1024**3},),
    max_job_memory_bytes=4 * 1024**3,
)


def spec(**overrides: Any) -> JobSpec:
    fields = sample_fields("jobspec", ALICE.peer_id)
    requirements = {**fields["requirements"], **overrides.pop("requirements", {})}
    return JobSpec.model_validate({**fields, "requirements": requirements, **overrides})


ANY = {"provider": "any", "gpu_type": None, "gpu_count": 0, "min_vram_gb": 0.0}


@pytest.mark.parametrize(
    ("caps", "overrides", "reason"),
    [
        (CPU, {"requirements": {"provider": "cuda"}}, "PROVIDER_UNAVAILABLE"),
        (CPU, {"requirements": {**ANY, "provider": "tensorrt"}}, "PROVIDER_UNAVAILABLE"),
        (CPU, {"requirements": {**ANY, "gpu_count": 1}}, "NO_GPU"),
        (H100, {"requirements": {**ANY, "gpu_count": 2}}, "NO_GPU"),
        (H100, {"requirements": {**ANY, "gpu_type": "A100"}}, "GPU_TYPE_MISMATCH"),
        (H100, {"requirements": {**ANY, "min_vram_gb": 100.0}}, "INSUFFICIENT_VRAM"),
        (CPU, {"requirements": {**ANY, "min_vram_gb": 1.0}}, "INSUFFICIENT_VRAM"),
        (H100, {"requirements": {**ANY, "min_memory_gb": 4.5}}, "INSUFFICIENT_MEMORY"),
        (H100, {"requirements": ANY, "max_price": 0.5}, "PRICE_TOO_LOW"),
        (H100, {"requirements": {**ANY, "max_model_bytes": 10}}, "MODEL_TOO_LARGE"),
        (H100, {"requirements": ANY, "inputs_bytes": 2 * 1024**3}, "INPUT_TOO_LARGE"),
    ],
)
def test_each_refusal_has_its_reason(
    caps: Capabilities, overrides: dict[str, Any], reason: str
) -> None:
    refused = refusal(spec(**overrides), caps)
    assert refused is not None and refused.reason == reason and refused.message


def test_a_node_that_can_run_the_job_bids() -> None:
    assert refusal(spec(), H100) is None
    assert refusal(spec(requirements=ANY), CPU) is None
    # Exactly the node's limit is enough; a node without a limit takes any memory need.
    assert refusal(spec(requirements={**ANY, "min_memory_gb": 4.0}), H100) is None
    assert refusal(spec(requirements={**ANY, "min_memory_gb": 1000.0}), CPU) is None


def test_malformed_gpu_facts_do_not_crash_the_decision() -> None:
    odd = Capabilities(
        price=1.0, providers=(), device="?", gpus=({"name": 3, "vram_bytes": "lots"},)
    )
    refused = refusal(spec(requirements={**ANY, "min_vram_gb": 1.0}), odd)
    assert refused is not None and refused.reason == "INSUFFICIENT_VRAM"


@given(st.integers(min_value=-5, max_value=1000))
def test_eta_grows_with_the_jobs_ahead(running: int) -> None:
    assert eta_seconds(running) >= 0.05
    assert eta_seconds(running + 1) >= eta_seconds(running)


def accept(provider: str = BOB.peer_id, requester: str = ALICE.peer_id, at: float = 1.0) -> Accept:
    return Accept(job_id=JOB_ID, requester=requester, provider=provider, price=1.0, accepted_at=at)


def test_accept_checks_come_before_any_change() -> None:
    me, them = BOB.peer_id, ALICE.peer_id
    assert accept_problem(accept(), them, me, them, 2.0) is None
    forwarded = accept(provider=Identity(b"\x09" * 32).peer_id)
    assert accept_problem(forwarded, them, me, them, 2.0) == "accept names another executor"
    assert accept_problem(accept(), them, me, None, 2.0) == "unknown job"
    stranger = Identity(b"\x0a" * 32).peer_id
    assert accept_problem(accept(requester=stranger), stranger, me, them, 2.0) == (
        "accept not signed by the job's requester"
    )
    assert accept_problem(accept(at=10_000.0), them, me, them, 2.0) == "accept dated in the future"


def resume(**overrides: Any) -> Resume:
    fields = {**sample_fields("resume", ALICE.peer_id, BOB.peer_id), **overrides}
    return Resume.model_validate(fields)


def test_resume_checks() -> None:
    me, them = BOB.peer_id, ALICE.peer_id
    stranger = Identity(b"\x0a" * 32).peer_id
    at, now = 1_700_000_002.0, 1_700_000_020.0

    def problem(message: Resume, signer: str = them, remote: str = them, **kw: Any) -> Any:
        args = {"requester": them, "accepted_at": at, "now": now, **kw}
        return resume_problem(message, signer, remote, me, **args)

    assert problem(resume()) is None
    assert problem(resume(), accepted_at=None) is None  # nothing recorded to compare
    assert problem(resume(provider=stranger)) == "resume names another executor"
    assert problem(resume(), remote=stranger) == "resume forwarded by a peer that did not sign it"
    assert problem(resume(), requester=None) == "unknown job"
    assert problem(resume(requester=stranger), signer=stranger, remote=stranger) == (
        "resume not signed by the job's requester"
    )
    assert problem(resume(accepted_at=at + 1)) == "resume names another accept"
    assert problem(resume(created_at=now + 301)) == "resume dated in the future"
    assert problem(resume(created_at=now - 301)) == "resume too old"


@pytest.mark.parametrize(
    ("code", "details", "status", "retryable"),
    [
        (ErrorCode.EXECUTION_FAILED, {"exit_code": 137}, JobStatus.FAILED, True),
        (ErrorCode.EXECUTION_FAILED, {}, JobStatus.FAILED, False),
        (ErrorCode.TIMEOUT, {"exit_code": 1}, JobStatus.TIMEOUT, False),
        (ErrorCode.FETCH_FAILED, {}, JobStatus.FAILED, False),
        (ErrorCode.RESOURCE_EXHAUSTED, {}, JobStatus.FAILED, True),
        (ErrorCode.INPUT_TOO_LARGE, {}, JobStatus.FAILED, False),
    ],
)
def test_failures_are_classified(
    code: ErrorCode, details: dict[str, Any], status: JobStatus, retryable: bool
) -> None:
    verdict = classify_failure(code, details)
    assert (verdict.status, verdict.retryable) == (status, retryable)


def test_unknown_error_codes_from_peers_become_execution_failed() -> None:
    assert error_code("TIMEOUT") == ErrorCode.TIMEOUT
    assert error_code("made up by a peer") == ErrorCode.EXECUTION_FAILED


def test_the_deadline_covers_bidding_the_run_and_the_fetch() -> None:
    policy = RequesterPolicy(receipt_grace=15.0)
    assert policy.deadline(100.0, 60.0, 2.0) == 177.0

"""The seed adapters without a node: body translation, shapes, client signatures, and
the auth forms and error shapes the seeds expect, on an in-process server."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from pydantic import BaseModel, ConfigDict

from crypto.keys import Identity
from node.api.auth import Gate, RateLimiter
from node.api.httpapi import install_http_api
from node.api.rpc import Registry, RpcServer
from node.api.seeds import SEED_ROUTES, canonical_payload, verify_client_signature
from node.api.seedshapes import (
    aitbc_job,
    aitbc_submit_params,
    is_aitbc_submit,
    iso,
    tensorone_status,
)
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError

CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
TOKEN = "seed-token"


def test_iso_times() -> None:
    assert iso(1770976800.0) == "2026-02-13T10:00:00Z"
    assert iso(1770976800.25) == "2026-02-13T10:00:00.250Z"
    assert iso(None) is None and iso("x") is None


def test_aitbc_submit_body_translates_or_refuses() -> None:
    body = {"model": "gpt2", "input": CID, "output_config": {"destination": "local",
            "format": "json"}, "priority": "normal", "timeout_seconds": 3600}  # fmt: skip
    assert is_aitbc_submit(body)
    assert aitbc_submit_params(body) == {
        "model": "gpt2", "inputs_cid": CID, "priority": "normal", "timeout_seconds": 3600,
    }  # fmt: skip
    assert aitbc_submit_params({"model": CID, "input": "Hello"}) == {
        "model_cid": CID,
        "prompt": "Hello",
    }
    for bad, code in (
        ({"input": CID, "output_config": {"destination": "s3://b/p"}}, ErrorCode.UNSUPPORTED),
        ({"input": CID, "output_config": {"format": "pdf"}}, ErrorCode.UNSUPPORTED),
        ({"input": 7}, ErrorCode.INVALID_PARAMS),
    ):
        with pytest.raises(MeshrunError) as caught:
            aitbc_submit_params(bad)
        assert caught.value.code is code
    assert not is_aitbc_submit({"model_cid": CID, "inputs_cid": CID})


def test_aitbc_and_tensorone_views() -> None:
    job = {"job_id": "j", "status": "failed", "executor": "12D3", "result_cid": None,
           "model_cid": CID, "created_at": 1770976800.0, "started_at": 1770976860.0,
           "completed_at": 1770976900.0, "progress": 45.0, "priority": "high",
           "error": {"code": "TIMEOUT", "message": "ran out", "details": {}}}  # fmt: skip
    view = aitbc_job(job, {CID: "gpt2"})
    assert view["miner_id"] == "12D3" and view["model"] == "gpt2" and view["result"] is None
    assert view["created_at"] == "2026-02-13T10:00:00Z" and view["created_at_unix"] == 1770976800
    status = tensorone_status(job, ["resources"])
    assert status["status"] == "failed" and status["failedAt"] == "2026-02-13T10:01:40Z"
    assert status["error"]["code"] == "TIMEOUT" and status["error"]["details"]["suggestion"]
    assert {"gpuType", "gpuUtilization", "memoryUsage", "memoryTotal", "cpuUsage"} <= set(
        status["resources"]
    )
    summary = tensorone_status({**job, "status": "canceled"}, [], summary=True)
    assert summary == {"jobId": "j", "status": "cancelled", "progress": 45.0, "result": None,
                       "error": "ran out"}  # fmt: skip


def test_client_signatures() -> None:
    me = Identity.generate()
    payload = {"ClientID": me.peer_id, "Spec": {"Engine": "ONNX"}}
    body = {
        "client_public_key": base64.b64encode(me.public_key).decode(),
        "signature": base64.b64encode(me.sign(canonical_payload(payload))).decode(),
        "job_create_payload": payload,
    }
    assert verify_client_signature(body, "job_create_payload") == (payload, me.peer_id)
    libp2p_key = base64.b64encode(b"\x08\x01\x12\x20" + me.public_key).decode()
    assert verify_client_signature({**body, "client_public_key": libp2p_key},
                                   "job_create_payload")[1] == me.peer_id  # fmt: skip
    other = Identity.generate()
    for forged in (
        {**body, "job_create_payload": {**payload, "Spec": {"Engine": "Docker"}}},
        {**body, "client_public_key": base64.b64encode(other.public_key).decode()},
    ):
        with pytest.raises(MeshrunError) as caught:
            verify_client_signature(forged, "job_create_payload")
        assert caught.value.code is ErrorCode.SIGNATURE_INVALID
    lying = {"ClientID": other.peer_id, "Spec": {}}
    with pytest.raises(MeshrunError):
        verify_client_signature(
            {**body, "job_create_payload": lying,
             "signature": base64.b64encode(me.sign(canonical_payload(lying))).decode()},
            "job_create_payload",
        )  # fmt: skip


def test_hourly_cap_beside_the_minute() -> None:
    now = [0.0]
    gate = Gate(TOKEN, RateLimiter(60, clock=lambda: now[0]))
    assert gate.hourly is not None and gate.hourly.per_minute == 1000
    allowed = 0
    for _ in range(1800):  # half an hour, one call a second: always within 60 a minute
        now[0] += 1.0
        if gate.acquire("k") == 0:
            allowed += 1
    assert 1450 <= allowed <= 1550  # 1000 at once, then 1000/3600 a second
    assert Gate(TOKEN, RateLimiter(0)).hourly is None


# ----------------------------------------------------------- an in-process server


class JobIdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str
    include: list[str] = []


async def serve(nursery: trio.Nursery, rate_limit: int = 0) -> str:
    registry = Registry()

    async def job_get(p: JobIdParams) -> dict[str, Any]:
        raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job with id {p.job_id}")

    registry.register("job.get", JobIdParams, job_get, summary="s", result="r")
    server = RpcServer(registry)
    install_http_api(
        server.app, registry, bus=EventBus(), gate=Gate(TOKEN, RateLimiter(rate_limit))
    )
    port = await nursery.start(server.serve)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_token_forms_and_tensorone_errors(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    base = await serve(nursery)
    url = f"{base}/v2/jobs/job_invalid/status"
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": TOKEN},
                    {"X-Api-Key": TOKEN}):  # fmt: skip
        missing = await http.get(url, headers=headers)
        assert missing.status_code == 404, headers
        body = missing.json()
        assert body["error"] == "JOB_NOT_FOUND" and body["details"]["jobId"] == "job_invalid"
        assert body["details"]["possibleReasons"]
    for headers in ({"X-Api-Key": "your-key"}, {"Authorization": "your-key"}, {}):
        assert (await http.get(url, headers=headers)).status_code == 401
    doc = (await http.get(f"{base}/openapi.json", headers={"X-Api-Key": TOKEN})).json()
    served = {r.path for r in SEED_ROUTES if r.rpc == "job.get"}
    assert served <= set(doc["paths"]) and "/requester/submit" not in doc["paths"]


async def test_rate_limit_names_its_window(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    base = await serve(nursery, rate_limit=2)
    headers = {"X-Api-Key": TOKEN}
    answers = [await http.get(f"{base}/v2/jobs/j/status", headers=headers) for _ in range(3)]
    limited = answers[-1]
    assert limited.status_code == 429 and limited.json()["error"] == "RATE_LIMITED"
    details = limited.json()["details"]
    assert details["limit"] == 2 and details["window"] == "1m" and details["retryAfter"] >= 1


def test_estimated_completion_is_never_in_the_past_while_running() -> None:
    from node.api.methods.jobs import _refreshed_estimate

    assert _refreshed_estimate(110.0, 100.0, 5.0, now=105.0) == 110.0  # the bid's ETA holds
    assert _refreshed_estimate(101.0, 100.0, 5.0, now=150.0) == 151.0  # passed: not in the past
    assert _refreshed_estimate(101.0, 100.0, 50.0, now=150.0) == 200.0  # half done in 50 s

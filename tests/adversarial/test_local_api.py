"""A hostile local client cannot get around the HTTP door's limits.

Measured before the fix: one JSON-RPC batch of 5,000 `storage.add` calls passed
a 60-a-minute rate limit (the limiter counted the HTTP request, not the calls),
and concurrent uploads were bounded only one request at a time, so enough of
them at once could take any amount of the node's memory.

Now every call of a batch counts (a batch over what is left of the caller's
budget is refused whole, before any call runs: HTTP 429, and over WebSocket a
RATE_LIMITED error under each call's id), a batch holds at most
MAX_BATCH_CALLS calls, and all request bodies share one node-wide budget
(BUSY, HTTP 503 + Retry-After, past it) while small calls keep being served.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pydantic import BaseModel, ConfigDict
from trio_websocket import open_websocket_url

from node.api.auth import Gate, RateLimiter
from node.api.httpapi import install_http_api
from node.api.rpc import NoParams, Registry, RpcServer
from node.api.rpc.budget import BodyBudget
from node.api.rpc.jsonrpc import MAX_BATCH_CALLS
from node.dev.devstack import Devstack
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError

TOKEN = "adversarial-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WS_AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]
MAX_BODY = 64 * 1024
BUDGET = 2 * MAX_BODY + 4096  # two largest bodies, plus room for small calls


class DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str


class JobIdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


class Served:
    def __init__(self, base: str, server: RpcServer, calls: list[str]) -> None:
        self.base = base
        self.server = server
        self.calls = calls

    @property
    def ws(self) -> str:
        return self.base.replace("http://", "ws://") + "/rpc/ws"


async def serve(nursery: trio.Nursery, *, rate_limit: int = 0) -> Served:
    calls: list[str] = []
    registry = Registry()

    async def ping(_: NoParams) -> str:
        calls.append("ping")
        return "pong"

    async def upload(params: DataParams) -> int:
        calls.append("upload")
        return len(params.data)

    async def job_get(params: JobIdParams) -> dict[str, Any]:
        raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job {params.job_id}")

    registry.register("test.ping", NoParams, ping, summary="s", result="r")
    registry.register("test.upload", DataParams, upload, summary="s", result="r")
    registry.register("job.get", JobIdParams, job_get, summary="s", result="r")
    budget = BodyBudget(BUDGET, wait_seconds=0.3)
    server = RpcServer(registry, max_body_bytes=MAX_BODY, body_budget=budget)
    api = install_http_api(
        server.app, registry, bus=EventBus(), gate=Gate(TOKEN, RateLimiter(rate_limit))
    )
    assert api.budget is budget  # REST and WebSocket draw on the server's budget
    port = await nursery.start(server.serve)
    return Served(f"http://127.0.0.1:{port}", server, calls)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


def call(method: str, request_id: int | None, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        body["id"] = request_id
    return body


def pings(count: int, first_id: int = 1) -> list[dict[str, Any]]:
    return [call("test.ping", first_id + i) for i in range(count)]


# --------------------------------------------------------------------- batches


async def test_every_call_of_a_batch_counts(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    node = await serve(nursery, rate_limit=10)
    for _ in range(2):  # 4 + 4 of the 10 a minute
        ok = await http.post(f"{node.base}/rpc", json=pings(4), headers=AUTH)
        assert ok.status_code == 200 and [r["result"] for r in ok.json()] == ["pong"] * 4
    assert len(node.calls) == 8

    refused = await http.post(
        f"{node.base}/rpc", json=[*pings(3), call("test.ping", None)], headers=AUTH
    )
    assert refused.status_code == 429
    assert node.calls == ["ping"] * 8  # refused whole: none of its calls ran
    replies = refused.json()
    assert [r["id"] for r in replies] == [1, 2, 3]  # the notification gets no reply
    assert {r["error"]["data"]["code"] for r in replies} == {"RATE_LIMITED"}
    # Retry-After is when the whole batch would pass: 4 calls at one per 6 s, 1 left.
    wait = int(refused.headers["retry-after"])
    assert 17 <= wait <= 18
    assert replies[0]["error"]["data"]["details"]["retry_after"] == wait

    single = await http.post(f"{node.base}/rpc", json=call("test.ping", 7), headers=AUTH)
    assert single.status_code == 200 and single.json()["result"] == "pong"


async def test_a_batch_is_bounded(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    node = await serve(nursery)
    flood = await http.post(f"{node.base}/rpc", json=pings(MAX_BATCH_CALLS + 1), headers=AUTH)
    error = flood.json()["error"]
    assert flood.status_code == 200 and flood.json()["id"] is None
    assert error["data"]["code"] == "INVALID_REQUEST"
    assert error["data"]["details"]["max_batch_calls"] == MAX_BATCH_CALLS
    assert node.calls == []
    full = await http.post(f"{node.base}/rpc", json=pings(MAX_BATCH_CALLS), headers=AUTH)
    assert len(full.json()) == MAX_BATCH_CALLS == len(node.calls)


async def test_a_batch_longer_than_the_burst_can_never_pass(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """Retrying would never help, so it is not RATE_LIMITED (which clients retry)."""
    node = await serve(nursery, rate_limit=10)
    response = await http.post(f"{node.base}/rpc", json=pings(11), headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 200
    assert error["data"]["code"] == "INVALID_REQUEST" and "split it" in error["message"]
    assert error["data"]["details"] == {"calls": 11, "rate_limit": 10}
    assert node.calls == []


async def test_websocket_batches_count_per_call(nursery: trio.Nursery) -> None:
    node = await serve(nursery, rate_limit=5)
    async with open_websocket_url(node.ws, extra_headers=WS_AUTH) as ws:  # handshake: 1 of 5
        await ws.send_message(json.dumps(pings(3, first_id=1)))
        assert [r["result"] for r in json.loads(await ws.get_message())] == ["pong"] * 3
        await ws.send_message(json.dumps(pings(2, first_id=4)))
        refused = json.loads(await ws.get_message())
        assert [r["id"] for r in refused] == [4, 5]
        assert {r["error"]["data"]["code"] for r in refused} == {"RATE_LIMITED"}
        assert len(node.calls) == 3
        await ws.send_message(json.dumps(call("test.ping", 9)))
        assert json.loads(await ws.get_message()) == {"jsonrpc": "2.0", "id": 9, "result": "pong"}
        await ws.send_message(json.dumps(call("test.ping", 10)))
        limited = json.loads(await ws.get_message())
        assert limited["id"] == 10 and limited["error"]["data"]["code"] == "RATE_LIMITED"
        await ws.send_message(json.dumps(pings(MAX_BATCH_CALLS + 1)))
        flood = json.loads(await ws.get_message())
        assert flood["id"] is None and flood["error"]["data"]["code"] == "INVALID_REQUEST"
    assert len(node.calls) == 4


# ----------------------------------------------------------------- the budget


def upload_body(request_id: int, size: int) -> bytes:
    """A test.upload request of exactly `size` bytes."""
    head = json.dumps(call("test.upload", request_id, data="")).encode()
    pad = size - len(head)
    assert pad >= 0
    return json.dumps(call("test.upload", request_id, data="x" * pad)).encode()


async def test_concurrent_uploads_share_one_budget(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    node = await serve(nursery)
    budget = node.server.body_budget
    release = trio.Event()
    size = MAX_BODY
    results: dict[int, httpx.Response] = {}

    async def slow_upload(request_id: int) -> None:
        body = upload_body(request_id, size)

        async def chunks() -> AsyncIterator[bytes]:
            yield body[: size // 2]
            await release.wait()
            yield body[size // 2 :]

        headers = {**AUTH, "Content-Length": str(size)}
        results[request_id] = await http.post(f"{node.base}/rpc", content=chunks(), headers=headers)

    for request_id in (1, 2):
        nursery.start_soon(slow_upload, request_id)
    with trio.fail_after(10):
        while budget.used < 2 * size:
            await trio.sleep(0.01)

    # A third large body, declared or streamed, does not fit: BUSY, nothing buffered.
    busy = await http.post(f"{node.base}/rpc", content=upload_body(3, size), headers=AUTH)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    error = busy.json()["error"]
    assert error["code"] == ErrorCode.BUSY.rpc_code == -32025
    assert error["data"]["code"] == "BUSY" and error["data"]["details"]["retry_after"] == 1

    async def streamed() -> AsyncIterator[bytes]:
        body = upload_body(4, size)
        for start in range(0, size, 8192):
            yield body[start : start + 8192]

    with _MaybeCut():
        cut = await http.post(f"{node.base}/rpc", content=streamed(), headers=AUTH)
        assert cut.status_code == 503 and cut.json()["error"]["data"]["code"] == "BUSY"

    # REST bodies and WebSocket messages draw on the same budget.
    rest = await http.post(
        f"{node.base}/v1/jobs/status/batch",
        json={"job_ids": ["j" * 100] * 100},
        headers=AUTH,
    )
    assert rest.status_code == 503 and rest.json()["error"] == "BUSY"
    assert rest.headers["retry-after"] == "1"
    async with open_websocket_url(node.ws, extra_headers=WS_AUTH) as ws:
        await ws.send_message(upload_body(5, 16 * 1024).decode())
        refused = json.loads(await ws.get_message())
        assert refused["id"] is None and refused["error"]["data"]["code"] == "BUSY"
        # ... while small calls are still served.
        await ws.send_message(json.dumps(call("test.ping", 6)))
        assert json.loads(await ws.get_message())["result"] == "pong"
    small = await http.post(f"{node.base}/rpc", json=call("test.ping", 7), headers=AUTH)
    assert small.json()["result"] == "pong"
    assert node.calls == ["ping", "ping"]

    release.set()
    with trio.fail_after(10):
        while len(results) < 2:
            await trio.sleep(0.01)
    for request_id, response in results.items():
        sent = json.loads(upload_body(request_id, size))["params"]["data"]
        assert response.json() == {"jsonrpc": "2.0", "id": request_id, "result": len(sent)}
    assert budget.used == 0
    again = await http.post(f"{node.base}/rpc", content=upload_body(8, size), headers=AUTH)
    assert again.status_code == 200 and "result" in again.json()


class _MaybeCut:
    """The node may answer BUSY and close while the client is still streaming; either
    the answer arrives or the client sees the connection cut. Both leave it unbuffered."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, httpx.TransportError)


async def test_budget_waits_briefly_then_refuses() -> None:
    budget = BodyBudget(100, wait_seconds=0.2)
    with budget.hold() as first:
        await first.reserve_to(80)
        with budget.hold() as second:
            with pytest.raises(MeshrunError) as refused:
                await second.reserve_to(30)
            assert refused.value.code is ErrorCode.BUSY
            assert second.bytes == 0 and budget.used == 80
            await second.reserve_to(20)
            assert budget.used == 100

        async def free_soon() -> None:
            await trio.sleep(0.05)
            first.release()

        with budget.hold() as third:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(free_soon)
                await third.reserve_to(90)  # waits for the first to finish
            assert budget.used == 90
    assert budget.used == 0
    with budget.hold() as huge, pytest.raises(MeshrunError):
        await huge.reserve_to(101)  # more than the whole budget: refused at once


def test_limiter_takes_a_batch_all_or_nothing() -> None:
    now = [0.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # one call every 10 s
    assert limiter.acquire("a", 4) == 0.0
    assert limiter.acquire("a", 3) == pytest.approx(10.0)  # 2 left, nothing taken
    assert limiter.acquire("a", 2) == 0.0
    assert limiter.acquire("a", 0) == 0.0  # free, even when empty
    assert limiter.acquire("a", 2, need=5) == pytest.approx(50.0)
    gate = Gate("t", limiter)
    now[0] += 60
    gate.charge("b", 1, already=1)  # the middleware took it: costs nothing more
    with pytest.raises(MeshrunError) as too_long:
        gate.charge("b", 7)
    assert too_long.value.code is ErrorCode.INVALID_REQUEST
    gate.charge("b", 6)
    with pytest.raises(MeshrunError) as limited:
        gate.charge("b", 2, already=1)
    assert limited.value.code is ErrorCode.RATE_LIMITED
    assert limited.value.details["retry_after"] == 20


# ------------------------------------------------------------------ a real node


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_real_node_counts_batched_uploads(tmp_path: Path) -> None:
    """The measured attack, on a node process: a batch of 5,000 storage.add."""
    with Devstack(tmp_path, compute=0, rate_limit=30) as stack:
        node = stack.requester
        headers = {"Authorization": f"Bearer {node.token}"}

        def adds(count: int, tag: str) -> list[dict[str, Any]]:
            return [
                call("storage.add", i, data_b64=base64.b64encode(f"{tag}{i}".encode()).decode())
                for i in range(count)
            ]

        with httpx.Client(timeout=30) as http:
            flood = http.post(node.rpc_url, json=adds(5000, "flood"), headers=headers).json()
            assert flood["error"]["data"]["code"] == "INVALID_REQUEST"
            burst = http.post(node.rpc_url, json=adds(31, "burst"), headers=headers).json()
            assert burst["error"]["data"]["code"] == "INVALID_REQUEST"
            ok = http.post(node.rpc_url, json=adds(20, "ok"), headers=headers)
            assert ok.status_code == 200 and all("result" in r for r in ok.json())
            over = http.post(node.rpc_url, json=adds(10, "over"), headers=headers)
            assert over.status_code == 429
            assert len(over.json()) == 10
            assert int(over.headers["retry-after"]) >= 1
            assert http.get(node.rpc_url.removesuffix("/rpc") + "/health").status_code == 200

"""The SDK clients against a real RPC server on a loopback socket."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse

from node.client import AsyncClient, Client, RpcError
from node.rpc import NoParams, Registry, RpcServer
from protocol.errors import ErrorCode, MeshrunError

JOB_RUNTIME = 0.3


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddData(Strict):
    data_b64: str


class CidParams(Strict):
    cid: str


class SubmitParams(Strict):
    model_cid: str
    inputs_cid: str
    timeout_seconds: float
    max_price: float | None = None
    priority: int = 0


class JobIdParams(Strict):
    job_id: str


class WaitParams(Strict):
    job_id: str
    timeout: float


class FakeNode:
    """Just enough of a node's API to drive the client: jobs finish JOB_RUNTIME after submit."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.finish_at: dict[str, float] = {}
        self.wait_calls = 0
        self.get_calls = 0

    def job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id}", {"job_id": job_id})
        job = self.jobs[job_id]
        if job["status"] == "running" and trio.current_time() >= self.finish_at[job_id]:
            job["status"] = "completed"
        return dict(job)

    def registry(self, *, with_wait: bool = True) -> Registry:
        registry = Registry()

        async def node_info(params: NoParams) -> dict[str, Any]:
            return {"peer_id": "12D3KooWtest", "mode": "hybrid"}

        async def storage_add(params: AddData) -> dict[str, str]:
            data = base64.b64decode(params.data_b64)
            cid = "bafy" + hashlib.sha256(data).hexdigest()[:20]
            self.blobs[cid] = data
            return {"cid": cid}

        async def storage_get(params: CidParams) -> dict[str, str]:
            if params.cid not in self.blobs:
                raise MeshrunError(ErrorCode.CID_NOT_FOUND, f"no block {params.cid}")
            return {"data_b64": base64.b64encode(self.blobs[params.cid]).decode()}

        async def submit(params: SubmitParams) -> dict[str, Any]:
            job_id = f"job-{len(self.jobs) + 1}"
            never = params.model_cid == "never"
            self.jobs[job_id] = {"job_id": job_id, "status": "running", **params.model_dump()}
            self.finish_at[job_id] = float("inf") if never else trio.current_time() + JOB_RUNTIME
            return self.job(job_id)

        async def get(params: JobIdParams) -> dict[str, Any]:
            self.get_calls += 1
            return self.job(params.job_id)

        async def wait(params: WaitParams) -> dict[str, Any]:
            self.wait_calls += 1
            self.job(params.job_id)
            with trio.move_on_after(params.timeout):
                await trio.sleep_until(self.finish_at[params.job_id])
            return self.job(params.job_id)

        registry.register("node.info", NoParams, node_info, summary="s", result="r")
        registry.register("storage.add", AddData, storage_add, summary="s", result="r")
        registry.register("storage.get", CidParams, storage_get, summary="s", result="r")
        registry.register("job.submit", SubmitParams, submit, summary="s", result="r")
        registry.register("job.get", JobIdParams, get, summary="s", result="r")
        if with_wait:
            registry.register("job.wait", WaitParams, wait, summary="s", result="r")
        return registry


async def echo_auth(request: Request) -> JSONResponse:
    body = await request.json()
    auth = request.headers.get("authorization")
    return JSONResponse({"jsonrpc": "2.0", "id": body["id"], "result": auth})


async def start(nursery: trio.Nursery, fake: FakeNode, *, with_wait: bool = True) -> str:
    server = RpcServer(fake.registry(with_wait=with_wait))
    server.app.add_route("/echo-auth", echo_auth, methods=["POST"])
    port = await nursery.start(server.serve)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fake() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def base(nursery: trio.Nursery, fake: FakeNode) -> str:
    return await start(nursery, fake)


@pytest.fixture
async def client(base: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"{base}/rpc") as client:
        yield client


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_async_round_trip(client: AsyncClient) -> None:
    assert (await client.node_info())["peer_id"] == "12D3KooWtest"
    payload = bytes(range(256)) * 10
    cid = await client.storage_add(payload)
    assert await client.storage_get(cid) == payload
    assert await client.call("node.info") == await client.node_info()


async def test_async_job_lifecycle(client: AsyncClient, fake: FakeNode) -> None:
    job = await client.submit_job("bafymodel", "bafyinputs", max_price=2.5, priority=3)
    assert job["status"] == "running"
    assert (job["timeout_seconds"], job["max_price"], job["priority"]) == (60, 2.5, 3)
    assert (await client.get_job(job["job_id"]))["status"] == "running"
    done = await client.wait_for_job(job["job_id"], timeout=5)
    assert done["status"] == "completed"
    assert fake.wait_calls == 1


async def test_wait_for_job_times_out(client: AsyncClient) -> None:
    job = await client.submit_job("never", "bafyinputs")
    started = time.monotonic()
    with pytest.raises(RpcError) as caught:
        await client.wait_for_job(job["job_id"], timeout=0.3, poll_interval=0.05)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert caught.value.details == {"job_id": job["job_id"], "status": "running"}
    assert time.monotonic() - started < 2


async def test_wait_falls_back_to_polling_job_get(nursery: trio.Nursery) -> None:
    fake = FakeNode()
    base = await start(nursery, fake, with_wait=False)
    async with AsyncClient(f"{base}/rpc") as client:
        job = await client.submit_job("bafymodel", "bafyinputs")
        done = await client.wait_for_job(job["job_id"], timeout=5, poll_interval=0.05)
    assert done["status"] == "completed"
    assert fake.get_calls >= 2


async def test_async_errors_carry_codes(client: AsyncClient) -> None:
    with pytest.raises(RpcError) as missing:
        await client.get_job("job-404")
    assert missing.value.code is ErrorCode.JOB_NOT_FOUND
    assert missing.value.rpc_code == -32001
    assert missing.value.message == "no job job-404"
    assert missing.value.details == {"job_id": "job-404"}
    assert isinstance(missing.value, MeshrunError)

    with pytest.raises(RpcError) as unknown:
        await client.call("job.nonexistent")
    assert unknown.value.code is ErrorCode.METHOD_NOT_FOUND

    with pytest.raises(RpcError) as bad:
        await client.call("job.get", job_idd="x")
    assert bad.value.code is ErrorCode.INVALID_PARAMS
    assert "job_idd" in bad.value.message


async def test_error_code_falls_back_to_the_number() -> None:
    err = RpcError.from_error_object({"code": -32005, "message": "gone"})
    assert (err.code, err.message, err.details) == (ErrorCode.CID_NOT_FOUND, "gone", {})
    odd = RpcError.from_error_object({"code": -31999, "message": "?", "data": {"code": "NEW"}})
    assert odd.code is ErrorCode.INTERNAL_ERROR
    assert odd.rpc_code == -31999


async def test_token_is_sent_as_bearer(base: str) -> None:
    async with AsyncClient(f"{base}/echo-auth", token="s3cret") as client:
        assert await client.call("anything") == "Bearer s3cret"
    async with AsyncClient(f"{base}/echo-auth") as client:
        assert await client.call("anything") is None


async def test_non_rpc_reply_is_an_error(base: str) -> None:
    async with AsyncClient(f"{base}/nowhere") as client:
        with pytest.raises(RpcError) as caught:
            await client.call("node.info")
    assert caught.value.code is ErrorCode.INTERNAL_ERROR
    assert caught.value.details["http_status"] == 404


async def test_async_unreachable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/rpc"
    async with AsyncClient(url) as client:
        with pytest.raises(RpcError) as caught:
            await client.node_info()
    assert caught.value.code is ErrorCode.NODE_UNREACHABLE
    assert url in caught.value.message
    assert "running" in caught.value.message


async def test_sync_client_in_a_thread(base: str, fake: FakeNode) -> None:
    def use_sync_client() -> tuple[dict[str, Any], bytes, dict[str, Any], RpcError]:
        with Client(f"{base}/rpc", token="t") as client:
            info = client.node_info()
            blob = client.storage_get(client.storage_add(b"hello"))
            job = client.submit_job("bafymodel", "bafyinputs", timeout_seconds=5)
            done = client.wait_for_job(job["job_id"], timeout=5)
            try:
                client.storage_get("bafynothing")
            except RpcError as err:
                return info, blob, done, err
            raise AssertionError("storage_get of a missing CID succeeded")

    info, blob, done, err = await trio.to_thread.run_sync(use_sync_client)
    assert info["mode"] == "hybrid"
    assert blob == b"hello"
    assert done["status"] == "completed"
    assert err.code is ErrorCode.CID_NOT_FOUND


async def test_sync_unreachable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/rpc"

    def call() -> RpcError:
        with Client(url) as client:
            try:
                client.call("node.info")
            except RpcError as err:
                return err
        raise AssertionError("call to a closed port succeeded")

    err = await trio.to_thread.run_sync(call)
    assert err.code is ErrorCode.NODE_UNREACHABLE
    assert url in err.message

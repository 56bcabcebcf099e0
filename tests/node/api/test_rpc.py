"""The JSON-RPC server over a real loopback socket, spoken to with raw HTTP."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from pydantic import BaseModel, ConfigDict, Field

from node.api.rpc import NoParams, Registry, RpcServer
from protocol.errors import ErrorCode, MeshrunError

MAX_BODY = 4096


class AddParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int = Field(description="first addend")
    b: int = 0


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


class Sum(BaseModel):
    value: int


def make_registry() -> tuple[Registry, list[str]]:
    registry = Registry()
    pinged: list[str] = []

    async def add(params: AddParams) -> dict[str, int]:
        return {"sum": params.a + params.b}

    async def missing_job(params: JobParams) -> None:
        raise MeshrunError(
            ErrorCode.JOB_NOT_FOUND, f"no job {params.job_id}", {"job_id": params.job_id}
        )

    async def grouped_error(params: NoParams) -> None:
        async with trio.open_nursery() as nursery:

            async def fail() -> None:
                raise MeshrunError(ErrorCode.CID_NOT_FOUND, "gone")

            nursery.start_soon(fail)

    async def boom(params: NoParams) -> None:
        raise RuntimeError("secret internal detail")

    async def ping(params: NoParams) -> str:
        pinged.append("ping")
        return "pong"

    async def not_json(params: NoParams) -> object:
        return object()

    registry.register(
        "math.add", AddParams, add, summary="Add two ints.", result="their sum", result_model=Sum
    )
    registry.register(
        "job.missing",
        JobParams,
        missing_job,
        summary="Always fails.",
        result="never",
        errors=[ErrorCode.JOB_NOT_FOUND],
    )
    registry.register(
        "test.group", NoParams, grouped_error, summary="Fails in a nursery.", result="never"
    )
    registry.register("test.boom", NoParams, boom, summary="Crashes.", result="never")
    registry.register("test.ping", NoParams, ping, summary="Records a ping.", result='"pong"')
    registry.register(
        "test.unserializable", NoParams, not_json, summary="Bad result.", result="never"
    )
    return registry, pinged


class Node:
    def __init__(self, base: str, http: httpx.AsyncClient, pinged: list[str]) -> None:
        self.base = base
        self.http = http
        self.pinged = pinged

    async def post(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(f"{self.base}/rpc", content=content)

    async def call(self, method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        response = await self.post(body)
        assert response.status_code == 200
        reply: dict[str, Any] = response.json()
        assert reply["jsonrpc"] == "2.0"
        assert reply["id"] == request_id
        return reply


@pytest.fixture
async def node(nursery: trio.Nursery) -> AsyncIterator[Node]:
    registry, pinged = make_registry()
    server = RpcServer(registry, max_body_bytes=MAX_BODY)
    port = await nursery.start(server.serve)
    assert server.port == port
    async with httpx.AsyncClient() as http:
        yield Node(f"http://127.0.0.1:{port}", http, pinged)


def assert_error(reply: dict[str, Any], code: ErrorCode) -> dict[str, Any]:
    assert "result" not in reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == code.rpc_code
    assert error["data"]["code"] == code.value
    return error


async def test_call_by_name_and_by_position(node: Node) -> None:
    assert (await node.call("math.add", {"a": 2, "b": 3}))["result"] == {"sum": 5}
    assert (await node.call("math.add", [2, 3], request_id="abc"))["result"] == {"sum": 5}
    assert (await node.call("math.add", [7]))["result"] == {"sum": 7}


async def test_too_many_positional_params(node: Node) -> None:
    error = assert_error(await node.call("math.add", [1, 2, 3]), ErrorCode.INVALID_PARAMS)
    assert "at most 2" in error["message"]


async def test_batch_keeps_order_and_skips_notifications(node: Node) -> None:
    response = await node.post(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "math.add", "params": [1, 1]},
            {"jsonrpc": "2.0", "method": "test.ping"},
            {"jsonrpc": "2.0", "id": 2, "method": "nope"},
            {"jsonrpc": "2.0", "id": 3, "method": "math.add", "params": {"a": 10}},
            5,
        ]
    )
    replies = response.json()
    assert [r["id"] for r in replies] == [1, 2, 3, None]
    assert replies[0]["result"] == {"sum": 2}
    assert_error(replies[1], ErrorCode.METHOD_NOT_FOUND)
    assert replies[2]["result"] == {"sum": 10}
    assert_error(replies[3], ErrorCode.INVALID_REQUEST)
    assert node.pinged == ["ping"]


async def test_empty_batch_is_invalid(node: Node) -> None:
    reply = (await node.post(b"[]")).json()
    assert reply["id"] is None
    assert_error(reply, ErrorCode.INVALID_REQUEST)


async def test_notifications_get_no_response(node: Node) -> None:
    single = await node.post({"jsonrpc": "2.0", "method": "test.ping"})
    assert single.status_code == 204
    assert single.content == b""
    batch = await node.post(
        [{"jsonrpc": "2.0", "method": "test.ping"}, {"jsonrpc": "2.0", "method": "test.boom"}]
    )
    assert batch.status_code == 204
    assert node.pinged == ["ping", "ping"]


async def test_parse_error(node: Node) -> None:
    for body in (b'{"jsonrpc": "2.0", "method"', b"\xff\xfe", b"NaN"):
        reply = (await node.post(body)).json()
        assert reply["id"] is None
        assert_error(reply, ErrorCode.PARSE_ERROR)


@pytest.mark.parametrize(
    ("request_body", "fragment"),
    [
        ({"jsonrpc": "1.0", "id": 1, "method": "math.add"}, '"jsonrpc"'),
        ({"id": 1, "method": "math.add"}, '"jsonrpc"'),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, '"method"'),
        ({"jsonrpc": "2.0", "id": 1, "method": "math.add", "params": 3}, '"params"'),
        ({"jsonrpc": "2.0", "id": [1], "method": "math.add"}, '"id"'),
        ({"jsonrpc": "2.0", "id": 1, "method": "math.add", "param": {}}, "param"),
        ("just a string", "JSON object"),
    ],
)
async def test_invalid_request(node: Node, request_body: Any, fragment: str) -> None:
    reply = (await node.post(request_body)).json()
    error = assert_error(reply, ErrorCode.INVALID_REQUEST)
    assert fragment in error["message"]
    assert reply["id"] in (None, 1)


async def test_unknown_method(node: Node) -> None:
    error = assert_error(await node.call("job.nonexistent", {}), ErrorCode.METHOD_NOT_FOUND)
    assert "job.nonexistent" in error["message"]


async def test_invalid_params_name_the_fields(node: Node) -> None:
    error = assert_error(
        await node.call("math.add", {"a": "x", "bogus": 1}), ErrorCode.INVALID_PARAMS
    )
    assert "a:" in error["message"]
    assert "bogus" in error["message"]
    locs = {tuple(e["loc"]) for e in error["data"]["details"]["errors"]}
    assert locs == {("a",), ("bogus",)}
    missing = assert_error(await node.call("math.add", {}), ErrorCode.INVALID_PARAMS)
    assert "a: Field required" in missing["message"]


async def test_meshrun_error_keeps_its_code(node: Node) -> None:
    error = assert_error(await node.call("job.missing", {"job_id": "j1"}), ErrorCode.JOB_NOT_FOUND)
    assert error["code"] == -32001
    assert error["message"] == "no job j1"
    assert error["data"] == {"code": "JOB_NOT_FOUND", "details": {"job_id": "j1"}}
    grouped = assert_error(await node.call("test.group"), ErrorCode.CID_NOT_FOUND)
    assert grouped["message"] == "gone"


async def test_internal_error_is_logged_not_leaked(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="meshrun.rpc"):
        error = assert_error(await node.call("test.boom"), ErrorCode.INTERNAL_ERROR)
    assert "secret" not in json.dumps(error)
    ref = error["data"]["details"]["ref"]
    [record] = [r for r in caplog.records if r.name == "meshrun.rpc"]
    assert ref in record.getMessage()
    assert record.exc_info is not None and "secret internal detail" in str(record.exc_info[1])
    assert_error(await node.call("test.unserializable"), ErrorCode.INTERNAL_ERROR)
    assert (await node.call("math.add", [1, 2]))["result"] == {"sum": 3}


async def test_oversize_body_is_refused(node: Node) -> None:
    big = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "math.add",
        "params": {"a": 1, "pad": "x" * MAX_BODY},
    }
    response = await node.post(big)
    assert response.status_code == 413
    error = assert_error(response.json(), ErrorCode.INVALID_REQUEST)
    assert str(MAX_BODY) in error["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    streamed = await node.http.post(f"{node.base}/rpc", content=chunks())
    assert streamed.status_code == 413
    assert (await node.call("math.add", [1, 1]))["result"] == {"sum": 2}


async def test_health(node: Node) -> None:
    response = await node.http.get(f"{node.base}/health")
    assert response.json() == {"ok": True}


async def test_openrpc_document() -> None:
    registry, _ = make_registry()
    doc = registry.openrpc()
    assert doc["openrpc"].startswith("1.")
    methods = {m["name"]: m for m in doc["methods"]}
    assert set(methods) == {m.name for m in registry}
    add = methods["math.add"]
    assert add["summary"] == "Add two ints."
    assert [(p["name"], p["required"]) for p in add["params"]] == [("a", True), ("b", False)]
    assert add["params"][0]["schema"]["type"] == "integer"
    assert add["params"][0]["description"] == "first addend"
    assert add["result"]["description"] == "their sum"
    assert add["result"]["schema"]["properties"]["value"]["type"] == "integer"
    assert methods["job.missing"]["errors"][0]["code"] == -32001
    json.dumps(doc)


async def test_registry_rejects_duplicates_and_lax_models() -> None:
    registry, _ = make_registry()

    async def handler(params: NoParams) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        registry.register("math.add", NoParams, handler, summary="x", result="x")

    class Lax(BaseModel):
        a: int

    async def lax_handler(params: Lax) -> None:
        return None

    with pytest.raises(ValueError, match="forbid"):
        registry.register("lax", Lax, lax_handler, summary="x", result="x")


async def test_cancelling_the_nursery_closes_the_port() -> None:
    registry, _ = make_registry()
    server = RpcServer(registry)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
        nursery.cancel_scope.cancel()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass

"""Live job status over WebSockets against a real node: JSON-RPC at /rpc/ws (the
same methods as POST /rpc, plus job.subscribe pushes) and the REST /v1/jobs/ws."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from node.api.httpapi import install_http_api
from node.api.rpc import Registry, RpcServer
from node.client import Client, RpcError
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode

TERMINAL = {"completed", "failed", "timeout", "canceled"}


@pytest.fixture(scope="module")
def stored(api_stack: Devstack) -> dict[str, str]:
    with api_stack.requester.client() as client:
        return {
            "model_cid": client.storage_add(build_mlp(seed=6)),
            "inputs_cid": client.storage_add(encode_tensors(make_inputs(batch=2, seed=6))),
        }


def live(test: Any) -> Any:
    """Marks a test that needs the devstack's node processes."""
    return pytest.mark.multiprocess(pytest.mark.slow(test))


def ws_url(stack: Devstack, path: str) -> str:
    return stack.requester.rpc_url.removesuffix("/rpc").replace("http://", "ws://") + path


def auth(stack: Devstack) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {stack.requester.token}".encode())]


class RpcSocket:
    """A tiny JSON-RPC-over-WebSocket client that keeps replies and pushes apart."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}

    async def send(self, method: str, **params: Any) -> int:
        self.next_id += 1
        call = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        await self.ws.send_message(json.dumps(call))
        return self.next_id

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.ws.get_message())
        if "method" in message:
            self.notifications.append(message)
        elif "id" in message:
            self.replies[message["id"]] = message
        return message

    async def reply(self, request_id: int) -> dict[str, Any]:
        with trio.fail_after(30):
            while request_id not in self.replies:
                await self.receive()
        return self.replies.pop(request_id)

    async def call(self, method: str, **params: Any) -> Any:
        reply = await self.reply(await self.send(method, **params))
        if "error" in reply:
            raise RpcError.from_error_object(reply["error"])
        return reply["result"]

    async def events_until_terminal(self, job_id: str) -> list[dict[str, Any]]:
        def mine() -> list[dict[str, Any]]:
            return [
                n["params"]
                for n in self.notifications
                if n["method"] == "job.event" and n["params"]["job_id"] == job_id
            ]

        with trio.fail_after(60):
            while not any(e["status"] in TERMINAL for e in mine()):
                await self.receive()
        return mine()


@live
async def test_json_rpc_over_websocket(api_stack: Devstack) -> None:
    async with open_websocket_url(
        ws_url(api_stack, "/rpc/ws"), extra_headers=auth(api_stack)
    ) as ws:
        rpc = RpcSocket(ws)
        assert (await rpc.call("node.info"))["mode"] == "requester"
        with pytest.raises(RpcError) as missing:
            await rpc.call("job.get", job_id="no-such-job")
        assert missing.value.code is ErrorCode.JOB_NOT_FOUND

        await ws.send_message(
            json.dumps(
                [
                    {"jsonrpc": "2.0", "id": "a", "method": "node.peers"},
                    {"jsonrpc": "2.0", "method": "node.info"},  # a notification: no reply
                    {"jsonrpc": "2.0", "id": "b", "method": "no.such"},
                ]
            )
        )
        batch = json.loads(await ws.get_message())
        assert [r["id"] for r in batch] == ["a", "b"]
        assert batch[1]["error"]["data"]["code"] == "METHOD_NOT_FOUND"
        await ws.send_message("{not json")
        assert json.loads(await ws.get_message())["error"]["data"]["code"] == "PARSE_ERROR"


@live
async def test_subscribe_pushes_a_jobs_events(api_stack: Devstack, stored: dict[str, str]) -> None:
    async with open_websocket_url(
        ws_url(api_stack, "/rpc/ws"), extra_headers=auth(api_stack)
    ) as ws:
        rpc = RpcSocket(ws)
        assert await rpc.call("job.subscribe") == {"all": True, "job_ids": [], "jobs": []}
        job = await rpc.call("job.submit", **stored)
        events = await rpc.events_until_terminal(job["job_id"])
        types = [e["type"] for e in events]
        assert types[0] == "Created" and types[-1] == "Completed"
        assert "BidAccepted" in types and "ReceiptVerified" in types
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs)
        assert events[-1]["status"] == "completed" and events[-1]["progress"] == 100.0

        # Explicit ids come back with their current record; unknown ids are refused.
        state = await rpc.call("job.unsubscribe")
        assert state == {"all": False, "job_ids": [], "jobs": []}
        followed = await rpc.call("job.subscribe", job_ids=[job["job_id"]])
        assert followed["job_ids"] == [job["job_id"]]
        assert followed["jobs"][0]["status"] == "completed"
        with pytest.raises(RpcError) as unknown:
            await rpc.call("job.subscribe", job_ids=["no-such-job"])
        assert unknown.value.code is ErrorCode.JOB_NOT_FOUND
        with pytest.raises(RpcError) as bad:
            await rpc.call("job.subscribe", job_ids="not-a-list")
        assert bad.value.code is ErrorCode.INVALID_PARAMS
        assert (await rpc.call("job.unsubscribe", job_ids=[job["job_id"]]))["job_ids"] == []

        # Unsubscribed: another job's events are not pushed.
        pushed = len(rpc.notifications)
        other = await rpc.call("job.submit", **stored)
        done = await rpc.call("job.wait", job_id=other["job_id"], timeout=60)
        assert done["status"] == "completed"
        assert len(rpc.notifications) == pushed


@live
async def test_a_long_call_does_not_block_the_socket(
    api_stack: Devstack, stored: dict[str, str]
) -> None:
    async with open_websocket_url(
        ws_url(api_stack, "/rpc/ws"), extra_headers=auth(api_stack)
    ) as ws:
        rpc = RpcSocket(ws)
        stuck = await rpc.call(
            "job.submit",
            **stored,
            requirements={"provider": "tensorrt"},
            bid_window_seconds=3,
        )
        wait_id = await rpc.send("job.wait", job_id=stuck["job_id"], timeout=20)
        info_id = await rpc.send("node.info")
        order = []
        with trio.fail_after(30):
            while len(order) < 2:
                message = await rpc.receive()
                if message.get("id") in (wait_id, info_id):
                    order.append(message["id"])
        assert order == [info_id, wait_id]
        assert rpc.replies[wait_id]["result"]["status"] == "failed"


@live
def test_subscribe_over_plain_http_points_to_the_websocket(api_stack: Devstack) -> None:
    with api_stack.requester.client() as client:
        with pytest.raises(RpcError) as caught:
            client.call("job.subscribe")
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert "/rpc/ws" in caught.value.message
        names = {m["name"] for m in client.call("rpc.discover")["methods"]}
    assert {"job.subscribe", "job.unsubscribe"} <= names


@live
async def test_rest_websocket(api_stack: Devstack, stored: dict[str, str]) -> None:
    with Client(api_stack.requester.rpc_url, api_stack.requester.token) as client:
        done = client.wait_for_job(client.submit_job(**stored)["job_id"], timeout=60)
    url = ws_url(api_stack, f"/v1/jobs/ws?job_ids={done['job_id']}")
    async with open_websocket_url(url, extra_headers=auth(api_stack)) as ws:

        async def next_message() -> dict[str, Any]:
            with trio.fail_after(30):
                message: dict[str, Any] = json.loads(await ws.get_message())
            return message

        assert await next_message() == {
            "kind": "subscribed",
            "all": False,
            "job_ids": [done["job_id"]],
        }
        snapshot = await next_message()
        assert snapshot["kind"] == "event" and snapshot["type"] == "Snapshot"
        assert (
            snapshot["status"] == "completed"
            and snapshot["data"]["job"]["job_id"] == done["job_id"]
        )

        await ws.send_message(json.dumps({"action": "ping"}))
        assert await next_message() == {"kind": "pong"}
        await ws.send_message(json.dumps({"action": "dance"}))
        error = await next_message()
        assert error["kind"] == "error" and error["error"] == "INVALID_PARAMS"
        await ws.send_message(json.dumps({"action": "subscribe", "job_ids": ["no-such-job"]}))
        assert (await next_message())["error"] == "JOB_NOT_FOUND"

        await ws.send_message(json.dumps({"action": "subscribe"}))
        assert (await next_message())["all"] is True
        with Client(api_stack.requester.rpc_url, api_stack.requester.token) as client:
            job = await trio.to_thread.run_sync(lambda: client.submit_job(**stored))
        seen = []
        while not seen or seen[-1]["status"] not in TERMINAL:
            message = await next_message()
            if message.get("job_id") == job["job_id"]:
                seen.append(message)
        assert all(m["kind"] == "event" for m in seen)
        assert seen[-1]["type"] == "Completed"


async def test_a_client_that_falls_behind_is_told_and_closed(nursery: trio.Nursery) -> None:
    """The bus drops a subscriber whose buffer fills; the socket then closes with 1013
    so the client reconnects and resyncs, rather than silently missing events."""
    registry, bus = Registry(), EventBus()
    server = RpcServer(registry)
    install_http_api(server.app, registry, bus=bus, gate=None)
    port = await nursery.start(server.serve)
    async with open_websocket_url(f"ws://127.0.0.1:{port}/rpc/ws") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "job.subscribe"}))
        assert json.loads(await ws.get_message())["result"]["all"] is True
        for seq in range(3000):  # no checkpoint in between: the socket cannot keep up
            bus.publish({"job_id": "j", "seq": seq, "type": "Progress", "status": "running"})
        received = 0
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(30):
            while True:
                await ws.get_message()
                received += 1
    assert closed.value.reason.code == 1013
    assert 0 < received < 3000

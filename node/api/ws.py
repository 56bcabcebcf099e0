"""Live job status over WebSockets: JSON-RPC at `/rpc/ws`, the REST flavour at `/v1/jobs/ws`.

Both run on Starlette's WebSocket support under hypercorn, which speaks the
protocol with wsproto and runs handlers on trio like the rest of the node.

Each connection listens to the node's event bus for as long as it is open and
filters by what its client subscribed to, so subscribing and unsubscribing never
races the delivery of an event. A subscription is taken *before* the job's
current record is read and returned, so nothing that happens in between is lost;
clients drop events whose `seq` is not newer than the snapshot's. A client that
reads too slowly is dropped by the bus; it is told so and the socket is closed
(1013) so it reconnects and resyncs from `job.events`, instead of silently
missing events.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable
from typing import Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from node.api.auth import Gate, client_key
from node.api.rest import RestApi, bind_params, dump, error_body
from node.api.rpc.budget import BodyBudget, Hold
from node.api.rpc.jsonrpc import _internal_error, _meshrun_error_in, error_response, handle_body
from node.api.rpc.registry import Registry
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError

log = logging.getLogger("meshrun.ws")

MAX_SUBSCRIBED_IDS = 1000
MAX_CALLS_IN_FLIGHT = 32
WS_ONLY_METHODS = ("job.subscribe", "job.unsubscribe")


class SubscribeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_ids: list[str] | None = Field(
        default=None,
        max_length=MAX_SUBSCRIBED_IDS,
        description="jobs to follow; omitted or null follows every job on the node",
    )


class JobsSocketMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["subscribe", "unsubscribe", "ping"]
    job_ids: list[str] | None = Field(default=None, max_length=MAX_SUBSCRIBED_IDS)


def register_ws_methods(registry: Registry) -> None:
    """List job.subscribe/job.unsubscribe in the registry so rpc.discover documents them.

    They need a connection to push to, so over plain HTTP they answer with a
    pointer to /rpc/ws; the WebSocket handler serves them itself.
    """

    async def needs_websocket(_: SubscribeParams) -> None:
        raise MeshrunError(
            ErrorCode.INVALID_REQUEST,
            "job.subscribe and job.unsubscribe need a connection to push events on: "
            "use JSON-RPC over WebSocket at /rpc/ws",
        )

    for name, summary in (
        ("job.subscribe", "Push job.event notifications for these jobs (WebSocket /rpc/ws only)"),
        ("job.unsubscribe", "Stop pushing events for these jobs, or all (WebSocket only)"),
    ):
        if name not in registry:
            registry.register(
                name,
                SubscribeParams,
                needs_websocket,
                summary=summary,
                result="{all, job_ids, jobs}",
                errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.INVALID_REQUEST],
            )


class _Connection:
    """One open socket: its subscriptions, its send lock and its bus listener."""

    def __init__(
        self,
        websocket: WebSocket,
        api: RestApi,
        bus: EventBus | None,
        gate: Gate | None,
        budget: BodyBudget,
    ) -> None:
        self.websocket = websocket
        self.api = api
        self.bus = bus
        self.gate = gate
        self.budget = budget
        self.key: Hashable = client_key(websocket.scope)
        self.all_jobs = False
        self.job_ids: set[str] = set()
        self._send_lock = trio.Lock()

    def charge(self, calls: int = 1) -> None:
        """Count a message's calls (a batch's length) against the caller's rate limit."""
        if self.gate is not None:
            self.gate.charge(self.key, calls)

    def wants(self, event: dict[str, Any]) -> bool:
        return self.all_jobs or event.get("job_id") in self.job_ids

    async def send(self, value: Any) -> None:
        text = value if isinstance(value, str) else dump(value).decode()
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def subscribe(self, job_ids: list[str] | None) -> list[dict[str, Any]]:
        """Start following `job_ids` (all jobs when None); returns their snapshots."""
        if job_ids is None:
            self.all_jobs = True
            return []
        wanted = list(dict.fromkeys(job_ids))
        # Follow first, then read: an event between the two is delivered, not lost.
        added = [job_id for job_id in wanted if job_id not in self.job_ids]
        self.job_ids.update(added)
        snapshots = []
        try:
            for job_id in wanted:
                snapshot, _ = await self.api.snapshot(job_id)
                snapshots.append(snapshot)
        except BaseException:
            self.job_ids.difference_update(added)
            raise
        return snapshots

    def unsubscribe(self, job_ids: list[str] | None) -> None:
        if job_ids is None:
            self.all_jobs = False
            self.job_ids.clear()
        else:
            self.job_ids.difference_update(job_ids)

    def state(self) -> dict[str, Any]:
        return {"all": self.all_jobs, "job_ids": sorted(self.job_ids)}

    async def pump(self, notify: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Forward bus events this connection wants, until the bus drops it."""
        if self.bus is None:
            task_status.started()
            await trio.sleep_forever()
            return
        with self.bus.subscribe(None) as rx:
            task_status.started()
            async for event in rx:
                if self.wants(event):
                    await notify(event)
        log.info("closing a WebSocket whose client fell behind the event stream")
        raise _Dropped

    async def run(self, handle: Any, notify: Any, refuse: Any, initial: str | None = None) -> None:
        """Accept, then serve messages concurrently (a long job.wait must not block
        the next call), at most MAX_CALLS_IN_FLIGHT at once, until either side closes.
        Each message is charged to the node's body budget while it is served; one
        that does not fit goes to `refuse` with the BUSY error instead.
        `initial` is handled as if the client had sent it first."""
        await self.websocket.accept()
        slots = trio.Semaphore(MAX_CALLS_IN_FLIGHT)

        async def serve_one(text: str, held: Hold) -> None:
            try:
                await handle(text)
            finally:
                held.release()
                slots.release()

        async def refuse_one(err: MeshrunError) -> None:
            try:
                await refuse(err)
            finally:
                slots.release()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pump, notify)
                if initial is not None:
                    await handle(initial)
                while True:
                    message = await self.websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text = message.get("text")
                    if text is None and message.get("bytes") is not None:
                        text = message["bytes"].decode("utf-8", errors="replace")
                    if text is None:
                        continue
                    # Stop reading while the connection's slots are full, or while the
                    # node's body budget is: backpressure.
                    await slots.acquire()
                    held = Hold(self.budget)
                    try:
                        await held.reserve_to(len(text))
                    except MeshrunError as err:
                        nursery.start_soon(refuse_one, err)
                        continue
                    nursery.start_soon(serve_one, text, held)
                nursery.cancel_scope.cancel()
        except* _Dropped:
            await self._close(1013, "fell behind the event stream; reconnect and resync")
        except* (WebSocketDisconnect, RuntimeError, trio.BrokenResourceError, OSError) as group:
            # The peer went away mid-send; nothing is left to tell it.
            log.debug("WebSocket closed under us: %r", group.exceptions[0])

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await self.websocket.close(code=code, reason=reason)


class _Dropped(Exception):
    pass


class _ConnectionRegistry(Registry):
    """The node's registry as one connection sees it: every call is charged to the
    caller's rate-limit bucket, and job.subscribe/unsubscribe act on the connection.

    A Registry (not a wrapper) because the JSON-RPC envelope handling takes one and
    only ever calls `invoke`; everything else stays in the shared code.
    """

    def __init__(self, base: Registry, connection: _Connection) -> None:
        super().__init__(title=base.title, version=base.version)
        self.base = base
        self.connection = connection

    async def invoke(self, name: str, params: object) -> Any:
        # Calls were charged to the rate limit per message (handle_body), a batch whole.
        if name not in WS_ONLY_METHODS:
            return await self.base.invoke(name, params)
        bound = _bind_subscribe(name, params)
        if name == "job.subscribe":
            snapshots = await self.connection.subscribe(bound.job_ids)
            jobs = [snapshot["data"]["job"] for snapshot in snapshots]
            return {**self.connection.state(), "jobs": jobs}
        self.connection.unsubscribe(bound.job_ids)
        return {**self.connection.state(), "jobs": []}


def _bind_subscribe(name: str, params: object) -> SubscribeParams:
    bound = bind_params(name, SubscribeParams, params)
    assert isinstance(bound, SubscribeParams)
    return bound


class _Socket:
    """What both WebSocket routes share: the methods behind them, the bus, the gate
    and the upload budget, and one connection per client."""

    def __init__(
        self,
        registry: Registry,
        bus: EventBus | None,
        gate: Gate | None,
        budget: BodyBudget | None = None,
    ) -> None:
        self.registry = registry
        self.bus = bus
        self.gate = gate
        self.budget = budget or BodyBudget()

    def _connect(self, websocket: WebSocket) -> _Connection:
        api = RestApi(self.registry, self.bus, self.budget)
        return _Connection(websocket, api, self.bus, self.gate, self.budget)


class RpcSocket(_Socket):
    """JSON-RPC 2.0 over WebSocket: the same methods as POST /rpc, plus pushes."""

    async def serve(self, websocket: WebSocket) -> None:
        connection = self._connect(websocket)
        methods = _ConnectionRegistry(self.registry, connection)

        async def handle(text: str) -> None:
            reply = await handle_body(methods, text, connection.charge)
            if reply is not None:
                await connection.send(reply)

        async def refuse(err: MeshrunError) -> None:
            await connection.send(error_response(None, err))

        async def notify(event: dict[str, Any]) -> None:
            await connection.send({"jsonrpc": "2.0", "method": "job.event", "params": event})

        await connection.run(handle, notify, refuse)


class JobsSocket(_Socket):
    """`/v1/jobs/ws`: plain JSON messages for clients that do not speak JSON-RPC.

    Client → `{"action": "subscribe"|"unsubscribe", "job_ids": [...]}` or
    `{"action": "ping"}`; `?job_ids=a,b` subscribes at connect. Server →
    `{"kind": "event", ...event}` (a `Snapshot` event first for each job),
    `{"kind": "subscribed", "all", "job_ids"}`, `{"kind": "pong"}` and
    `{"kind": "error", "error": CODE, "message", "details"}`.
    """

    async def serve(self, websocket: WebSocket) -> None:
        connection = self._connect(websocket)

        async def notify(event: dict[str, Any]) -> None:
            await connection.send({"kind": "event", **event})

        async def act(message: JobsSocketMessage) -> None:
            if message.action == "ping":
                await connection.send({"kind": "pong"})
                return
            if message.action == "unsubscribe":
                connection.unsubscribe(message.job_ids)
                await connection.send({"kind": "unsubscribed", **connection.state()})
                return
            snapshots = await connection.subscribe(message.job_ids)
            await connection.send({"kind": "subscribed", **connection.state()})
            for snapshot in snapshots:
                await connection.send({"kind": "event", **snapshot})

        async def handle(text: str) -> None:
            try:
                connection.charge()
                try:
                    message = JobsSocketMessage.model_validate_json(text)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}"
                        for e in exc.errors(include_url=False)
                    )
                    raise MeshrunError(
                        ErrorCode.INVALID_PARAMS, f"invalid message: {problems}"
                    ) from None
                await act(message)
            except Exception as exc:
                err = _meshrun_error_in(exc) or _internal_error("/v1/jobs/ws", exc)
                await refuse(err)

        async def refuse(err: MeshrunError) -> None:
            await connection.send({"kind": "error", **error_body(err)})

        initial = None
        if ids := websocket.query_params.get("job_ids"):
            job_ids = [part for part in ids.split(",") if part]
            initial = dump({"action": "subscribe", "job_ids": job_ids}).decode()
        await connection.run(handle, notify, refuse, initial)

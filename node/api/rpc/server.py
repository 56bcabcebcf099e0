"""The node's local HTTP endpoint: JSON-RPC on POST /rpc, on hypercorn under trio.

It is a Starlette app so the REST shapes, the SSE stream and the IPFS-style
gateway can be mounted on the same port later (`server.app`).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import ErrorCode, MeshrunError

from .budget import DEFAULT_BODY_BUDGET_BYTES, BodyBudget, Hold
from .jsonrpc import CHARGE_KEY, admit, error_response, handle_payload, parse, refusal
from .registry import Registry

if TYPE_CHECKING:
    # trio_typing's stubs (pulled in by libp2p) shadow trio's own annotations for mypy.
    from hypercorn.typing import ASGIFramework
    from trio_typing import TaskStatus

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

_JSON = "application/json"
# Refusals that are not the request's fault get an HTTP status and Retry-After, so
# HTTP clients and proxies can back off; other JSON-RPC errors answer 200 as before.
_REFUSAL_STATUS = {ErrorCode.RATE_LIMITED: 429, ErrorCode.BUSY: 503}


class _BodyTooLarge(Exception):
    pass


class RpcServer:
    def __init__(
        self,
        registry: Registry,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_budget: BodyBudget | None = None,
    ) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        # One budget for every body this port reads at once (REST and WebSocket
        # find it on app.state); never smaller than one largest request.
        self.body_budget = body_budget or BodyBudget(max(DEFAULT_BODY_BUDGET_BYTES, max_body_bytes))
        self.port: int | None = None
        self.app = Starlette(
            routes=[
                Route("/rpc", self._rpc, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )
        self.app.state.body_budget = self.body_budget

    async def _read_body(self, request: Request, held: Hold) -> bytes:
        """Read at most max_body_bytes, refusing early so a huge upload is never buffered,
        and charge it to the node's body budget: all of a declared length up front."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_body_bytes:
                raise _BodyTooLarge
            await held.reserve_to(int(declared))
        chunks: list[bytes] = []
        size = 0
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                await held.reserve_to(size)
                chunks.append(chunk)
        return b"".join(chunks)

    async def _rpc(self, request: Request) -> Response:
        with self.body_budget.hold() as held:
            return await self._rpc_held(request, held)

    async def _rpc_held(self, request: Request, held: Hold) -> Response:
        try:
            body = await self._read_body(request, held)
        except MeshrunError as err:
            return _refusal(err, {"connection": "close"})
        except _BodyTooLarge:
            too_large = MeshrunError(
                ErrorCode.INVALID_REQUEST,
                f"request body is larger than this node's limit of {self.max_body_bytes} bytes",
                {"max_body_bytes": self.max_body_bytes},
            )
            return Response(
                error_response(None, too_large),
                status_code=413,
                media_type=_JSON,
                headers={"connection": "close"},
            )
        try:
            payload = parse(body)
        except MeshrunError as err:
            return _refusal(err)
        del body
        try:
            admit(payload, request.scope.get(CHARGE_KEY))
        except MeshrunError as err:
            return _refusal(err, text=refusal(payload, err))
        reply = await handle_payload(self.registry, payload)
        if reply is None:
            return Response(status_code=204)
        return Response(reply, media_type=_JSON)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def _config(self, host: str, port: int) -> Config:
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.errorlog = logging.getLogger("meshrun.rpc.http")
        config.accesslog = None
        config.include_server_header = False
        config.graceful_timeout = 1.0
        return config

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `nursery.start(server.serve)` returns the bound port.

        Hypercorn reports the addresses it bound (from getsockname) through its own
        task_status, which is how port=0 becomes a real port without racing a
        probe socket against another process.
        """
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(hypercorn_serve, cast("ASGIFramework", self.app), self._config(host, port))
            )
            bound = urlsplit(binds[0]).port
            if bound is None:
                raise RuntimeError(f"hypercorn reported no port in {binds!r}")
            self.port = bound
            task_status.started(bound)


def _refusal(
    err: MeshrunError, headers: dict[str, str] | None = None, *, text: str | None = None
) -> Response:
    """A request refused before any call ran: 429/503 + Retry-After for RATE_LIMITED
    and BUSY, 200 for the rest (parse errors, invalid or oversized batches). The body
    is `text`, else one JSON-RPC error with id null."""
    status = _REFUSAL_STATUS.get(err.code, 200)
    extra = dict(headers or {})
    if status != 200:
        extra["retry-after"] = str(err.details.get("retry_after", 1))
    body = text or error_response(None, err)
    return Response(body, status_code=status, media_type=_JSON, headers=extra)

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

from .jsonrpc import error_response, handle_body
from .registry import Registry

if TYPE_CHECKING:
    # trio_typing's stubs (pulled in by libp2p) shadow trio's own annotations for mypy.
    from hypercorn.typing import ASGIFramework
    from trio_typing import TaskStatus

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

_JSON = "application/json"


class _BodyTooLarge(Exception):
    pass


class RpcServer:
    def __init__(self, registry: Registry, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.port: int | None = None
        self.app = Starlette(
            routes=[
                Route("/rpc", self._rpc, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )

    async def _read_body(self, request: Request) -> bytes:
        """Read at most max_body_bytes, refusing early so a huge upload is never buffered."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    async def _rpc(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            err = MeshrunError(
                ErrorCode.INVALID_REQUEST,
                f"request body is larger than this node's limit of {self.max_body_bytes} bytes",
                {"max_body_bytes": self.max_body_bytes},
            )
            return Response(
                error_response(None, err),
                status_code=413,
                media_type=_JSON,
                headers={"connection": "close"},
            )
        reply = await handle_body(self.registry, body)
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

"""Everything a node serves over HTTP besides POST /rpc, put on the RPC server's app.

One port, one Starlette app, one door: the auth middleware sits in front of the
JSON-RPC endpoint, the REST routes, both WebSockets, the SSE stream and
/openapi.json alike, so no route can forget to check the token.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from node.api.auth import AuthMiddleware, Gate
from node.api.openapi import openapi_document
from node.api.rest import RestApi, json_response
from node.api.rpc.budget import BodyBudget
from node.api.rpc.registry import Registry
from node.api.seeds import SeedApi
from node.api.ws import JobsSocket, RpcSocket, register_ws_methods
from node.jobs.bus import EventBus


def install_http_api(
    app: Starlette,
    registry: Registry,
    *,
    bus: EventBus | None,
    gate: Gate | None,
    budget: BodyBudget | None = None,
) -> RestApi:
    """Mount /v1 (REST, SSE, WS), /rpc/ws and /openapi.json, then guard them all.

    `gate=None` serves without a token; only tests do that, on loopback. Request
    bodies share `budget`, by default the one the RpcServer left on `app.state`, so
    POST /rpc, REST and WebSocket messages draw on one node-wide amount of memory.
    """
    budget = budget or getattr(app.state, "body_budget", None) or BodyBudget()
    register_ws_methods(registry)
    api = RestApi(registry, bus, budget)
    rest = api.app(
        extra_routes=[WebSocketRoute("/v1/jobs/ws", JobsSocket(registry, bus, gate, budget).serve)]
    )
    app.router.routes.append(
        WebSocketRoute("/rpc/ws", RpcSocket(registry, bus, gate, budget).serve)
    )
    # The seed documents' own routes (AITBC /api/v1, TensorOne /v2, Bacalhau /requester).
    app.router.routes.extend(SeedApi(api).routes())

    async def openapi(_: Request) -> Response:
        return json_response(openapi_document(api, title=registry.title, version=registry.version))

    app.add_route("/openapi.json", openapi, methods=["GET"])
    app.add_middleware(PrefixDispatch, prefix="/v1", target=rest)
    if gate is not None:
        app.add_middleware(AuthMiddleware, gate=gate)  # added last: it runs first
    return api


class PrefixDispatch:
    """Send every request under `prefix` to `target`, whatever its path contains.

    Not a Starlette Mount: a Mount's pattern does not match paths with a newline
    (`%0A`) in them, which then fell through to the plain-text 404 of the outer app.
    """

    def __init__(self, app: ASGIApp, prefix: str, target: ASGIApp) -> None:
        self.app = app
        self.prefix = prefix
        self.target = target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (
            path == self.prefix or path.startswith(self.prefix + "/")
        ):
            await self.target(scope, receive, send)
        else:
            await self.app(scope, receive, send)

"""The explorer: server-rendered pages for a person, at `/` on the node's HTTP port.

Log in once (paste the token, or open the one-time link `meshrun client open`
prints); the browser then holds a session cookie (HttpOnly, SameSite=Strict, an
HMAC under the token, see node/api/auth.py) instead of the token. Pages read
through the same JSON-RPC registry every client uses, so they show exactly
what `job.get`, `job.events`, `job.bids`, `node.peers` and `node.earnings` say.

Threats: job fields, peer ids, refusal reasons and error messages were written
by other peers. Every value goes through Jinja's autoescaping (never `|safe`),
the JS sets only `textContent`, and a strict CSP (`script-src 'self'`, no inline
script, no framing) means an escaping slip could still not run script. Every
POST carries a CSRF token bound to the session (the login form, before there is
a session, a double-submit cookie); the cookie is never accepted on `/rpc` or
WebSockets, so the API's Authorization-header rule is as strict as before.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import trio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from node.api.auth import AUTHORIZED_KEY, SESSION_COOKIE, Gate, session_cookie
from node.api.rest import JOB_STATUSES, dump
from node.api.rpc.registry import Registry
from node.api.share import parse_duration
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError

log = logging.getLogger("meshrun.explorer")

HERE = Path(__file__).resolve().parent
LOGIN_COOKIE = "meshrun_login"
LOGIN_LINK_SECONDS = 120
MAX_LOGIN_LINKS = 64
MAX_FORM_BYTES = 16 * 1024
KEEPALIVE_SECONDS = 15.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATIC = {"explorer.js": "text/javascript", "explorer.css": "text/css"}


def _when(value: Any) -> str:
    if not isinstance(value, int | float) or value <= 0:
        return "—"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginLinkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    next: str = Field(default="/", max_length=512, description="page to open after login")


class Explorer:
    def __init__(self, registry: Registry, bus: EventBus | None, gate: Gate) -> None:
        self.registry = registry
        self.bus = bus
        self.gate = gate
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters["when"] = _when
        # One-time login links: nonce -> (expiry, next page); in memory, so a restart
        # (which also changes the token) voids them.
        self._links: dict[str, tuple[float, str]] = {}

    # ---------------------------------------------------------------- plumbing

    def routes(self) -> list[Route]:
        return [
            Route("/", self.jobs, methods=["GET", "HEAD"]),
            Route("/login", self.login_page, methods=["GET", "HEAD"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/ui/jobs/{job_id}", self.job, methods=["GET", "HEAD"]),
            Route("/ui/jobs/{job_id}/share", self.share, methods=["POST"]),
            Route("/ui/shares/revoke", self.revoke, methods=["POST"]),
            Route("/ui/peers", self.peers, methods=["GET", "HEAD"]),
            Route("/ui/earnings", self.earnings, methods=["GET", "HEAD"]),
            Route("/ui/events", self.events, methods=["GET"]),
            Route("/ui/static/{name}", self.static, methods=["GET", "HEAD"]),
        ]

    def register(self, registry: Registry) -> None:
        @registry.method(
            "explorer.login_link", LoginLinkParams,
            summary="A one-time link that logs a browser into the explorer (2 minutes)",
            result="{url, expires_at}",
        )  # fmt: skip
        async def login_link(p: LoginLinkParams) -> dict[str, Any]:
            now = time.time()
            self._links = {k: v for k, v in self._links.items() if v[0] > now}
            if len(self._links) >= MAX_LOGIN_LINKS:
                raise MeshrunError(
                    ErrorCode.RATE_LIMITED, "too many unused login links; wait two minutes"
                )
            nonce = secrets.token_urlsafe(24)
            self._links[nonce] = (now + LOGIN_LINK_SECONDS, _local(p.next))
            info = await registry.invoke("node.info", {})
            base = str(info.get("rpc_url") or "").removesuffix("/rpc")
            return {"url": f"{base}/login?once={nonce}", "expires_at": now + LOGIN_LINK_SECONDS}

    def _render(self, request: Request, name: str, code: int = 200, **context: Any) -> Response:
        session = session_cookie(request.scope)
        context.setdefault("authorized", bool(request.scope.get(AUTHORIZED_KEY)))
        context.setdefault("csrf", self.gate.csrf_token(session) if session else "")
        body = self.env.get_template(name).render(**context)
        return HTMLResponse(body, status_code=code, headers=_HEADERS)

    async def _base(self) -> dict[str, Any]:
        info = await self.registry.invoke("node.info", {})
        return {"mode": info.get("mode", ""), "peer_id": str(info.get("peer_id", ""))}

    def _login_redirect(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    async def _form(self, request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise MeshrunError(ErrorCode.MESSAGE_TOO_LARGE, "form too large")
        return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

    def _csrf_ok(self, request: Request, form: dict[str, str]) -> bool:
        return self.gate.csrf_ok(session_cookie(request.scope), form.get("csrf"))

    def _forbidden(self, message: str) -> Response:
        return HTMLResponse(
            f"<!DOCTYPE html><title>Refused</title><h1>403</h1><p>{_escape(message)}</p>",
            status_code=403,
            headers=_HEADERS,
        )

    # ---------------------------------------------------------------- login

    async def login_page(self, request: Request) -> Response:
        once = request.query_params.get("once")
        if once is not None:
            expiry, target = self._links.pop(once, (0.0, "/"))
            if expiry < time.time():
                return self._render(
                    request, "login.html", 403, error="That login link was used or has expired.",
                    login_csrf="", next="/", **await self._base(),
                )  # fmt: skip
            return self._start_session(request, target)
        csrf = secrets.token_urlsafe(24)
        response = self._render(
            request, "login.html", login_csrf=csrf,
            next=_local(request.query_params.get("next", "/")), **await self._base(),
        )  # fmt: skip
        response.set_cookie(
            LOGIN_COOKIE, csrf, max_age=600, httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )  # fmt: skip
        return response

    async def login(self, request: Request) -> Response:
        form = await self._form(request)
        expected = request.cookies.get(LOGIN_COOKIE)
        if not expected or not secrets.compare_digest(expected, form.get("csrf", "")):
            return self._forbidden("the login form expired; reload the page and try again")
        if not self.gate.accepts(form.get("token", "").strip()):
            csrf = secrets.token_urlsafe(24)
            response = self._render(
                request, "login.html", 401, error="That is not this node's token.",
                login_csrf=csrf, next=_local(form.get("next", "/")), **await self._base(),
            )  # fmt: skip
            response.set_cookie(LOGIN_COOKIE, csrf, max_age=600, httponly=True, samesite="strict")
            return response
        response = self._start_session(request, _local(form.get("next", "/")))
        response.delete_cookie(LOGIN_COOKIE)
        return response

    def _start_session(self, request: Request, target: str) -> Response:
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            SESSION_COOKIE, self.gate.new_session(), httponly=True, samesite="strict",
            secure=request.url.scheme == "https", path="/",
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        form = await self._form(request)
        if not self._csrf_ok(request, form):
            return self._forbidden("missing or wrong CSRF token")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---------------------------------------------------------------- pages

    async def jobs(self, request: Request) -> Response:
        if not request.scope.get(AUTHORIZED_KEY):
            return self._login_redirect(request)
        status = request.query_params.get("status") or None
        params: dict[str, Any] = {"limit": 100}
        if status in JOB_STATUSES:
            params["status"] = status
        else:
            status = None
        if request.query_params.get("cursor"):
            params["cursor"] = request.query_params["cursor"]
        listed = await self.registry.invoke("job.list", params)
        return self._render(
            request, "jobs.html", jobs=listed["jobs"], total=listed.get("total"),
            next_cursor=listed.get("next_cursor"), status=status, statuses=JOB_STATUSES,
            **await self._base(),
        )  # fmt: skip

    async def job(
        self, request: Request, share: Any = None, revoked: str | None = None
    ) -> Response:
        if not request.scope.get(AUTHORIZED_KEY):
            return self._login_redirect(request)
        job_id = request.path_params["job_id"]
        try:
            job = await self.registry.invoke("job.get", {"job_id": job_id})
        except MeshrunError as err:
            if err.code not in (ErrorCode.JOB_NOT_FOUND, ErrorCode.INVALID_PARAMS):
                raise
            return HTMLResponse(
                f"<!DOCTYPE html><title>No such job</title><h1>404</h1>"
                f"<p>{_escape(err.message)}</p><p><a href='/'>Jobs</a></p>",
                status_code=404,
                headers=_HEADERS,
            )
        events = (await self.registry.invoke("job.events", {"job_id": job_id}))["events"]
        bids = (await self.registry.invoke("job.bids", {"job_id": job_id}))["bids"]
        base = await self._base()
        return self._render(
            request, "job.html", job=job, events=events, bids=bids, share=share, revoked=revoked,
            can_download=base["mode"] == "requester", **base,
        )  # fmt: skip

    async def share(self, request: Request) -> Response:
        form = await self._form(request)
        if not request.scope.get(AUTHORIZED_KEY) or not self._csrf_ok(request, form):
            return self._forbidden("missing or wrong CSRF token; reload the page")
        try:
            seconds = parse_duration(form.get("expires", "7d"))
        except ValueError as exc:
            return self._forbidden(str(exc))
        created = await self.registry.invoke(
            "share.create", {"target": request.path_params["job_id"], "expires_in": seconds}
        )
        return await self.job(request, share=created)

    async def revoke(self, request: Request) -> Response:
        form = await self._form(request)
        if not request.scope.get(AUTHORIZED_KEY) or not self._csrf_ok(request, form):
            return self._forbidden("missing or wrong CSRF token; reload the page")
        done = await self.registry.invoke("share.revoke", {"share": form.get("share", "")})
        job_id = form.get("job_id")
        if job_id:
            request.scope["path_params"] = {"job_id": job_id}
            return await self.job(request, revoked=str(done["id"]))
        return RedirectResponse("/", status_code=303)

    async def peers(self, request: Request) -> Response:
        if not request.scope.get(AUTHORIZED_KEY):
            return self._login_redirect(request)
        peers = await self.registry.invoke("node.peers", {"limit": 200})
        return self._render(request, "peers.html", peers=peers, **await self._base())

    async def earnings(self, request: Request) -> Response:
        if not request.scope.get(AUTHORIZED_KEY):
            return self._login_redirect(request)
        earnings = None
        if "node.earnings" in self.registry:
            earnings = await self.registry.invoke("node.earnings", {})
        return self._render(request, "earnings.html", earnings=earnings, **await self._base())

    async def events(self, request: Request) -> Response:
        """Every job's status changes as SSE, for the live jobs list (one stream per
        page rather than one per row: browsers allow six connections per host)."""
        if not request.scope.get(AUTHORIZED_KEY) or self.bus is None:
            return self._forbidden("log in first")
        return StreamingResponse(
            _status_frames(self.bus),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return FileResponse(
            HERE / "static" / name,
            media_type=_STATIC[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )


async def _status_frames(bus: EventBus) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    with bus.subscribe(buffer=256) as events:
        while True:
            event: dict[str, Any] | None = None
            with trio.move_on_after(KEEPALIVE_SECONDS):
                try:
                    event = await events.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return  # dropped as slow: EventSource reconnects
            if event is None:
                yield b": keepalive\n\n"
                continue
            slim = {k: event.get(k) for k in ("job_id", "seq", "type", "status", "substate")}
            yield b"data: " + dump(slim) + b"\n\n"


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _local(target: str) -> str:
    """Only a path on this node: a login link must not redirect elsewhere (open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def install_explorer(
    app: Starlette, registry: Registry, bus: EventBus | None, gate: Gate
) -> Explorer:
    """Mount the explorer's routes and its `explorer.login_link` RPC method."""
    explorer = Explorer(registry, bus, gate)
    explorer.register(registry)
    for route in explorer.routes():
        app.router.routes.append(route)
    return explorer

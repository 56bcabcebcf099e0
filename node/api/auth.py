"""Who may talk to a node's HTTP door, and how often.

The token works like a wallet node's cookie file: the node writes a fresh
random token to `<data_dir>/rpc.token` (mode 0600) at every start and removes it
at shutdown. Anyone who can read the node's data dir is its owner; nobody else
can drive the node, even when a browser page or another local user reaches the
loopback port. A new token per start means a leaked one dies with a restart,
and there is no long-lived secret to rotate; clients never cache it, they read
the file next to `node.json` each time (the SDK and the CLI do).

Every HTTP request, WebSocket handshake and SSE stream needs
`Authorization: Bearer <token>`; only `GET /health` is open, so supervisors can
probe liveness without the secret. The rate limit runs before the token check,
so guessing tokens is throttled too, and valid and invalid callers from one
address count in separate buckets so a guesser cannot lock the owner out.

Browsers cannot send that header, so two narrower doors exist for them. The
explorer's session cookie (HttpOnly, SameSite=Strict, an HMAC of the token, so
it dies with the token at restart) stands in for the token on GET and HEAD
requests, never on `/rpc` or a WebSocket: a page that tricks the browser into
a request can make it read at most, and it cannot read the answer cross-origin.
Writes through the explorer are POSTs to its own routes, each checked against a
CSRF token bound to the session. And `GET /ipfs/...?share=<capability>` is let
through to the gateway, which checks the signed share link (node/api/share.py).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.websockets import WebSocket

from node.api.rest import error_response
from node.api.rpc.jsonrpc import CHARGE_KEY
from node.api.rpc.jsonrpc import error_response as rpc_error_text
from protocol.errors import ErrorCode, MeshrunError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("meshrun.auth")

TOKEN_FILE = "rpc.token"
DEFAULT_RATE_LIMIT = 60
CLIENT_KEY = "meshrun.client"
"""Scope key where the middleware leaves the caller's rate-limit bucket key, so a
WebSocket handler can charge each message to the same bucket as the handshake."""

AUTHORIZED_KEY = "meshrun.authorized"
"""Scope key: whether the caller proved it is the owner (token or session cookie).
Set on the requests the middleware lets through without that proof: explorer
pages (which answer with their login page) and share links (the gateway checks)."""
SESSION_COOKIE = "meshrun_session"

_OPEN_PATHS = frozenset({"/health"})
# The explorer's own pages: they render a login page rather than a JSON 401.
_EXPLORER_PATHS = frozenset({"/", "/login", "/logout"})
_EXPLORER_PREFIX = "/ui/"
# Browsers' WebSocket and EventSource APIs cannot set headers, so these two accept
# the token as `?access_token=` (RFC 6750 §2.3); everything else needs the header,
# which keeps the token out of URLs and proxy logs.
_QUERY_TOKEN_SUFFIXES = ("/status/stream",)


class RemoteBindRefused(ValueError):
    """Raised at start when the RPC port would face the network without consent."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_rpc_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback RPC address unless the operator said so explicitly.

    The token always protects the door, but a token is only as good as the
    channel it crosses: plain HTTP to a remote host shows it to the network.
    Opening the port beyond this machine is therefore a decision, not a default.
    """
    if not is_loopback(host) and not allow_remote:
        raise RemoteBindRefused(
            f"refusing to serve JSON-RPC on {host}: it is not a loopback address. "
            "Anyone who can reach it and read the token could drive this node, and the "
            "token travels in clear text over HTTP. Pass --allow-remote-rpc to do it anyway "
            "(put TLS in front), or keep the default 127.0.0.1."
        )


def new_token() -> str:
    """256 random bits, URL-safe, never starting with "-": one in 64 did, and
    `--token -x…` then reads as another option to argparse and to shells' tools."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def write_token(data_dir: Path) -> tuple[str, Path]:
    """Create a new token file readable by the owner only; returns (token, path).

    Written to a temporary name opened with mode 0600 and renamed into place, so
    the secret is never readable by others, not even for a moment, and a reader
    never sees a half-written file.
    """
    token = new_token()
    path = data_dir / TOKEN_FILE
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token, path


def remove_token(path: Path, token: str) -> None:
    """Delete the token file at shutdown, unless another node already replaced it."""
    with contextlib.suppress(OSError):
        if path.read_text().strip() == token:
            path.unlink()


def read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


class RateLimiter:
    """A token bucket per client: `per_minute` calls of burst, refilled evenly.

    A bucket rather than fixed one-minute windows so a client that stays under
    the rate is never refused at a window edge, and one that bursts (a CLI
    uploading a model, its inputs and submitting) is not punished for it.
    """

    _PRUNE_AT = 4096

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        window: float = 60.0,
    ) -> None:
        if per_minute < 0:
            raise ValueError("the rate limit must be >= 0 (0 disables it)")
        # `per_minute` calls per `window` seconds (an hourly bucket passes window=3600).
        self.per_minute = per_minute
        self.window = window
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self, key: Hashable, cost: int = 1, *, need: int | None = None) -> float:
        """Take `cost` calls from `key`'s bucket, all or none: 0.0 if allowed, else
        the seconds until `need` calls (default `cost`) would be in the bucket."""
        if not self.enabled or cost <= 0:
            return 0.0
        now = self._clock()
        rate = self.per_minute / self.window
        tokens, last = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            self._prune(now, rate)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (max(cost, need or 0) - tokens) / rate

    def _prune(self, now: float, rate: float) -> None:
        """Forget buckets that have refilled completely: they carry no state."""
        if len(self._buckets) < self._PRUNE_AT:
            return
        full = float(self.per_minute)
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * rate >= full:
                del self._buckets[key]


HOURLY_PER_MINUTE = 1000 / 60


def rate_limited(retry_after: float) -> MeshrunError:
    seconds = max(1, math.ceil(retry_after))
    return MeshrunError(
        ErrorCode.RATE_LIMITED,
        f"too many requests; retry in {seconds} s",
        {"retry_after": seconds},
    )


@dataclass
class Gate:
    """The node's token and rate limiter, shared by the middleware and WebSocket handlers."""

    token: str
    limiter: RateLimiter
    token_file: Path | None = None
    # GET paths served without a token besides /health (`--metrics-public`: /metrics).
    open_paths: frozenset[str] = frozenset()
    # An hourly cap beside the per-minute one: 1000 an hour at the default 60 a minute
    # (the AITBC seed's limits), scaled with --rate-limit.
    hourly: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.hourly is None and self.limiter.enabled:
            per_hour = max(
                self.limiter.per_minute, round(self.limiter.per_minute * HOURLY_PER_MINUTE)
            )
            self.hourly = RateLimiter(per_hour, clock=self.limiter._clock, window=3600.0)

    def acquire(self, key: Hashable) -> float:
        """One call from `key` against both caps: 0.0, or the seconds to wait."""
        wait = self.limiter.acquire(key)
        if wait > 0 or self.hourly is None:
            return wait
        return self.hourly.acquire(key)

    def accepts(self, presented: str | None) -> bool:
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def _mac(self, purpose: str, value: str) -> str:
        digest = hmac.new(self.token.encode(), f"{purpose}:{value}".encode(), "sha256")
        return digest.hexdigest()

    def new_session(self) -> str:
        """A session cookie value: a nonce and its HMAC under the token. Nothing is
        stored; a restart (a new token) ends every session."""
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._mac('session', nonce)}"

    def session_ok(self, value: str | None) -> bool:
        if not value or value.count(".") != 1:
            return False
        nonce, mac = value.split(".")
        return hmac.compare_digest(mac.encode(), self._mac("session", nonce).encode())

    def csrf_token(self, session: str) -> str:
        """The CSRF token of a session: only a page of this origin can read it."""
        return self._mac("csrf", session)

    def csrf_ok(self, session: str | None, presented: str | None) -> bool:
        if not session or not presented or not self.session_ok(session):
            return False
        return hmac.compare_digest(presented.encode(), self.csrf_token(session).encode())

    def charge(self, key: Hashable, calls: int = 1, *, already: int = 0) -> None:
        """Count `calls` calls (a batch's length) against `key`, all or none, of which
        `already` were taken (the middleware charges each HTTP request once). Raises
        RATE_LIMITED when the bucket lacks them, with the wait until the whole request
        would pass; a batch longer than the bucket's burst can never pass and is
        INVALID_REQUEST instead."""
        limit = self.limiter.per_minute
        if self.limiter.enabled and calls > limit:
            raise MeshrunError(
                ErrorCode.INVALID_REQUEST,
                f"a batch of {calls} calls is more than this node's rate limit of {limit} "
                "calls a minute can ever admit at once; split it",
                {"calls": calls, "rate_limit": limit},
            )
        wait = self.limiter.acquire(key, calls - already, need=calls)
        if wait > 0:
            raise rate_limited(wait)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


def presented_token(scope: Scope) -> str | None:
    """`Authorization: Bearer T`, a bare `Authorization: T` (TensorOne's seed sends the
    key so) or `X-Api-Key: T` (AITBC's); `?access_token=` on WebSockets and SSE."""
    auth = _header(scope, b"authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if not value.strip() and scheme and scheme.lower() != "bearer":
            return scheme
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    api_key = _header(scope, b"x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    path: str = scope.get("path", "")
    if scope["type"] == "websocket" or path.endswith(_QUERY_TOKEN_SUFFIXES):
        query: dict[str, list[str]] = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        values = query.get("access_token")
        if values:
            return values[-1]
    return None


def _is_rpc_path(path: str) -> bool:
    return path == "/rpc" or path.startswith("/rpc/")


def is_explorer_path(path: str) -> bool:
    return path in _EXPLORER_PATHS or path.startswith(_EXPLORER_PREFIX)


def session_cookie(scope: Scope) -> str | None:
    header = _header(scope, b"cookie")
    return cookie_parser(header).get(SESSION_COOKIE) if header else None


def _has_share(scope: Scope) -> bool:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return bool(query.get("share"))


class AuthMiddleware:
    """ASGI middleware in front of every route: rate limit, then bearer token.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses and WebSockets pass
    through untouched. Refusals speak the dialect of the route they guard: a
    JSON-RPC error object on /rpc, the REST error body elsewhere.
    """

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path: str = scope.get("path", "")
        safe = kind == "http" and scope.get("method") in ("GET", "HEAD")
        if kind not in ("http", "websocket") or (
            safe and (path in _OPEN_PATHS or path in self.gate.open_paths)
        ):
            await self.app(scope, receive, send)
            return
        presented = presented_token(scope)
        allowed = self.gate.accepts(presented)
        explorer = kind == "http" and is_explorer_path(path)
        if presented is None and kind == "http" and not _is_rpc_path(path):
            # The explorer's cookie: reads anywhere, writes only to the explorer's
            # own routes, which check each POST's CSRF token.
            allowed = (safe or explorer) and self.gate.session_ok(session_cookie(scope))
        # Let through unproven: explorer pages (they show the login page) and share
        # links (the gateway checks the capability and answers 403 itself).
        delegated = explorer or (safe and path.startswith("/ipfs/") and _has_share(scope))
        scope[AUTHORIZED_KEY] = allowed
        client = scope.get("client")
        key = (allowed, client[0] if client else None)
        wait = self.gate.acquire(key)
        if wait > 0:
            refusal = rate_limited(wait)
            # TensorOne's seed names the limit and its window beside retryAfter.
            # (The minute bucket never asks for more than 60 s: a longer wait is the hour's.)
            hourly = self.gate.hourly if wait > 60 else None
            refusal.details.update(
                limit=(hourly or self.gate.limiter).per_minute,
                window="1h" if hourly else "1m",
                retryAfter=refusal.details["retry_after"],
            )
            await self._refuse(
                scope,
                receive,
                send,
                refusal,
                429,
                {"retry-after": str(max(1, math.ceil(wait)))},
            )
            return
        if not allowed and not delegated:
            message = (
                "missing bearer token"
                if presented is None
                else "the bearer token does not match this node's"
            )
            err = MeshrunError(
                ErrorCode.UNAUTHORIZED,
                f"{message}: send 'Authorization: Bearer <token>' with the token from the "
                "node's data dir (rpc.token, written at every start)",
            )
            challenge = 'Bearer realm="meshrun"'
            if presented is not None:
                challenge += ', error="invalid_token"'
            await self._refuse(scope, receive, send, err, 401, {"www-authenticate": challenge})
            return
        scope[CLIENT_KEY] = key
        # POST /rpc charges the rest of a batch's calls once it has parsed the body.
        scope[CHARGE_KEY] = functools.partial(self.gate.charge, key, already=1)
        await self.app(scope, receive, send)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        err: MeshrunError,
        status: int,
        headers: dict[str, str],
    ) -> None:
        response: Response
        if _is_rpc_path(scope.get("path", "")):
            response = Response(
                rpc_error_text(None, err),
                status_code=status,
                media_type="application/json",
                headers=headers,
            )
        else:
            response = error_response(err, status=status, headers=headers)
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive=receive, send=send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            # Without the denial extension the handshake can only fail as HTTP 403.
            await websocket.close(code=1008, reason=err.code.value)


def client_key(scope: Scope) -> Any:
    """The rate-limit bucket the middleware assigned this connection."""
    return scope.get(CLIENT_KEY, (True, None))

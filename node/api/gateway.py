"""A read-only IPFS gateway on the node's HTTP server: `GET /ipfs/<cid>[/<path>]`.

It behaves like a Kubo path gateway so browsers, curl and IPFS tooling can read
results without the RPC: files with their content type and `Range` support,
directories as an HTML listing (or their `index.html`), `?format=car` for the
whole DAG as a CAR and `?format=raw` for one block. Content that is not local
yet is fetched first (mesh providers, then the IPFS daemon), and every block
is verified by its hash before a byte of it is sent.

Responses carry `Content-Security-Policy: sandbox`: a result is untrusted
content served from the same origin as the node's RPC, and an HTML page in it
must not be able to script requests to that RPC.

`?share=<capability>` (node/api/share.py) opens one CID's subtree to a browser
with no token: the capability is checked on every request, the directory
listing's links carry it, and a refused one gets a 403 page saying why.
"""

from __future__ import annotations

import html
import json
import mimetypes
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from node.api.share import SHARE_PARAM, ShareRefused, Shares
from protocol.errors import ErrorCode, MeshrunError
from storage.car import CAR_MEDIA_TYPE, iter_car
from storage.cid import Cid
from storage.errors import MalformedBlock, PathNotFound, StorageError, UnexpectedNodeType
from storage.ranges import file_size, is_directory, iter_file_range

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from node.content.service import Content

FETCH_TIMEOUT = 30.0
SNIFF_BYTES = 512
_IMMUTABLE = "public, max-age=29030400, immutable"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {
    ".npy": "application/octet-stream",
    ".npz": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".log": "text/plain",
    ".car": CAR_MEDIA_TYPE,
    ".cbor": "application/cbor",
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"\x1f\x8b", "application/x-gzip"),
    (b"PK\x03\x04", "application/zip"),
)


def content_type(name: str | None, head: bytes) -> str:
    """By extension when there is a name, else by sniffing the first bytes (as Kubo does)."""
    if name:
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        guessed = _TYPES.get(suffix) or mimetypes.guess_type(name, strict=False)[0]
        if guessed:
            return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
    for magic, ctype in _MAGIC:
        if head.startswith(magic):
            return ctype
    lowered = head.lstrip()[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "text/html; charset=utf-8"
    return "text/plain; charset=utf-8" if _looks_like_text(head) else "application/octet-stream"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return True
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    return not any(ord(c) < 32 and c not in "\t\n\r\f" for c in text)


def parse_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """(start, end inclusive) for a satisfiable single range, None to send it all,
    False for an unsatisfiable one (416). Multiple ranges are answered in full."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            return False
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return False
    return start, min(end, size - 1)


def _base_headers(request: Request, cid: Cid) -> dict[str, str]:
    return {
        "Etag": f'"{cid}"',
        "Cache-Control": _IMMUTABLE,
        "X-Ipfs-Path": request.url.path,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Access-Control-Allow-Origin": "*",
    }


def _error(status: int, message: str) -> Response:
    return Response(
        message + "\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={"Content-Security-Policy": "sandbox"},
    )


def _forbidden(reason: str) -> Response:
    """The page a browser shows for a refused share link: what happened, what to do."""
    body = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Link refused</title>'
        "<style>body{font-family:sans-serif;max-width:40em;margin:4em auto}</style></head>"
        f"<body><h1>403: this link does not open anything</h1><p>{html.escape(reason)}.</p>"
        "<p>Ask whoever sent it for a new link.</p></body></html>"
    )
    return Response(
        body,
        status_code=403,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


class Gateway:
    def __init__(
        self,
        content: Content,
        fetch_timeout: float = FETCH_TIMEOUT,
        *,
        shares: Shares | None = None,
        on_served: Callable[[int], None] | None = None,
    ) -> None:
        self.content = content
        self.fetch_timeout = fetch_timeout
        self.shares = shares
        self.on_served = on_served

    @property
    def store(self) -> Any:
        return self.content.store

    def routes(self) -> list[Route]:
        methods = ["GET", "HEAD"]
        return [
            Route("/ipfs/{cid}", self.handle, methods=methods),
            Route("/ipfs/{cid}/{path:path}", self.handle, methods=methods),
        ]

    async def handle(self, request: Request) -> Response:
        try:
            root = Cid.decode(request.path_params["cid"])
        except ValueError as exc:
            return _error(400, f"invalid CID: {exc}")
        path = str(request.path_params.get("path", "")).strip("/")
        share = request.query_params.get(SHARE_PARAM)
        if share is not None:
            # Checked even for the owner, so the owner sees what a recipient sees.
            if self.shares is None:
                return _forbidden("this node does not accept share links")
            try:
                self.shares.check(share, str(root), path)
            except ShareRefused as exc:
                return _forbidden(str(exc))
        response = await self._serve(request, root, path, share)
        if share is not None:
            # Not "immutable": the same URL must be refused once the link expires or
            # is revoked, so neither the browser nor a proxy may keep the answer.
            response.headers["Cache-Control"] = "private, no-store"
        if self.on_served is not None and request.method == "GET" and response.status_code < 300:
            self.on_served(int(response.headers.get("content-length") or 0))
        return response

    async def _serve(self, request: Request, root: Cid, path: str, share: str | None) -> Response:
        try:
            await self.content.fetch(root, timeout=self.fetch_timeout, pin=False)
        except MeshrunError as exc:
            status = 504 if exc.code in (ErrorCode.TIMEOUT, ErrorCode.FETCH_FAILED) else 404
            if exc.code == ErrorCode.CONTENT_TOO_LARGE:  # over the node's limit, or a bomb
                status = 413
            return _error(status, exc.message)
        try:
            target = await trio.to_thread.run_sync(self.store.resolve_path, root, path)
            directory = await trio.to_thread.run_sync(is_directory, self.store.get, target)
        except (PathNotFound, UnexpectedNodeType, ValueError) as exc:
            return _error(404, f"no such path: {exc}")
        except StorageError as exc:
            return _error(502, f"cannot read {root}: {exc}")
        if request.headers.get("if-none-match", "").strip() == f'"{target}"':
            return Response(status_code=304, headers=_base_headers(request, target))
        fmt = request.query_params.get("format", "")
        accept = request.headers.get("accept", "")
        if fmt == "car" or (not fmt and CAR_MEDIA_TYPE in accept):
            return self._car(request, target)
        if fmt == "raw" or (not fmt and "application/vnd.ipld.raw" in accept):
            return await self._raw(request, target)
        if directory:
            return await self._directory(request, root, path, target, share)
        name = path.rsplit("/", 1)[-1] if path else None
        return await self._file(request, target, name)

    def _car(self, request: Request, target: Cid) -> Response:
        headers = _base_headers(request, target)
        headers["Content-Disposition"] = f'attachment; filename="{target}.car"'
        if request.method == "HEAD":
            return Response(status_code=200, media_type=CAR_MEDIA_TYPE, headers=headers)
        return StreamingResponse(
            iter_car(self.store.get, [target]), media_type=CAR_MEDIA_TYPE, headers=headers
        )

    async def _raw(self, request: Request, target: Cid) -> Response:
        block = await trio.to_thread.run_sync(self.store.get, target)
        headers = _base_headers(request, target)
        headers["Content-Disposition"] = f'attachment; filename="{target}.bin"'
        body = b"" if request.method == "HEAD" else block
        headers["Content-Length"] = str(len(block))
        return Response(body, media_type="application/vnd.ipld.raw", headers=headers)

    async def _directory(
        self, request: Request, root: Cid, path: str, target: Cid, share: str | None = None
    ) -> Response:
        if not request.url.path.endswith("/"):
            query = f"?{request.url.query}" if request.url.query else ""
            return RedirectResponse(request.url.path + "/" + query, status_code=301)
        entries = await trio.to_thread.run_sync(self.store.list_directory, target)
        for entry in entries:
            if entry.name == "index.html" and not await trio.to_thread.run_sync(
                is_directory, self.store.get, entry.cid
            ):
                return await self._file(request, entry.cid, entry.name)
        headers = _base_headers(request, target)
        listing = [
            {"name": e.name, "cid": str(e.cid), "size": e.tsize}
            for e in sorted(entries, key=lambda e: e.name)
        ]
        if "application/json" in request.headers.get("accept", ""):
            body = json.dumps({"cid": str(target), "path": path, "entries": listing}).encode()
            ctype = "application/json"
        else:
            body = _listing_html(root, path, target, listing, share).encode()
            ctype = "text/html; charset=utf-8"
        headers["Content-Length"] = str(len(body))
        return Response(
            b"" if request.method == "HEAD" else body, media_type=ctype, headers=headers
        )

    async def _file(self, request: Request, target: Cid, name: str | None) -> Response:
        get = self.store.get
        try:
            size = await trio.to_thread.run_sync(file_size, get, target)
            head = b"".join(
                await trio.to_thread.run_sync(
                    lambda: list(iter_file_range(get, target, 0, SNIFF_BYTES))
                )
            )
        except (MalformedBlock, UnexpectedNodeType) as exc:
            return _error(502, f"{target} is not a readable UnixFS file: {exc}")
        headers = _base_headers(request, target)
        headers["Accept-Ranges"] = "bytes"
        ctype = content_type(name, head)
        wanted = parse_range(request.headers.get("range"), size)
        if wanted is False:
            headers["Content-Range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        status, start, length = 200, 0, size
        if isinstance(wanted, tuple):
            start, end = wanted
            status, length = 206, end - start + 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, media_type=ctype, headers=headers)
        # A block that fails its hash check ends the stream early: the client sees a
        # short body (Content-Length mismatch), never wrong bytes.
        return StreamingResponse(
            iter_file_range(get, target, start, length),
            status_code=status,
            media_type=ctype,
            headers=headers,
        )


def _listing_html(
    root: Cid, path: str, target: Cid, entries: list[dict[str, Any]], share: str | None = None
) -> str:
    """A directory's listing. Under a share link every link carries the capability
    (relative links stay inside its scope), and entries' own CIDs are not linked:
    the capability covers paths under the shared root, not other roots."""
    title = html.escape(f"/ipfs/{root}/{path}".rstrip("/"))
    carry = f"?{SHARE_PARAM}={quote(share, safe='')}" if share is not None else ""
    rows = []
    if path:
        rows.append(f'<tr><td><a href="../{carry}">..</a></td><td></td><td></td></tr>')
    for e in entries:
        href = html.escape(quote(e["name"]) + carry)
        cid = html.escape(str(e["cid"]))
        cid_cell = (
            f"<code>{cid}</code>" if share else f'<a href="/ipfs/{cid}"><code>{cid}</code></a>'
        )
        rows.append(
            f'<tr><td><a href="{href}">{html.escape(e["name"])}</a></td>'
            f"<td>{cid_cell}</td><td>{html.escape(str(e['size']))}</td></tr>"
        )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{title}</title></head><body><h1>Index of {title}</h1>"
        f"<p><code>{target}</code></p><table><tr><th>name</th><th>CID</th><th>size</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def mount_gateway(
    app: Starlette,
    content: Content,
    *,
    shares: Shares | None = None,
    on_served: Callable[[int], None] | None = None,
) -> Gateway:
    """Add the gateway routes to the node's HTTP app (first, so no catch-all shadows them)."""
    gateway = Gateway(content, shares=shares, on_served=on_served)
    for route in reversed(gateway.routes()):
        app.router.routes.insert(0, route)
    return gateway

"""The Python SDK for a meshrun node's JSON-RPC API.

Errors come back as `RpcError` carrying the same `ErrorCode` names the node uses,
so scripts and the CLI branch on `err.code`, never on message text.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import anyio
import httpx

from protocol.errors import ErrorCode, MeshrunError, code_from_rpc
from protocol.jobstate import TERMINAL

TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)

DEFAULT_TIMEOUT = 30.0
_WAIT_SLICE = 30.0
_WAIT_MARGIN = 10.0
DEFAULT_RPC_URL = "http://127.0.0.1:7780/rpc"
NODE_FILE = "node.json"
TOKEN_FILE = "rpc.token"  # node.auth.TOKEN_FILE; kept here so the SDK stays server-free
_STREAM_RECONNECTS = 5
_RATE_LIMIT_RETRIES = 3
_RATE_LIMIT_MAX_WAIT = 10.0


class RpcError(MeshrunError):
    """An error reported by (or about reaching) a node.

    It is a MeshrunError so code that already handles local errors by code
    handles remote ones the same way.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, object] | None = None,
        *,
        rpc_code: int | None = None,
    ) -> None:
        super().__init__(code, message, details)
        self.rpc_code = code.rpc_code if rpc_code is None else rpc_code

    @classmethod
    def from_error_object(cls, error: object) -> RpcError:
        if not isinstance(error, dict):
            return cls(ErrorCode.INTERNAL_ERROR, f"malformed error from node: {error!r}")
        number = error.get("code")
        data = error.get("data")
        code: ErrorCode | None = None
        details: dict[str, object] = {}
        if isinstance(data, dict):
            try:
                code = ErrorCode(str(data.get("code")))
            except ValueError:
                code = None
            if isinstance(data.get("details"), dict):
                details = data["details"]
        if code is None:
            code = (
                code_from_rpc(number)
                if isinstance(number, int) and not isinstance(number, bool)
                else ErrorCode.INTERNAL_ERROR
            )
        message = error.get("message")
        return cls(
            code,
            message if isinstance(message, str) else str(message),
            details,
            rpc_code=number if isinstance(number, int) else None,
        )


def _unreachable(url: str, exc: Exception) -> RpcError:
    return RpcError(
        ErrorCode.NODE_UNREACHABLE,
        f"cannot reach a meshrun node at {url} ({exc.__class__.__name__}: {exc}); "
        "is the node running? Start one with `meshrun node`.",
        {"url": url},
    )


def _timed_out(url: str, method: str, exc: Exception) -> RpcError:
    return RpcError(
        ErrorCode.TIMEOUT,
        f"{method} on {url} got no reply in time ({exc.__class__.__name__})",
        {"url": url, "method": method},
    )


class _Protocol:
    """Envelope building and reply checking shared by the sync and async clients."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.headers = {"Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """The server root the REST and SSE routes hang off (the RPC URL minus /rpc)."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        path = path[: -len("/rpc")] if path.endswith("/rpc") else ""
        return f"{parts.scheme}://{parts.netloc}{path}"

    def stream_url(self, job_id: str) -> str:
        return f"{self.base_url}/v1/jobs/{quote(job_id, safe='')}/status/stream"

    def rest_error(self, response: httpx.Response) -> RpcError:
        """A REST error body ({error, message, details}) as an RpcError."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            try:
                code = ErrorCode(body["error"])
            except ValueError:
                code = ErrorCode.INTERNAL_ERROR
            details = body.get("details") if isinstance(body.get("details"), dict) else {}
            return RpcError(code, str(body.get("message", "")), details)
        hint = " (check the token)" if response.status_code in (401, 403) else ""
        return RpcError(
            ErrorCode.INTERNAL_ERROR,
            f"{response.request.url} answered HTTP {response.status_code}{hint}",
            {"http_status": response.status_code},
        )

    def request(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request_id = next(self._ids)
        return request_id, {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}

    def result(self, request_id: int, response: httpx.Response) -> Any:
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
            hint = " (check the token)" if response.status_code in (401, 403) else ""
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"{self.url} answered HTTP {response.status_code} without a JSON-RPC reply{hint}",
                {"http_status": response.status_code, "url": self.url},
            )
        if "error" in reply:
            raise RpcError.from_error_object(reply["error"])
        if reply.get("id") != request_id:
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"reply id {reply.get('id')!r} does not match request id {request_id}",
            )
        return reply["result"]


def _submit_params(
    model_cid: str,
    inputs_cid: str,
    timeout_seconds: float,
    max_price: float | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model_cid": model_cid,
        "inputs_cid": inputs_cid,
        "timeout_seconds": timeout_seconds,
    }
    if max_price is not None:
        params["max_price"] = max_price
    params.update(extra)
    return params


def _is_terminal(job: Any) -> bool:
    return isinstance(job, dict) and str(job.get("status", "")).lower() in TERMINAL_STATUSES


def _wait_timeout(job_id: str, timeout: float, job: Any) -> RpcError:
    status = job.get("status") if isinstance(job, dict) else None
    return RpcError(
        ErrorCode.TIMEOUT,
        f"job {job_id} did not finish within {timeout:g} s (last status: {status})",
        {"job_id": job_id, "status": status},
    )


def _decode_b64(result: Any, field: str) -> bytes:
    try:
        return base64.b64decode(result[field], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise RpcError(
            ErrorCode.MALFORMED_MESSAGE, f"node returned no valid base64 {field!r}"
        ) from exc


@dataclass(frozen=True)
class NodeEndpoint:
    """Where a node's RPC is and the token it wants (None: none found)."""

    url: str
    token: str | None = None
    node_file: Path | None = None


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_node_file(data_dir: Path | str) -> NodeEndpoint:
    """The endpoint a running node advertises in its data dir (node.json + rpc.token).

    Read fresh every time: the node writes a new token at each start.
    """
    path = Path(data_dir).expanduser()
    if path.is_dir() or path.name != NODE_FILE:
        path = path / NODE_FILE
    try:
        info = json.loads(path.read_text())
        url = str(info["rpc_url"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RpcError(
            ErrorCode.NODE_UNREACHABLE,
            f"no usable {NODE_FILE} at {path} ({exc.__class__.__name__}); is a node running "
            "with this --data-dir?",
            {"node_file": str(path)},
        ) from None
    token_file = Path(info.get("token_file") or path.parent / TOKEN_FILE)
    return NodeEndpoint(url, read_token_file(token_file), path)


def _same_endpoint(a: str, b: str) -> bool:
    def key(url: str) -> tuple[str, int | None, str]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = "127.0.0.1" if host == "localhost" else host
        return host, parts.port, parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:
        return False


def discover(
    url: str | None = None,
    token: str | None = None,
    *,
    data_dirs: Sequence[Path | str] = (),
    env: Mapping[str, str] | None = None,
) -> NodeEndpoint:
    """Find a node and its token the way the CLI does.

    URL: `url`, then $MESHRUN_RPC, then the first node.json in `data_dirs`, then
    the default port. Token: `token`, then $MESHRUN_TOKEN, then the rpc.token of
    the node.json whose rpc_url is the URL chosen.
    """
    env = os.environ if env is None else env
    url = url or env.get("MESHRUN_RPC") or None
    token = token or env.get("MESHRUN_TOKEN") or None
    found: list[NodeEndpoint] = []
    for data_dir in data_dirs:
        try:
            found.append(read_node_file(data_dir))
        except RpcError:
            continue
    if url is None:
        if found:
            first = found[0]
            return NodeEndpoint(first.url, token or first.token, first.node_file)
        url = DEFAULT_RPC_URL
    if token is None:
        for endpoint in found:
            if _same_endpoint(endpoint.url, url):
                return NodeEndpoint(url, endpoint.token, endpoint.node_file)
    return NodeEndpoint(url, token)


class _SseParser:
    """Server-sent events, line by line (the WHATWG rules meshrun's server needs)."""

    def __init__(self) -> None:
        self.data: list[str] = []
        self.last_id: int | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        """One line in; the event's JSON payload out when a blank line ends it."""
        if not line:
            if not self.data:
                return None
            text = "\n".join(self.data)
            self.data = []
            try:
                event = json.loads(text)
            except ValueError as exc:
                raise RpcError(
                    ErrorCode.MALFORMED_MESSAGE, f"status stream sent non-JSON data: {exc}"
                ) from None
            return event if isinstance(event, dict) else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.data.append(value)
        elif name == "id" and value.isdigit():
            self.last_id = int(value)
        return None


def _stream_headers(last_id: int | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    return headers


def _rate_limit_pause(err: RpcError, attempt: int) -> float | None:
    """How long to wait before retrying a call the node refused as RATE_LIMITED, or
    None to give up: a few short waits ride out a burst (a polling loop, a CLI
    uploading files), a long one is the caller's to decide about."""
    if err.code is not ErrorCode.RATE_LIMITED or attempt >= _RATE_LIMIT_RETRIES:
        return None
    wait = err.details.get("retry_after", 1)
    seconds = float(wait) if isinstance(wait, int | float) else 1.0
    return seconds if 0 <= seconds <= _RATE_LIMIT_MAX_WAIT else None


class Client:
    """Blocking client, for scripts and the CLI."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._proto = _Protocol(url, token)
        self._http = httpx.Client(headers=self._proto.headers, timeout=timeout, transport=transport)

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, **kwargs: Any) -> Self:
        """A client for the node running on `data_dir`, with its current token."""
        endpoint = read_node_file(data_dir)
        return cls(endpoint.url, endpoint.token, **kwargs)

    @property
    def url(self) -> str:
        return self._proto.url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, method: str, /, **params: Any) -> Any:
        return self._call(method, params)

    def _call(self, method: str, params: dict[str, Any], timeout: float | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return self._call_once(method, params, timeout)
            except RpcError as err:
                pause = _rate_limit_pause(err, attempt)
                if pause is None:
                    raise
            time.sleep(pause)
            attempt += 1

    def _call_once(self, method: str, params: dict[str, Any], timeout: float | None) -> Any:
        request_id, body = self._proto.request(method, params)
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._http.post(self.url, json=body, **extra)
        except httpx.TimeoutException as exc:
            raise _timed_out(self.url, method, exc) from exc
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return self._proto.result(request_id, response)

    def node_info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("node.info", {})
        return result

    def storage_add(self, data: bytes) -> str:
        result = self._call("storage.add", {"data_b64": base64.b64encode(data).decode()})
        return str(result["cid"])

    def storage_get(self, cid: str) -> bytes:
        return _decode_b64(self._call("storage.get", {"cid": cid}), "data_b64")

    def submit_job(
        self,
        model_cid: str,
        inputs_cid: str,
        *,
        timeout_seconds: float = 60,
        max_price: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        params = _submit_params(model_cid, inputs_cid, timeout_seconds, max_price, extra)
        result: dict[str, Any] = self._call("job.submit", params)
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("job.get", {"job_id": job_id})
        return result

    def wait_for_job(
        self, job_id: str, timeout: float = 120, poll_interval: float = 1.0
    ) -> dict[str, Any]:
        """Block until the job is terminal; long-polls `job.wait`, or polls `job.get`
        on a node without it, in slices so no single HTTP request outlives a proxy."""
        deadline = time.monotonic() + timeout
        use_wait = True
        job: Any = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _wait_timeout(job_id, timeout, job)
            started = time.monotonic()
            if use_wait:
                slice_ = min(remaining, _WAIT_SLICE)
                try:
                    job = self._call(
                        "job.wait",
                        {"job_id": job_id, "timeout": slice_},
                        timeout=slice_ + _WAIT_MARGIN,
                    )
                except RpcError as err:
                    if err.code is not ErrorCode.METHOD_NOT_FOUND:
                        raise
                    use_wait = False
                    continue
            else:
                job = self.get_job(job_id)
            if _is_terminal(job):
                return dict(job)
            delay = _pause_length(started, poll_interval, deadline)
            if delay > 0:
                time.sleep(delay)

    def stream_status(
        self, job_id: str, *, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield the job's events as they happen until one shows a terminal status.

        Over the node's SSE stream: first a `Snapshot` event (the record in
        `data.job`), then each event with the job's `status`, `substate` and
        `progress` after it. A dropped stream is resumed with Last-Event-ID, so no
        event is skipped. `timeout` bounds the whole wait (TIMEOUT error).
        """
        url = self._proto.stream_url(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        parser = _SseParser()
        failures = 0
        while True:
            try:
                with self._http.stream(
                    "GET", url, headers=_stream_headers(parser.last_id)
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        raise self._proto.rest_error(response)
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if deadline is not None and time.monotonic() > deadline:
                            raise _stream_timeout(job_id, timeout)
                        if event is None:
                            continue
                        failures = 0
                        yield event
                        if _is_terminal(event):
                            return
            except httpx.TimeoutException as exc:
                raise _timed_out(url, "status stream", exc) from exc
            except httpx.TransportError as exc:
                failures += 1
                if failures > _STREAM_RECONNECTS:
                    raise _unreachable(url, exc) from exc
            else:
                failures += 1
                if failures > _STREAM_RECONNECTS:
                    raise RpcError(
                        ErrorCode.NODE_UNREACHABLE,
                        f"status stream of {job_id} keeps ending before the job does",
                        {"url": url},
                    )
            time.sleep(min(2.0, 0.2 * failures))


class AsyncClient:
    """Async client; httpx runs on anyio, so it works under trio and asyncio alike."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._proto = _Protocol(url, token)
        self._http = httpx.AsyncClient(
            headers=self._proto.headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, **kwargs: Any) -> Self:
        """Same as `Client.from_data_dir`."""
        endpoint = read_node_file(data_dir)
        return cls(endpoint.url, endpoint.token, **kwargs)

    @property
    def url(self) -> str:
        return self._proto.url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def call(self, method: str, /, **params: Any) -> Any:
        return await self._call(method, params)

    async def _call(self, method: str, params: dict[str, Any], timeout: float | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return await self._call_once(method, params, timeout)
            except RpcError as err:
                pause = _rate_limit_pause(err, attempt)
                if pause is None:
                    raise
            await anyio.sleep(pause)
            attempt += 1

    async def _call_once(self, method: str, params: dict[str, Any], timeout: float | None) -> Any:
        request_id, body = self._proto.request(method, params)
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._http.post(self.url, json=body, **extra)
        except httpx.TimeoutException as exc:
            raise _timed_out(self.url, method, exc) from exc
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return self._proto.result(request_id, response)

    async def node_info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("node.info", {})
        return result

    async def storage_add(self, data: bytes) -> str:
        result = await self._call("storage.add", {"data_b64": base64.b64encode(data).decode()})
        return str(result["cid"])

    async def storage_get(self, cid: str) -> bytes:
        return _decode_b64(await self._call("storage.get", {"cid": cid}), "data_b64")

    async def submit_job(
        self,
        model_cid: str,
        inputs_cid: str,
        *,
        timeout_seconds: float = 60,
        max_price: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        params = _submit_params(model_cid, inputs_cid, timeout_seconds, max_price, extra)
        result: dict[str, Any] = await self._call("job.submit", params)
        return result

    async def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("job.get", {"job_id": job_id})
        return result

    async def wait_for_job(
        self, job_id: str, timeout: float = 120, poll_interval: float = 1.0
    ) -> dict[str, Any]:
        """Same contract as `Client.wait_for_job`."""
        deadline = time.monotonic() + timeout
        use_wait = True
        job: Any = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _wait_timeout(job_id, timeout, job)
            started = time.monotonic()
            if use_wait:
                slice_ = min(remaining, _WAIT_SLICE)
                try:
                    job = await self._call(
                        "job.wait",
                        {"job_id": job_id, "timeout": slice_},
                        timeout=slice_ + _WAIT_MARGIN,
                    )
                except RpcError as err:
                    if err.code is not ErrorCode.METHOD_NOT_FOUND:
                        raise
                    use_wait = False
                    continue
            else:
                job = await self.get_job(job_id)
            if _is_terminal(job):
                return dict(job)
            delay = _pause_length(started, poll_interval, deadline)
            if delay > 0:
                await anyio.sleep(delay)

    async def stream_status(
        self, job_id: str, *, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Same contract as `Client.stream_status`, as an async iterator."""
        url = self._proto.stream_url(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        parser = _SseParser()
        failures = 0
        while True:
            try:
                async with self._http.stream(
                    "GET", url, headers=_stream_headers(parser.last_id)
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise self._proto.rest_error(response)
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if deadline is not None and time.monotonic() > deadline:
                            raise _stream_timeout(job_id, timeout)
                        if event is None:
                            continue
                        failures = 0
                        yield event
                        if _is_terminal(event):
                            return
            except httpx.TimeoutException as exc:
                raise _timed_out(url, "status stream", exc) from exc
            except httpx.TransportError as exc:
                failures += 1
                if failures > _STREAM_RECONNECTS:
                    raise _unreachable(url, exc) from exc
            else:
                failures += 1
                if failures > _STREAM_RECONNECTS:
                    raise RpcError(
                        ErrorCode.NODE_UNREACHABLE,
                        f"status stream of {job_id} keeps ending before the job does",
                        {"url": url},
                    )
            await anyio.sleep(min(2.0, 0.2 * failures))


def _stream_timeout(job_id: str, timeout: float | None) -> RpcError:
    return RpcError(
        ErrorCode.TIMEOUT,
        f"job {job_id} did not finish within {timeout:g} s of streaming",
        {"job_id": job_id},
    )


def _pause_length(started: float, poll_interval: float, deadline: float) -> float:
    """Sleep only when the node answered faster than poll_interval, so a node that
    does not block in job.wait is not hammered and one that does adds no delay."""
    now = time.monotonic()
    return max(0.0, min(started + poll_interval, deadline) - now)

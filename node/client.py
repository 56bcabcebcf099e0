"""The Python SDK for a meshrun node's JSON-RPC API.

Errors come back as `RpcError` carrying the same `ErrorCode` names the node uses,
so scripts and the CLI branch on `err.code`, never on message text.
"""

from __future__ import annotations

import base64
import itertools
import time
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from protocol.errors import ErrorCode, MeshrunError, code_from_rpc
from protocol.jobstate import TERMINAL

TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)

DEFAULT_TIMEOUT = 30.0
_WAIT_SLICE = 30.0
_WAIT_MARGIN = 10.0


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


def _pause_length(started: float, poll_interval: float, deadline: float) -> float:
    """Sleep only when the node answered faster than poll_interval, so a node that
    does not block in job.wait is not hammered and one that does adds no delay."""
    now = time.monotonic()
    return max(0.0, min(started + poll_interval, deadline) - now)

"""`Client` (blocking) and `AsyncClient` (trio or asyncio): node/sdk/ops.py over httpx.

The operations are declared once, on `_Operations`, which both clients inherit;
each client only says how it carries out an effect (node/sdk/core.py): with
httpx.Client and time.sleep, or httpx.AsyncClient and anyio.sleep. A method
therefore has the same name, parameters, docstring and behaviour on both; its
result is the value itself on `Client` and an awaitable of it on `AsyncClient`
(an iterator and an async iterator for `stream_status`).
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Concatenate, Generic, Never, ParamSpec, Self, TypeVar, overload

import anyio
import httpx

from node.sdk import ops
from node.sdk.core import (
    Effect,
    Emit,
    HttpReply,
    HttpRequest,
    Machine,
    Open,
    Read,
    RetryPolicy,
    Send,
    Session,
    Sleep,
    Steps,
    Stream,
    TransportFailure,
)
from node.sdk.discovery import read_node_file

P = ParamSpec("P")
T = TypeVar("T")
Tr = TypeVar("Tr")
E = TypeVar("E")

DEFAULT_TIMEOUT = 30.0


# ---------------------------------------------------------------------------- httpx glue


def _request(http: httpx.Client | httpx.AsyncClient, request: HttpRequest) -> httpx.Request:
    timeout: Any = httpx.USE_CLIENT_DEFAULT if request.timeout is None else request.timeout
    return http.build_request(
        request.method,
        request.url,
        headers=dict(request.headers),
        json=request.json,
        timeout=timeout,
    )


def _reply(response: httpx.Response, body: bytes) -> HttpReply:
    headers = {name.lower(): value for name, value in response.headers.items()}
    return HttpReply(response.status_code, str(response.request.url), headers, body)


def _failure(exc: httpx.TransportError) -> TransportFailure:
    if isinstance(exc, httpx.TimeoutException):
        return TransportFailure("timeout", exc.__class__.__name__, str(exc))
    return TransportFailure("unreachable", exc.__class__.__name__, str(exc))


class _BlockingIO:
    """Carries out one operation's effects with an httpx.Client."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._stream: httpx.Response | None = None
        self._chunks: Iterator[bytes] = iter(())

    def perform(self, effect: Effect) -> object:
        try:
            match effect:
                case Send(request):
                    response = self._http.send(_request(self._http, request))
                    return _reply(response, response.content)
                case Open(request):
                    return self._open(request)
                case Read():
                    return next(self._chunks, None)
                case Sleep(seconds):
                    time.sleep(seconds)
            return None
        except httpx.TransportError as exc:
            return _failure(exc)

    def _open(self, request: HttpRequest) -> HttpReply:
        self.close()
        response = self._http.send(_request(self._http, request), stream=True)
        if response.status_code == 200:
            self._stream, self._chunks = response, response.iter_bytes()
            return _reply(response, b"")
        try:
            return _reply(response, response.read())
        finally:
            response.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncIO:
    """Carries out one operation's effects with an httpx.AsyncClient."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self._stream: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None

    async def perform(self, effect: Effect) -> object:
        try:
            match effect:
                case Send(request):
                    response = await self._http.send(_request(self._http, request))
                    return _reply(response, response.content)
                case Open(request):
                    return await self._open(request)
                case Read():
                    return None if self._chunks is None else await anext(self._chunks, None)
                case Sleep(seconds):
                    await anyio.sleep(seconds)
            return None
        except httpx.TransportError as exc:
            return _failure(exc)

    async def _open(self, request: HttpRequest) -> HttpReply:
        await self.aclose()
        response = await self._http.send(_request(self._http, request), stream=True)
        if response.status_code == 200:
            self._stream, self._chunks = response, response.aiter_bytes()
            return _reply(response, b"")
        try:
            return _reply(response, await response.aread())
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream, self._chunks = None, None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------- methods


_WRAPPED = re.compile(r"^(?:Machine|Stream)\[(.*)\]$")


@functools.cache
def _signature(op: Callable[..., Any], result: str) -> inspect.Signature:
    """`op`'s signature as a client method shows it: no session, the client's result."""
    signature = inspect.signature(op)
    parameters = list(signature.parameters.values())[1:]
    inner = _WRAPPED.sub(r"\1", str(signature.return_annotation))
    return signature.replace(parameters=parameters, return_annotation=result.format(inner))


def _described(method: Callable[P, T], op: Callable[..., Any], result: str) -> Callable[P, T]:
    method.__name__ = method.__qualname__ = op.__name__
    method.__doc__ = op.__doc__
    method.__signature__ = _signature(op, result)  # type: ignore[attr-defined]
    return method


class Operation(Generic[P, T]):
    """A method both clients have: `ops.<name>` run by the client it is read from."""

    def __init__(self, op: Callable[Concatenate[Session, P], Machine[T]]) -> None:
        self.op = op
        self.__doc__ = op.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: Client | AsyncClient | None, owner: type[Any]) -> Any:
        return self if client is None else client._method(self.op)


class StreamOperation(Generic[P, E]):
    """A method both clients have that hands out items as they come."""

    def __init__(self, op: Callable[Concatenate[Session, P], Stream[E]]) -> None:
        self.op = op
        self.__doc__ = op.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, Iterator[E]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> Callable[P, AsyncIterator[E]]: ...
    def __get__(self, client: Client | AsyncClient | None, owner: type[Any]) -> Any:
        return self if client is None else client._stream(self.op)


class _Operations(Generic[Tr]):
    """What both clients offer, declared once; `Tr` is the httpx transport type."""

    _RESULT = "{}"  # how help() shows a method's result; "{}" is the model
    _STREAM_RESULT = "Iterator[{}]"

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Tr | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = Session(url, token, retry=retry)
        self._connect(timeout, transport)

    def _connect(self, timeout: float, transport: Tr | None) -> None:
        raise NotImplementedError

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, **kwargs: Any) -> Self:
        """A client for the node running on `data_dir`, with its current token."""
        endpoint = read_node_file(data_dir)
        return cls(endpoint.url, endpoint.token, **kwargs)

    @property
    def url(self) -> str:
        return self._session.url

    def _run(self, machine: Machine[T]) -> Any:
        raise NotImplementedError

    def _drive(self, steps: Steps[Effect | Emit[E], Any]) -> Any:
        raise NotImplementedError

    def _method(self, op: Callable[Concatenate[Session, P], Machine[T]]) -> Callable[P, Any]:
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self._run(op(self._session, *args, **kwargs))

        return _described(method, op, self._RESULT)

    def _stream(self, op: Callable[Concatenate[Session, P], Stream[E]]) -> Callable[P, Any]:
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self._drive(Steps(op(self._session, *args, **kwargs)))

        return _described(method, op, self._STREAM_RESULT)

    call = Operation(ops.call)
    node_info = Operation(ops.node_info)
    node_peers = Operation(ops.node_peers)
    rpc_discover = Operation(ops.rpc_discover)
    storage_add = Operation(ops.storage_add)
    storage_get = Operation(ops.storage_get)
    storage_tree = Operation(ops.storage_tree)
    storage_fetch = Operation(ops.storage_fetch)
    storage_providers = Operation(ops.storage_providers)
    storage_export_car = Operation(ops.storage_export_car)
    storage_import_car = Operation(ops.storage_import_car)
    storage_pin = Operation(ops.storage_pin)
    storage_unpin = Operation(ops.storage_unpin)
    storage_pins = Operation(ops.storage_pins)
    storage_gc = Operation(ops.storage_gc)
    storage_publish = Operation(ops.storage_publish)
    storage_status = Operation(ops.storage_status)
    submit_job = Operation(ops.submit_job)
    get_job = Operation(ops.get_job)
    get_jobs = Operation(ops.get_jobs)
    wait_for_job = Operation(ops.wait_for_job)
    list_jobs = Operation(ops.list_jobs)
    job_events = Operation(ops.job_events)
    job_bids = Operation(ops.job_bids)
    cancel_job = Operation(ops.cancel_job)
    job_results = Operation(ops.job_results)
    export_jobs = Operation(ops.export_jobs)
    job_stats = Operation(ops.job_stats)
    node_earnings = Operation(ops.node_earnings)
    earnings_export = Operation(ops.earnings_export)
    delete_job = Operation(ops.delete_job)
    add_model = Operation(ops.add_model)
    list_models = Operation(ops.list_models)
    share = Operation(ops.share)
    revoke_share = Operation(ops.revoke_share)
    login_link = Operation(ops.login_link)
    stream_status = StreamOperation(ops.stream_status)


# ---------------------------------------------------------------------------- clients


class Client(_Operations[httpx.BaseTransport]):
    """Blocking client, for scripts and the CLI.

    `Client(url, token, timeout=30, transport=None, retry=RetryPolicy())`.
    """

    _http: httpx.Client

    def _connect(self, timeout: float, transport: httpx.BaseTransport | None) -> None:
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, machine: Machine[T]) -> T:
        steps: Steps[Effect | Emit[Never], T] = Steps(machine)
        for _ in self._drive(steps):
            pass
        return steps.result

    def _drive(self, steps: Steps[Effect | Emit[E], Any]) -> Iterator[E]:
        with _BlockingIO(self._http) as io, closing(steps):
            for effect in steps:
                if isinstance(effect, Emit):
                    yield effect.item
                else:
                    steps.reply = io.perform(effect)


class AsyncClient(_Operations[httpx.AsyncBaseTransport]):
    """Async client; httpx runs on anyio, so it works under trio and asyncio alike.

    Same constructor as `Client`, with an httpx.AsyncBaseTransport.
    """

    _RESULT = "Awaitable[{}]"
    _STREAM_RESULT = "AsyncIterator[{}]"
    _http: httpx.AsyncClient

    def _connect(self, timeout: float, transport: httpx.AsyncBaseTransport | None) -> None:
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, machine: Machine[T]) -> T:
        steps: Steps[Effect | Emit[Never], T] = Steps(machine)
        async for _ in self._drive(steps):
            pass
        return steps.result

    async def _drive(self, steps: Steps[Effect | Emit[E], Any]) -> AsyncIterator[E]:
        async with _AsyncIO(self._http) as io:
            with closing(steps):
                for effect in steps:
                    if isinstance(effect, Emit):
                        yield effect.item
                    else:
                        steps.reply = await io.perform(effect)


__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Client", "Operation", "StreamOperation"]

"""The SDK's sans-io core: what a client says to a node and how it reads the answers.

Nothing here touches a socket or a clock's sleep. An operation of the SDK (a call
with its rate-limit retries, waiting for a job, following a job's status stream;
see node/sdk/ops.py) is a generator that yields *effects* and is sent back each
effect's outcome:

    Send(request)  -> HttpReply | TransportFailure
    Open(request)  -> HttpReply | TransportFailure   a 200 stays open for Read
    Read()         -> bytes | None | TransportFailure  None: the stream ended
    Sleep(seconds) -> None
    Emit(item)     -> None                          an item for the caller

`Client` carries effects out with httpx.Client and time.sleep, `AsyncClient` with
httpx.AsyncClient and anyio.sleep (node/sdk/clients.py); they hold no protocol
logic of their own, so both behave alike by construction. This module holds the
pieces those operations are made of: the request and reply values, `Session`
(request building, reply and error decoding), `RetryPolicy` (when to repeat
and how long to wait) and `SseParser` (server-sent events, incrementally).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar
from urllib.parse import quote, urlsplit

from node.sdk.errors import RpcError, timed_out, unreachable
from protocol.errors import ErrorCode

T = TypeVar("T")
E = TypeVar("E")
Y = TypeVar("Y")


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    json: Any = None
    timeout: float | None = None  # None: the client's own


@dataclass(frozen=True)
class HttpReply:
    status: int
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True)
class TransportFailure:
    """The request never got an HTTP answer: `timeout`, or `unreachable` (refused,
    reset, DNS, the connection dropped mid-stream)."""

    kind: Literal["timeout", "unreachable"]
    error_type: str
    message: str = ""

    def error(self, url: str, what: str) -> RpcError:
        if self.kind == "timeout":
            return timed_out(url, what, self.error_type)
        return unreachable(url, f"{self.error_type}: {self.message}")


# ---------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Send:
    request: HttpRequest


@dataclass(frozen=True)
class Open:
    request: HttpRequest


@dataclass(frozen=True)
class Read:
    pass


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit(Generic[E]):
    item: E


Effect: TypeAlias = Send | Open | Read | Sleep
# An operation that ends with a T, and one that hands the caller E's as it goes.
Machine: TypeAlias = Generator[Effect, Any, T]
Stream: TypeAlias = Generator[Effect | Emit[E], Any, None]
Outcome: TypeAlias = HttpReply | TransportFailure


class Steps(Generic[Y, T]):
    """An operation run one effect at a time, for a driver:

    steps = Steps(machine)
    for effect in steps:
        steps.reply = perform(effect)
    steps.result
    """

    def __init__(self, machine: Generator[Y, Any, T]) -> None:
        self._machine = machine
        self.reply: object = None
        self._result: tuple[T] | None = None

    def __iter__(self) -> Iterator[Y]:
        try:
            effect = next(self._machine)
            while True:
                yield effect
                reply, self.reply = self.reply, None
                effect = self._machine.send(reply)
        except StopIteration as done:
            self._result = (done.value,)

    @property
    def result(self) -> T:
        if self._result is None:
            raise RuntimeError("the operation has not finished")
        return self._result[0]

    def close(self) -> None:
        """Stop an operation the caller abandoned (a stream left early)."""
        self._machine.close()


def send(request: HttpRequest) -> Machine[Outcome]:
    outcome: Outcome = yield Send(request)
    return outcome


def open_stream(request: HttpRequest) -> Machine[Outcome]:
    outcome: Outcome = yield Open(request)
    return outcome


def read() -> Machine[bytes | TransportFailure | None]:
    chunk: bytes | TransportFailure | None = yield Read()
    return chunk


# ---------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """When the SDK repeats a request by itself, and how long it waits first.

    A few short waits ride out a rate-limit burst (a polling loop, a CLI uploading
    files) or a node whose upload memory is full for a moment (BUSY); a long one
    is the caller's to decide about. A status stream that drops is reopened
    (resuming by Last-Event-ID) a few times, with a short, growing pause; the
    count starts again whenever an event arrives.
    """

    rate_limit_retries: int = 3
    rate_limit_max_wait: float = 10.0
    stream_reconnects: int = 5
    reconnect_step: float = 0.2
    reconnect_cap: float = 2.0

    def rate_limit_pause(self, err: RpcError, attempt: int) -> float | None:
        """Seconds to wait before repeating a request refused with `err` for the
        `attempt`-th time (0-based), or None to give up and raise it."""
        busy = err.code in (ErrorCode.RATE_LIMITED, ErrorCode.BUSY)
        if not busy or attempt >= self.rate_limit_retries:
            return None
        seconds = 1.0 if err.retry_after is None else err.retry_after
        return seconds if 0 <= seconds <= self.rate_limit_max_wait else None

    def reconnect_pause(self, failures: int) -> float | None:
        """Seconds to wait before reopening a stream after `failures` drops in a
        row, or None to give up."""
        if failures > self.stream_reconnects:
            return None
        return min(self.reconnect_cap, self.reconnect_step * failures)


# ---------------------------------------------------------------------------- session


class Session:
    """One node's address and token: builds requests and decodes replies."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.headers = {"Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """The server root the REST and SSE routes hang off (the RPC URL minus /rpc)."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        path = path[: -len("/rpc")] if path.endswith("/rpc") else ""
        return f"{parts.scheme}://{parts.netloc}{path}"

    def rpc_request(
        self, method: str, params: Mapping[str, Any], timeout: float | None = None
    ) -> tuple[int, HttpRequest]:
        request_id = next(self._ids)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params)}
        return request_id, HttpRequest("POST", self.url, self.headers, body, timeout)

    def rpc_result(self, request_id: int, method: str, outcome: Outcome) -> Any:
        """The call's result, or the RpcError it amounts to."""
        if isinstance(outcome, TransportFailure):
            raise outcome.error(self.url, method)
        reply = outcome.json()
        if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"{self.url} answered HTTP {outcome.status} without a JSON-RPC reply"
                f"{_token_hint(outcome)}",
                {"http_status": outcome.status, "url": self.url},
            )
        if "error" in reply:
            raise RpcError.from_error_object(reply["error"], retry_after=_retry_after(outcome))
        if reply.get("id") != request_id:
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"reply id {reply.get('id')!r} does not match request id {request_id}",
            )
        return reply["result"]

    def stream_request(self, job_id: str, last_event_id: str) -> HttpRequest:
        """GET the job's SSE status stream, resuming after `last_event_id` if any."""
        url = f"{self.base_url}/v1/jobs/{quote(job_id, safe='')}/status/stream"
        headers = {**self.headers, "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return HttpRequest("GET", url, headers)

    @staticmethod
    def rest_error(reply: HttpReply) -> RpcError:
        """A REST error body ({error, message, details}) as an RpcError."""
        body = reply.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            try:
                code = ErrorCode(body["error"])
            except ValueError:
                code = ErrorCode.INTERNAL_ERROR
            details = body.get("details") if isinstance(body.get("details"), dict) else {}
            return RpcError(
                code, str(body.get("message", "")), details, retry_after=_retry_after(reply)
            )
        return RpcError(
            ErrorCode.INTERNAL_ERROR,
            f"{reply.url} answered HTTP {reply.status}{_token_hint(reply)}",
            {"http_status": reply.status},
        )


def _token_hint(reply: HttpReply) -> str:
    return " (check the token)" if reply.status in (401, 403) else ""


def _retry_after(reply: HttpReply) -> float | None:
    """Retry-After in seconds (the node sends seconds, never an HTTP date)."""
    try:
        return float(reply.headers.get("retry-after", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class SseMessage:
    data: str
    event: str = "message"
    id: str = ""  # the last event ID in force when it was dispatched


_LINE_END = re.compile(rb"[\r\n]")


class SseParser:
    """Server-sent events (the WHATWG parsing rules), fed bytes as they arrive.

    Chunks may split anything: a line, a CRLF pair, a UTF-8 character. Lines end
    with CRLF, LF or CR; a blank line dispatches the event; an event cut off by
    the end of the stream is dropped. `last_event_id` survives reconnects (it is
    what a client sends back as Last-Event-ID); `reconnect()` forgets only the
    half-read input of the connection that ended.
    """

    def __init__(self) -> None:
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self.reconnect()

    def reconnect(self) -> None:
        self._buffer = b""
        self._after_cr = False
        self._first_line = True
        self._data: list[str] = []
        self._event = ""
        self._id = self.last_event_id

    def feed(self, chunk: bytes) -> list[SseMessage]:
        """The messages `chunk` completes, in order."""
        if self._after_cr and chunk:
            self._after_cr = False
            chunk = chunk.removeprefix(b"\n")  # the LF of a CRLF split between chunks
        self._buffer += chunk
        messages: list[SseMessage] = []
        start = 0
        while (end := _LINE_END.search(self._buffer, start)) is not None:
            at = end.start()
            line = self._buffer[start:at]
            if self._buffer[at : at + 1] == b"\r":
                if at + 1 == len(self._buffer):
                    self._after_cr = True
                elif self._buffer[at + 1 : at + 2] == b"\n":
                    at += 1
            start = at + 1
            message = self._line(line.decode("utf-8", errors="replace"))
            if message is not None:
                messages.append(message)
        self._buffer = self._buffer[start:]
        return messages

    def _line(self, line: str) -> SseMessage | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseMessage | None:
        self.last_event_id = self._id
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SseMessage("\n".join(data), event or "message", self.last_event_id)


__all__ = [
    "Effect",
    "Emit",
    "HttpReply",
    "HttpRequest",
    "Machine",
    "Open",
    "Outcome",
    "Read",
    "RetryPolicy",
    "Send",
    "Session",
    "Sleep",
    "SseMessage",
    "SseParser",
    "Steps",
    "Stream",
    "TransportFailure",
    "open_stream",
    "read",
    "send",
]

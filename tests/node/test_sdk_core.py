"""The SDK's sans-io core without a network: the SSE parser, the retry decision,
reply decoding, the typed models' dict compatibility, and each operation driven
effect by effect with scripted outcomes (what a node and a network would answer).

The same operations run over real sockets in test_client.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.client import Event, Job, JobStatus, RetryPolicy, RpcError
from node.sdk import ops
from node.sdk.core import (
    Emit,
    HttpReply,
    HttpRequest,
    Open,
    Read,
    Send,
    Session,
    Sleep,
    SseMessage,
    SseParser,
    Steps,
    TransportFailure,
)
from protocol.errors import ErrorCode
from tests.test_layering import _imports

SDK = Path(__file__).resolve().parents[2] / "node" / "sdk"
URL = "http://127.0.0.1:7780/rpc"


# ---------------------------------------------------------------------------- SSE


def sse_text(messages: list[tuple[str | None, str, list[str]]], newline: str) -> str:
    """Frames for (event id, event type, data lines), with a comment between."""
    out = []
    for event_id, event, lines in messages:
        out.append(": keepalive" + newline)
        if event_id is not None:
            out.append(f"id: {event_id}{newline}")
        if event != "message":
            out.append(f"event:{event}{newline}")
        out.extend(f"data: {line}{newline}" for line in lines)
        out.append(newline)
    return "".join(out)


no_line_breaks = st.text(
    st.characters(exclude_characters="\r\n\0", exclude_categories=["Cs"]), max_size=12
)
sse_messages = st.lists(
    st.tuples(
        st.none() | st.text("0123456789", min_size=1, max_size=4),
        st.sampled_from(["message", "Snapshot", "progress"]),
        st.lists(no_line_breaks, min_size=1, max_size=3),
    ),
    max_size=6,
)


@given(
    messages=sse_messages,
    newline=st.sampled_from(["\n", "\r", "\r\n"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_sse_parser_is_indifferent_to_chunk_boundaries(
    messages: list[tuple[str | None, str, list[str]]], newline: str, bom: bool, cuts: list[int]
) -> None:
    """Chunks split anywhere (inside a CRLF, inside a UTF-8 character) parse as the whole."""
    raw = ("\ufeff" if bom else "").encode() + sse_text(messages, newline).encode()
    points = sorted({min(cut, len(raw)) for cut in cuts} | {0, len(raw)})
    parser = SseParser()
    parsed: list[SseMessage] = []
    for start, end in itertools.pairwise(points):
        parsed += parser.feed(raw[start:end])
    expected, last_id = [], ""
    for event_id, event, lines in messages:
        last_id = last_id if event_id is None else event_id
        expected.append(SseMessage("\n".join(lines), event, last_id))
    assert parsed == expected
    assert parser.last_event_id == last_id


def test_sse_parser_rules() -> None:
    parser = SseParser()
    assert parser.feed(b"retry: 2000\n\n") == []
    assert parser.retry_ms == 2000
    assert parser.feed(b'data: {"a": 1}\r') == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert parser.feed(b"\r\n") == [SseMessage('{"a": 1}')]
    assert parser.feed(b"id: 7\ndata\n\nid: bad\0id\ndata:x\n\n") == [
        SseMessage("", id="7"),
        SseMessage("x", id="7"),  # an id with NUL is ignored
    ]
    parser.feed(b"id: 8\ndata: cut off")  # the connection drops mid-event
    parser.reconnect()
    assert parser.feed(b"\n\n") == []  # ...and the half event is gone
    assert parser.last_event_id == "7"
    assert parser.feed("data: é".encode()[:-1]) == []
    assert parser.feed("é\n\n".encode()[1:]) == [SseMessage("é", id="7")]


# ---------------------------------------------------------------------------- retry


def limited(retry_after: object = None) -> RpcError:
    details = {} if retry_after is None else {"retry_after": retry_after}
    return RpcError(ErrorCode.RATE_LIMITED, "slow down", details)


def test_retry_decision() -> None:
    policy = RetryPolicy()
    assert policy.rate_limit_pause(limited(2), 0) == 2.0
    assert policy.rate_limit_pause(limited(), 0) == 1.0  # no advice: a second
    assert policy.rate_limit_pause(limited(1), 2) == 1.0
    assert policy.rate_limit_pause(limited(1), 3) is None  # three tries are enough
    assert policy.rate_limit_pause(limited(60), 0) is None  # a long wait is the caller's call
    assert policy.rate_limit_pause(RpcError(ErrorCode.JOB_NOT_FOUND, "x"), 0) is None
    assert RetryPolicy(rate_limit_retries=0).rate_limit_pause(limited(1), 0) is None
    assert [policy.reconnect_pause(n) for n in (1, 5, 6)] == [0.2, 1.0, None]
    assert RetryPolicy(reconnect_cap=0.5).reconnect_pause(5) == 0.5


def test_retry_after_header_is_the_fallback() -> None:
    session = Session(URL, None)
    request_id, _ = session.rpc_request("node.info", {})
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32020, "message": "slow"}}
    reply = HttpReply(429, URL, {"retry-after": "3"}, json.dumps(body).encode())
    with pytest.raises(RpcError) as caught:
        session.rpc_result(request_id, "node.info", reply)
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after == 3.0
    assert session.retry.rate_limit_pause(caught.value, 0) == 3.0


# ---------------------------------------------------------------------------- decoding


def test_reply_decoding() -> None:
    session = Session(URL, "tok")
    request_id, request = session.rpc_request("job.get", {"job_id": "j"}, timeout=5)
    assert request == HttpRequest(
        "POST",
        URL,
        {"Accept": "application/json", "Authorization": "Bearer tok"},
        {"jsonrpc": "2.0", "id": request_id, "method": "job.get", "params": {"job_id": "j"}},
        5,
    )
    with pytest.raises(RpcError) as html:
        session.rpc_result(request_id, "job.get", HttpReply(401, URL, body=b"<html>"))
    assert html.value.code is ErrorCode.INTERNAL_ERROR
    assert html.value.details["http_status"] == 401 and "check the token" in html.value.message
    other_id = json.dumps({"jsonrpc": "2.0", "id": 99, "result": 1}).encode()
    with pytest.raises(RpcError, match="does not match"):
        session.rpc_result(request_id, "job.get", HttpReply(200, URL, body=other_id))
    with pytest.raises(RpcError) as down:
        session.rpc_result(
            request_id, "job.get", TransportFailure("unreachable", "ConnectError", "refused")
        )
    assert down.value.code is ErrorCode.NODE_UNREACHABLE and URL in down.value.message
    rest = HttpReply(404, URL, body=b'{"error": "JOB_NOT_FOUND", "message": "no", "details": {}}')
    assert Session.rest_error(rest).code is ErrorCode.JOB_NOT_FOUND


def test_error_code_falls_back_to_the_number() -> None:
    err = RpcError.from_error_object({"code": -32005, "message": "gone"})
    assert (err.code, err.message, err.details) == (ErrorCode.CID_NOT_FOUND, "gone", {})
    odd = RpcError.from_error_object({"code": -31999, "message": "?", "data": {"code": "NEW"}})
    assert odd.code is ErrorCode.INTERNAL_ERROR
    assert odd.rpc_code == -31999
    assert RpcError.from_error_object("nonsense").code is ErrorCode.INTERNAL_ERROR


def test_models_read_like_the_dicts_they_replace() -> None:
    wire = {
        "job_id": "j1",
        "status": "failed",
        "progress": 40,
        "error": {"code": "EXECUTION_FAILED", "message": "boom", "details": {}},
        "receipt": None,
        "shiny_new_field": {"from": "a newer node"},
    }
    job = Job.model_validate(wire)
    assert job.status is JobStatus.FAILED and job.terminal
    assert job.error is not None and job.error.code == "EXECUTION_FAILED"
    assert job["status"] == "failed" and type(job["status"]) is str  # the wire value
    assert job["error"] == wire["error"] and job["receipt"] is None
    assert job["shiny_new_field"] == {"from": "a newer node"}
    assert job.get("executor") is None and "executor" not in job  # not sent: absent
    with pytest.raises(KeyError):
        job["executor"]
    assert job.executor is None  # ...while the attribute has its default
    assert dict(job) == {**job} == job.to_dict() == {**wire, "progress": 40.0}
    assert json.loads(json.dumps(job.to_dict())) == job.to_dict()
    assert set(job.keys()) == set(wire)  # in field order, not necessarily the wire's
    submitted = Job.model_validate({**wire, "estimated_cost": None})
    assert submitted["estimated_cost"] is None and "estimated_cost" not in job
    event = Event.model_validate({"seq": 3, "type": "Progress", "status": "running"})
    assert event.status == "running" and not event.terminal


# ---------------------------------------------------------------------------- operations


def rpc_reply(
    result: Any = None, error: dict[str, Any] | None = None
) -> Callable[[Send], HttpReply]:
    """An answer to a Send: the JSON-RPC reply to whatever id the request had."""

    def answer(effect: Send) -> HttpReply:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": effect.request.json["id"]}
        body.update({"error": error} if error is not None else {"result": result})
        status = 429 if error and error["code"] == -32020 else 200
        return HttpReply(status, effect.request.url, {}, json.dumps(body).encode())

    return answer


def run(machine: Generator[Any, Any, Any], script: list[Any]) -> tuple[list[Any], list[Any], Any]:
    """Drive an operation: each I/O effect gets the script's next outcome (a value,
    or a function of the effect); Sleep and Emit are answered by the driver itself.
    Returns the effects seen, the items emitted and the result."""
    steps = Steps(machine)
    seen: list[Any] = []
    emitted: list[Any] = []
    answers = iter(script)
    for effect in steps:
        seen.append(effect)
        if isinstance(effect, Emit):
            emitted.append(effect.item)
        elif not isinstance(effect, Sleep):
            answer = next(answers)
            steps.reply = answer(effect) if callable(answer) else answer
    assert next(answers, None) is None, "the operation stopped before the script did"
    return seen, emitted, steps.result


def test_a_rate_limited_call_waits_and_repeats() -> None:
    session = Session(URL, None)
    refusal = {"code": -32020, "message": "slow", "data": {"details": {"retry_after": 2}}}
    info = {"peer_id": "12D3KooWx", "mode": "requester"}
    seen, _, result = run(
        ops.node_info(session),
        [rpc_reply(error=refusal), rpc_reply(error=refusal), rpc_reply(info)],
    )
    assert [type(e) for e in seen] == [Send, Sleep, Send, Sleep, Send]
    assert [e.seconds for e in seen if isinstance(e, Sleep)] == [2.0, 2.0]
    assert result.peer_id == "12D3KooWx" and result["mode"] == "requester"

    with pytest.raises(RpcError) as caught:
        run(ops.node_info(session), [rpc_reply(error=refusal)] * 4)
    assert caught.value.code is ErrorCode.RATE_LIMITED


def test_a_result_of_the_wrong_shape_is_malformed() -> None:
    with pytest.raises(RpcError) as caught:
        run(ops.get_job(Session(URL, None), "j"), [rpc_reply({"job_id": "j", "status": "??"})])
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_wait_for_job_polls_job_get_on_a_node_without_job_wait() -> None:
    clock = FakeClock()
    session = Session(URL, None, clock=clock)
    missing = {"code": -32601, "message": "no such method: job.wait"}

    def job(status: str) -> Callable[[Send], HttpReply]:
        def answer(effect: Send) -> HttpReply:
            clock.now += 0.1
            return rpc_reply({"job_id": "j", "status": status})(effect)

        return answer

    seen, _, done = run(
        ops.wait_for_job(session, "j", timeout=10, poll_interval=1.0),
        [rpc_reply(error=missing), job("running"), job("running"), job("completed")],
    )
    methods = [e.request.json["method"] for e in seen if isinstance(e, Send)]
    assert methods == ["job.wait", "job.get", "job.get", "job.get"]
    assert [round(e.seconds, 3) for e in seen if isinstance(e, Sleep)] == [0.9, 0.9]
    assert done.status is JobStatus.COMPLETED


def test_wait_for_job_gives_up_at_its_deadline() -> None:
    clock = FakeClock()

    def slow_running(effect: Send) -> HttpReply:
        assert effect.request.json["params"]["timeout"] == pytest.approx(5 - clock.now)
        assert effect.request.timeout == pytest.approx(
            effect.request.json["params"]["timeout"] + 10
        )
        clock.now += 2.5
        return rpc_reply({"job_id": "j", "status": "running"})(effect)

    with pytest.raises(RpcError) as caught:
        run(ops.wait_for_job(Session(URL, None, clock=clock), "j", timeout=5), [slow_running] * 2)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert caught.value.details == {"job_id": "j", "status": "running"}


def frame(event: dict[str, Any], with_id: bool = True) -> bytes:
    head = f"id: {event['seq']}\n" if with_id else ""
    return (head + f"data: {json.dumps(event)}\n\n").encode()


def test_stream_resumes_after_a_drop_with_last_event_id() -> None:
    session = Session(URL, "tok")
    snapshot = {"seq": 2, "type": "Snapshot", "status": "bidding", "data": {"job": {}}}
    bid = {"seq": 3, "type": "BidAccepted", "status": "assigned"}
    started = {"seq": 4, "type": "Started", "status": "running"}
    done = {"seq": 5, "type": "ReceiptVerified", "status": "completed"}
    ok = HttpReply(200, URL)
    half = frame(started)[:10]
    seen, events, _ = run(
        ops.stream_status(session, "job/1"),
        [
            ok,
            b"retry: 2000\n\n" + frame(snapshot, with_id=False) + frame(bid)[:7],
            frame(bid)[7:] + half,
            TransportFailure("unreachable", "RemoteProtocolError", "peer closed"),
            ok,
            frame(started) + frame(done),
        ],
    )
    assert [e.type for e in events] == ["Snapshot", "BidAccepted", "Started", "ReceiptVerified"]
    assert all(isinstance(e, Event) for e in events) and events[-1].status is JobStatus.COMPLETED
    opens = [e.request for e in seen if isinstance(e, Open)]
    assert [r.url for r in opens] == ["http://127.0.0.1:7780/v1/jobs/job%2F1/status/stream"] * 2
    assert "Last-Event-ID" not in opens[0].headers
    assert opens[1].headers["Last-Event-ID"] == "3"
    assert opens[1].headers["Authorization"] == "Bearer tok"
    assert [e.seconds for e in seen if isinstance(e, Sleep)] == [0.2]


def test_stream_waits_out_a_rate_limited_open_and_reports_errors() -> None:
    session = Session(URL, None)
    refused = HttpReply(
        429,
        URL,
        {"retry-after": "1"},
        b'{"error": "RATE_LIMITED", "message": "slow", "details": {}}',
    )
    missing = HttpReply(404, URL, {}, b'{"error": "JOB_NOT_FOUND", "message": "no job"}')
    with pytest.raises(RpcError) as caught:
        run(ops.stream_status(session, "j"), [refused, missing])
    assert caught.value.code is ErrorCode.JOB_NOT_FOUND

    endless = [HttpReply(200, URL), None] * 6  # opens, then ends at once, six times
    with pytest.raises(RpcError, match="keeps ending") as ended:
        run(ops.stream_status(session, "j"), endless)
    assert ended.value.code is ErrorCode.NODE_UNREACHABLE

    with pytest.raises(RpcError) as garbled:
        run(ops.stream_status(session, "j"), [HttpReply(200, URL), b"data: {nope\n\n"])
    assert garbled.value.code is ErrorCode.MALFORMED_MESSAGE


def test_stream_timeout_bounds_the_whole_wait() -> None:
    clock = FakeClock()

    def keepalive(effect: Read) -> bytes:
        clock.now += 4
        return b": keepalive\n\n"

    with pytest.raises(RpcError) as caught:
        run(
            ops.stream_status(Session(URL, None, clock=clock), "j", timeout=10),
            [HttpReply(200, URL), keepalive, keepalive, keepalive],
        )
    assert caught.value.code is ErrorCode.TIMEOUT


# ---------------------------------------------------------------------------- layering


def test_the_core_is_sans_io_and_the_sdk_server_free() -> None:
    io = {"httpx", "anyio", "trio", "socket", "asyncio", "ssl"}
    for name in ("core.py", "ops.py", "models.py", "errors.py"):
        used = {m.split(".")[0] for m in _imports(SDK / name)}
        assert not used & io, f"{name} does I/O: {used & io}"
    for path in [*SDK.glob("*.py"), SDK.parent / "client.py"]:
        for module in _imports(path):
            top = module.split(".")[0]
            assert top != "node" or module.startswith("node.sdk"), f"{path.name}: {module}"
            assert top not in {"libp2p", "starlette", "storage"}, f"{path.name}: {module}"

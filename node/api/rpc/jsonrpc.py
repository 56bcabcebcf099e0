"""JSON-RPC 2.0 envelopes, independent of the transport carrying them.

Responses are built as JSON text per call, not as one big object, so a large
result (a base64 blob from `storage.get`) is serialized once, and a result that
cannot be serialized turns into an error for that call alone.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import trio
from pydantic_core import PydanticSerializationError, to_json

from protocol.errors import ErrorCode, MeshrunError

from .registry import Registry

log = logging.getLogger("meshrun.rpc")

_MISSING = object()

MAX_BATCH_CALLS = 100
"""The most calls one batch may hold; a longer batch is refused whole (INVALID_REQUEST)."""

CHARGE_KEY = "meshrun.charge"
"""ASGI scope key where the auth middleware leaves a `Charge` for the caller's
rate-limit bucket, so POST /rpc can count every call of a batch, not one per request."""

Charge = Callable[[int], None]
"""Counts `n` calls against the caller's rate limit; raises RATE_LIMITED (all or nothing)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse(body: bytes | str) -> Any:
    """Parse a request body, raising MeshrunError(PARSE_ERROR) on anything that is not JSON."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MeshrunError(ErrorCode.PARSE_ERROR, f"request is not valid JSON: {exc}") from None


def _dump(value: Any) -> str:
    return to_json(value, inf_nan_mode="null").decode()


def error_response(request_id: Any, err: MeshrunError) -> str:
    data = {"code": err.code.value, "details": err.details}
    try:
        data_json = _dump(data)
    except PydanticSerializationError:
        log.warning("details of %s are not JSON-able; dropping them", err.code.value)
        data_json = _dump({"code": err.code.value, "details": {}})
    return (
        f'{{"jsonrpc":"2.0","id":{_dump(request_id)},"error":'
        f'{{"code":{err.code.rpc_code},"message":{_dump(err.message)},"data":{data_json}}}}}'
    )


def _result_response(request_id: Any, result_json: str) -> str:
    return f'{{"jsonrpc":"2.0","id":{_dump(request_id)},"result":{result_json}}}'


def _valid_id(value: object) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, int | float) and not isinstance(value, bool))
    )


def _meshrun_error_in(exc: BaseException) -> MeshrunError | None:
    """A MeshrunError, or a group made only of them (a handler's nursery wraps its errors)."""
    if isinstance(exc, MeshrunError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(MeshrunError)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, MeshrunError) else None
    return None


def _internal_error(method: str, exc: BaseException) -> MeshrunError:
    ref = uuid.uuid4().hex[:12]
    log.error("RPC method %s failed (ref %s)", method, ref, exc_info=exc)
    return MeshrunError(
        ErrorCode.INTERNAL_ERROR,
        f"internal error in {method} (ref {ref}); the node's log has the details",
        {"ref": ref},
    )


async def handle_call(registry: Registry, call: object) -> str | None:
    """One request object in, its response text out (None for a notification)."""
    if not isinstance(call, dict):
        return error_response(
            None, MeshrunError(ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
        )
    request_id = call.get("id", _MISSING)
    problem = None
    if call.get("jsonrpc") != "2.0":
        problem = 'the "jsonrpc" member must be exactly "2.0"'
    elif not isinstance(call.get("method"), str):
        problem = 'the "method" member must be a string'
    elif "params" in call and not isinstance(call["params"], dict | list):
        problem = 'the "params" member must be an object or an array'
    elif request_id is not _MISSING and not _valid_id(request_id):
        problem = 'the "id" member must be a string, a number or null'
    elif extra := sorted(set(call) - {"jsonrpc", "method", "params", "id"}):
        problem = f"unknown request members: {', '.join(extra)}"
    if problem is not None:
        reply_id = request_id if request_id is not _MISSING and _valid_id(request_id) else None
        return error_response(reply_id, MeshrunError(ErrorCode.INVALID_REQUEST, problem))

    method: str = call["method"]
    try:
        result = await registry.invoke(method, call.get("params"))
        result_json = _dump(result)
    except Exception as exc:
        err = _meshrun_error_in(exc) or _internal_error(method, exc)
        if request_id is _MISSING:
            if err.code is not ErrorCode.INTERNAL_ERROR:
                log.info("notification %s failed: %s", method, err)
            return None
        return error_response(request_id, err)
    if request_id is _MISSING:
        return None
    return _result_response(request_id, result_json)


async def handle_payload(registry: Registry, payload: object) -> str | None:
    """A parsed single or batch request in, the response text out (None: nothing to send)."""
    if not isinstance(payload, list):
        return await handle_call(registry, payload)
    if not payload:
        return error_response(
            None, MeshrunError(ErrorCode.INVALID_REQUEST, "a batch must not be empty")
        )
    replies: list[str | None] = [None] * len(payload)

    async def run(index: int, call: object) -> None:
        replies[index] = await handle_call(registry, call)

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(payload):
            nursery.start_soon(run, index, call)
    sent = [reply for reply in replies if reply is not None]
    return f"[{','.join(sent)}]" if sent else None


def admit(payload: object, charge: Charge | None) -> None:
    """Check a parsed payload before any of its calls runs: a batch is at most
    MAX_BATCH_CALLS long, and every call in it is charged to the rate limit at
    once, so a batch over the caller's remaining budget is refused as a whole."""
    calls = len(payload) if isinstance(payload, list) else 1
    if calls > MAX_BATCH_CALLS:
        raise MeshrunError(
            ErrorCode.INVALID_REQUEST,
            f"a batch may hold at most {MAX_BATCH_CALLS} calls, not {calls}; split it",
            {"max_batch_calls": MAX_BATCH_CALLS, "calls": calls},
        )
    if charge is not None:
        charge(calls)


def refusal(payload: object, err: MeshrunError) -> str | None:
    """The reply to a payload `admit` refused. A malformed batch gets one error (id
    null); a rate-limited one gets the error once per call, under each call's id, so
    a client that pipelines calls (WebSocket) can tell which were refused. Nothing,
    like any reply, for notifications."""
    if err.code is ErrorCode.INVALID_REQUEST:
        return error_response(None, err)
    calls = payload if isinstance(payload, list) else [payload]
    replies = [
        error_response(call["id"], err)
        for call in calls
        if isinstance(call, dict) and "id" in call and _valid_id(call["id"])
    ]
    if not isinstance(payload, list):
        return replies[0] if replies else None
    return f"[{','.join(replies)}]" if replies else None


async def handle_body(
    registry: Registry, body: bytes | str, charge: Charge | None = None
) -> str | None:
    try:
        payload = parse(body)
    except MeshrunError as err:
        return error_response(None, err)
    try:
        admit(payload, charge)
    except MeshrunError as err:
        return refusal(payload, err)
    return await handle_payload(registry, payload)

"""The seeds' REST shapes (`/v1/jobs…`) as a thin adapter over the JSON-RPC registry.

Every route turns its path, query and body into the params of one RPC method and
calls `registry.invoke`, so REST gets exactly the RPC's validation, error codes
and behaviour, and a method the lead adds or changes shows up here without a
second implementation to keep in step. Errors use one body everywhere,
`{error: CODE, message, details}`, with the HTTP status from one table.

A route whose RPC method this node does not have answers 501 and is left out of
the OpenAPI document, so clients and the schemathesis run only see what works.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import logging
import math
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from node.api.rpc.budget import BodyBudget, Hold
from node.api.rpc.jsonrpc import _internal_error, _meshrun_error_in, parse
from node.api.rpc.registry import Method, Registry
from node.api.seedshapes import aitbc_result, aitbc_submit_params, is_aitbc_submit
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import TERMINAL, JobStatus
from protocol.package import PackageError, is_meta, package_extras
from storage.digest import digest_tree

log = logging.getLogger("meshrun.rest")

TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)
JOB_STATUSES = tuple(status.value for status in JobStatus)
MAX_REST_BODY_BYTES = 1024 * 1024
SSE_KEEPALIVE_SECONDS = 10.0
CHECKSUM_FILE = "output.sha256"

# The one map from error code to HTTP status. Client mistakes are 4xx (422 when
# the request parsed but its values are wrong), node-side failures 5xx.
HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.PARSE_ERROR: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.MALFORMED_MESSAGE: 400,
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.CID_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.WRONG_MODE: 409,
    ErrorCode.ILLEGAL_TRANSITION: 409,
    ErrorCode.JOB_NOT_FINISHED: 409,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.INVALID_PARAMS: 422,
    ErrorCode.INVALID_SPEC: 422,
    ErrorCode.INVALID_CID: 422,
    ErrorCode.SIGNATURE_INVALID: 422,
    ErrorCode.EXPIRED: 422,
    ErrorCode.UNSUPPORTED: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.NODE_UNREACHABLE: 502,
    ErrorCode.FETCH_FAILED: 502,
    ErrorCode.BUSY: 503,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 500)


def dump(value: Any) -> bytes:
    return to_json(value, inf_nan_mode="null")


def error_body(err: MeshrunError) -> dict[str, Any]:
    return {"error": err.code.value, "message": err.message, "details": err.details}


def error_response(
    err: MeshrunError, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    status = status or http_status(err.code)
    extra = dict(headers or {})
    if err.code in (ErrorCode.RATE_LIMITED, ErrorCode.BUSY) and "retry-after" not in extra:
        extra["retry-after"] = str(err.details.get("retry_after", 1))
    try:
        body = dump(error_body(err))
    except Exception:
        body = dump({"error": err.code.value, "message": err.message, "details": {}})
    return Response(body, status_code=status, media_type="application/json", headers=extra)


def json_response(
    value: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(dump(value), status_code=status, media_type="application/json", headers=headers)


# --------------------------------------------------------------------------- models
# Response shapes for the OpenAPI document. Lenient on purpose (extra fields
# allowed): the job record grows as the lifecycle work lands, and a client must
# not break when it does.


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code, e.g. JOB_NOT_FOUND (protocol/errors.py)")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class JobRecord(BaseModel):
    """job.get's record, plus the AITBC seed's names: `miner_id` (= executor),
    `result` (= result_cid), `model`, and times in ISO-8601 (unix seconds stay
    under `<field>_unix`)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str = Field(json_schema_extra={"enum": list(JOB_STATUSES)})
    substate: str | None = None
    progress: float | None = None
    executor: str | None = None
    miner_id: str | None = None
    result_cid: str | None = None
    result: str | None = None
    model: str | None = None
    error: dict[str, Any] | None = None
    created_at: str | None = Field(default=None, description="ISO-8601, UTC")
    started_at: str | None = Field(default=None, description="ISO-8601, UTC")
    completed_at: str | None = Field(default=None, description="ISO-8601, UTC")
    created_at_unix: float | None = None
    started_at_unix: float | None = None
    completed_at_unix: float | None = None


class JobList(BaseModel):
    model_config = ConfigDict(extra="allow")

    jobs: list[JobRecord]
    total: int | None = None
    has_more: bool | None = None
    next_cursor: str | None = None


class JobBatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    jobs: list[JobRecord]
    missing: list[str]


class BatchParams(BaseModel):
    """Params of `job.get_batch`, used when the node lacks that method."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[str] = Field(min_length=1, max_length=1000)


class JobIdOnly(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=128)


# ----------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    """One REST route and everything the OpenAPI document says about it."""

    operation_id: str
    http_method: str
    path: str
    summary: str
    rpc: str
    fallback: str | None = None
    fallback_model: type[BaseModel] | None = None
    body: bool = False
    path_params: tuple[str, ...] = ()
    renames: Mapping[str, str] = field(default_factory=dict)
    hidden_query: frozenset[str] = frozenset()
    success_status: int = 200
    media_type: str = "application/json"
    response_model: type[BaseModel] | None = None
    description: str = ""


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "submitJob",
        "POST",
        "/v1/jobs",
        "Submit a job (the body is job.submit's params)",
        "job.submit",
        body=True,
        success_status=201,
        response_model=JobRecord,
    ),
    Operation(
        "listJobs",
        "GET",
        "/v1/jobs",
        "Jobs on this node, newest first (job.list)",
        "job.list",
        response_model=JobList,
    ),
    Operation(
        "jobHistory",
        "GET",
        "/v1/jobs/history",
        "Jobs created between `from` and `to` (ISO-8601 or unix seconds)",
        "job.list",
        renames={"from": "from_time", "to": "to_time"},
        response_model=JobList,
    ),
    Operation(
        "batchStatus",
        "POST",
        "/v1/jobs/status/batch",
        "Several jobs' records at once (job.get_batch)",
        "job.get_batch",
        fallback="job.get",
        fallback_model=BatchParams,
        body=True,
        response_model=JobBatch,
    ),
    Operation(
        "getJob",
        "GET",
        "/v1/jobs/{job_id}",
        "A job's record (job.get)",
        "job.get",
        path_params=("job_id",),
        response_model=JobRecord,
    ),
    Operation(
        "cancelJob",
        "DELETE",
        "/v1/jobs/{job_id}",
        "Cancel a job (job.cancel)",
        "job.cancel",
        path_params=("job_id",),
        response_model=JobRecord,
    ),
    Operation(
        "downloadJob",
        "GET",
        "/v1/jobs/{job_id}/download",
        "The result package as a zip, with output.sha256 for `sha256sum -c`",
        "job.results",
        fallback="job.get",
        fallback_model=JobIdOnly,
        path_params=("job_id",),
        media_type="application/zip",
    ),
    Operation(
        "streamJobStatus",
        "GET",
        "/v1/jobs/{job_id}/status/stream",
        "Server-sent events of a job until it is terminal",
        "job.get",
        path_params=("job_id",),
        hidden_query=frozenset({"include"}),
        media_type="text/event-stream",
        description=(
            "First a `Snapshot` event with the current record in `data.job`, then every "
            "job event as it happens; the stream ends after the first event whose status "
            "is terminal. Each event's `id` is its sequence number: reconnect with "
            "`Last-Event-ID` to replay what was missed. `access_token` may be given as a "
            "query parameter for browsers' EventSource."
        ),
    ),
)


class RestApi:
    """The `/v1` routes, bound to one registry and event bus."""

    def __init__(
        self, registry: Registry, bus: EventBus | None, budget: BodyBudget | None = None
    ) -> None:
        self.registry = registry
        self.bus = bus
        self.budget = budget or BodyBudget()
        self._handlers: dict[str, Callable[[Request, Operation], Awaitable[Response]]] = {
            "submitJob": self._submit,
            "listJobs": self._query_call,
            "jobHistory": self._query_call,
            "batchStatus": self._batch,
            "getJob": self._query_call,
            "cancelJob": self._query_call,
            "downloadJob": self._download,
            "streamJobStatus": self._stream,
        }

    # ---------------------------------------------------------------- plumbing

    def available(self, op: Operation) -> bool:
        return op.rpc in self.registry or (op.fallback is not None and op.fallback in self.registry)

    def params_model(self, op: Operation) -> type[BaseModel] | None:
        """The model whose fields are this route's params: the RPC's own, or the fallback's."""
        if op.rpc in self.registry:
            return self.registry.get(op.rpc).params_model
        return op.fallback_model

    def routes(self) -> list[BaseRoute]:
        return [
            Route(
                op.path,
                self._endpoint(op),
                methods=[op.http_method],
                name=op.operation_id,
            )
            for op in OPERATIONS
        ]

    def app(self, extra_routes: list[BaseRoute] | None = None) -> Starlette:
        """The /v1 application (routes carry their full paths): JSON errors even for
        unknown paths and methods, so every answer under /v1 has the documented shape."""

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if exc.status_code == 404:
                err = MeshrunError(ErrorCode.METHOD_NOT_FOUND, f"no REST route {request.url.path}")
            else:
                err = MeshrunError(
                    ErrorCode.INVALID_REQUEST, f"{request.method} {request.url.path}: {exc.detail}"
                )
            return error_response(err, status=exc.status_code)

        app = Starlette(
            routes=[*self.routes(), *(extra_routes or [])],
            exception_handlers={HTTPException: http_error},
        )
        # A trailing-slash redirect would be an undocumented 307; answer 404 instead.
        app.router.redirect_slashes = False
        return app

    def _endpoint(self, op: Operation) -> Callable[[Request], Awaitable[Response]]:
        handler = self._handlers[op.operation_id]

        async def endpoint(request: Request) -> Response:
            if not self.available(op):
                return error_response(
                    MeshrunError(
                        ErrorCode.METHOD_NOT_FOUND,
                        f"this node does not implement {op.rpc} yet, which "
                        f"{op.http_method} {op.path} needs",
                        {"method": op.rpc},
                    ),
                    status=501,
                )
            try:
                # A body read by the handler stays charged to the node's budget until
                # the handler is done with it.
                with self.budget.hold() as held:
                    request.state.body_hold = held
                    return await handler(request, op)
            except Exception as exc:
                err = _meshrun_error_in(exc) or _internal_error(f"{op.http_method} {op.path}", exc)
                return error_response(err)

        return endpoint

    async def invoke(self, name: str, params: dict[str, Any]) -> Any:
        return await self.registry.invoke(name, params)

    async def seed_view(self, value: Any) -> Any:
        """Job records in a REST answer with the AITBC seed's names added."""
        names: dict[str, str] = {}
        if "model.list" in self.registry:
            try:
                listed = await self.invoke("model.list", {})
                names = {str(m["cid"]): str(m["name"]) for m in listed.get("models", [])}
            except MeshrunError:
                names = {}
        return aitbc_result(value, names)

    def query_params(self, request: Request, op: Operation) -> dict[str, Any]:
        """Query string to params: names as the RPC has them, lists split on commas,
        times in ISO-8601 turned into unix seconds; the RPC model still validates."""
        model = self.params_model(op)
        arrays = _array_fields(model) if model is not None else frozenset()
        params: dict[str, Any] = {}
        query = request.query_params
        for key in dict.fromkeys(query.keys()):
            if key == "access_token":
                continue
            target = op.renames.get(key, key)
            values = query.getlist(key)
            if target in arrays:
                params[target] = [part for value in values for part in value.split(",") if part]
            elif len(values) > 1:
                raise MeshrunError(
                    ErrorCode.INVALID_PARAMS,
                    f"query parameter {key!r} was given {len(values)} times; give it once",
                    {"param": key},
                )
            elif key in op.renames:
                params[target] = parse_time(key, values[0])
            else:
                params[target] = values[0]
        for name in op.path_params:
            params[name] = request.path_params[name]
        return params

    async def read_body(self, request: Request) -> dict[str, Any]:
        held: Hold | None = getattr(request.state, "body_hold", None)
        if held is None:  # outside an endpoint: charge the budget while reading only
            with self.budget.hold() as own:
                return await self._read_json(request, own)
        return await self._read_json(request, held)

    async def _read_json(self, request: Request, held: Hold) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > MAX_REST_BODY_BYTES:
                raise _too_large()
            await held.reserve_to(int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_REST_BODY_BYTES:
                raise _too_large()
            await held.reserve_to(size)
            chunks.append(chunk)
        payload = parse(b"".join(chunks) or b"{}")
        if not isinstance(payload, dict):
            raise MeshrunError(
                ErrorCode.INVALID_REQUEST,
                f"the request body must be a JSON object, not {type(payload).__name__}",
            )
        return payload

    # ---------------------------------------------------------------- handlers

    async def _submit(self, request: Request, op: Operation) -> Response:
        body = await self.read_body(request)
        if is_aitbc_submit(body):  # the AITBC seed's body: model by name, input, output_config
            body = aitbc_submit_params(body)
        job = await self.invoke(op.rpc, body)
        headers = {}
        if isinstance(job, dict) and isinstance(job.get("job_id"), str):
            headers["location"] = f"/v1/jobs/{job['job_id']}"
        return json_response(await self.seed_view(job), status=op.success_status, headers=headers)

    async def _query_call(self, request: Request, op: Operation) -> Response:
        result = await self.invoke(op.rpc, self.query_params(request, op))
        return json_response(await self.seed_view(result))

    async def _batch(self, request: Request, op: Operation) -> Response:
        body = await self.read_body(request)
        if op.rpc in self.registry:
            return json_response(await self.seed_view(await self.invoke(op.rpc, body)))
        params = bind_params(op.rpc, BatchParams, body)
        assert isinstance(params, BatchParams)
        jobs: list[Any] = []
        missing: list[str] = []
        for job_id in dict.fromkeys(params.job_ids):
            try:
                jobs.append(await self.invoke("job.get", {"job_id": job_id}))
            except MeshrunError as err:
                if err.code is not ErrorCode.JOB_NOT_FOUND:
                    raise
                missing.append(job_id)
        return json_response(await self.seed_view({"jobs": jobs, "missing": missing}))

    async def result_files(self, job_id: str) -> tuple[str, dict[str, bytes]]:
        """A job's result CID and its files, checked against job.results' digests."""
        expected: dict[str, str] = {}
        if "job.results" in self.registry:
            results = await self.invoke("job.results", {"job_id": job_id})
            result_cid = results.get("result_cid")
            for entry in results.get("files") or []:
                if isinstance(entry, dict) and entry.get("sha256"):
                    expected[str(entry["path"])] = str(entry["sha256"])
        else:
            job = await self.invoke("job.get", {"job_id": job_id})
            result_cid = job.get("result_cid")
            if not result_cid:
                raise MeshrunError(
                    ErrorCode.JOB_NOT_FINISHED,
                    f"job {job_id} is {job.get('status')} and has no result to download yet",
                    {"job_id": job_id, "status": job.get("status")},
                )
        if not result_cid:
            raise MeshrunError(
                ErrorCode.JOB_NOT_FINISHED,
                f"job {job_id} has no result to download",
                {"job_id": job_id},
            )
        tree = await self.invoke("storage.tree", {"cid": result_cid})
        files = {path: base64.b64decode(b64) for path, b64 in tree["files"].items()}
        rebuilt, digests = await trio.to_thread.run_sync(digest_tree, files)
        if rebuilt != str(result_cid):
            raise MeshrunError(
                ErrorCode.VERIFICATION_MISMATCH,
                f"result files re-hash to {rebuilt}, not {result_cid}",
                {"job_id": job_id},
            )
        for path, digest in expected.items():
            if digests.get(path) != digest:
                raise MeshrunError(
                    ErrorCode.VERIFICATION_MISMATCH,
                    f"{path} in result {result_cid} does not match the digest job.results gave",
                    {"job_id": job_id, "path": path},
                )
        return str(result_cid), files

    async def package_extras(
        self, job_id: str, result_cid: str, files: Mapping[str, bytes]
    ) -> dict[str, bytes]:
        """The signed spec, receipts and verification summary that let `meshrun
        client verify` check the zip offline; none when the record lacks them."""
        job = await self.invoke("job.get", {"job_id": job_id})
        spec, receipt = job.get("spec_envelope_b64"), job.get("receipt_envelope_b64")
        executor = job.get("executor")
        if not (spec and receipt and executor) or job.get("result_cid") != result_cid:
            return {}
        if any(is_meta(path) for path in files):
            return {}
        try:
            return package_extras(
                job_id=job_id,
                result_cid=result_cid,
                spec_envelope=base64.b64decode(spec),
                executor=executor,
                receipt_envelope=base64.b64decode(receipt),
                verification=job.get("verification"),
            )
        except PackageError as exc:
            log.warning("job %s: download without offline proofs: %s", job_id, exc)
            return {}

    async def _download(self, request: Request, op: Operation) -> Response:
        job_id = request.path_params["job_id"]
        bind_params(op.rpc, JobIdOnly, {"job_id": job_id})
        result_cid, files = await self.result_files(job_id)
        extras = await self.package_extras(job_id, result_cid, files)
        archive = await trio.to_thread.run_sync(build_zip, files, result_cid, extras)
        return Response(
            archive,
            media_type="application/zip",
            headers={
                "content-disposition": f'attachment; filename="meshrun-{_safe(job_id)}.zip"',
                "x-meshrun-result-cid": result_cid,
            },
        )

    async def _stream(self, request: Request, op: Operation) -> Response:
        params = self.query_params(request, op)
        job = await self.invoke("job.get", params)
        if self.bus is None:
            raise MeshrunError(ErrorCode.INTERNAL_ERROR, "this server has no event bus")
        after = _last_event_id(request)
        return StreamingResponse(
            sse_frames(self, self.bus, job["job_id"], after),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def snapshot(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The job's record as an event of the bus's shape, and its logged events."""
        job = await self.invoke("job.get", {"job_id": job_id})
        try:
            events = list((await self.invoke("job.events", {"job_id": job_id}))["events"])
        except MeshrunError as err:
            if err.code is not ErrorCode.METHOD_NOT_FOUND:
                raise
            events = []
        last = max((int(e["seq"]) for e in events), default=0)
        return snapshot_event(job, last), events


def snapshot_event(job: dict[str, Any], seq: int) -> dict[str, Any]:
    return {
        "job_id": job["job_id"],
        "seq": seq,
        "at": job.get("updated_at") or job.get("created_at") or 0.0,
        "type": "Snapshot",
        "peer": None,
        "data": {"job": job},
        "status": job.get("status"),
        "substate": job.get("substate"),
        "progress": job.get("progress"),
    }


def is_terminal(event: Mapping[str, Any]) -> bool:
    return str(event.get("status") or "") in TERMINAL_STATUSES


def sse_frame(event: Mapping[str, Any]) -> bytes:
    head = f"id: {event['seq']}\n" if event.get("type") != "Snapshot" else ""
    return head.encode() + b"data: " + dump(dict(event)) + b"\n\n"


async def sse_frames(
    api: RestApi, bus: EventBus, job_id: str, after: int | None
) -> AsyncIterator[bytes]:
    """Subscribe first, then read the record: nothing between the two is lost."""
    yield b"retry: 2000\n\n"
    with bus.subscribe({job_id}) as rx:
        snapshot, events = await api.snapshot(job_id)
        if after is not None:
            for logged in events:
                if int(logged["seq"]) > after:
                    yield sse_frame({"job_id": job_id, **logged})
        yield sse_frame(snapshot)
        if is_terminal(snapshot):
            return
        last = int(snapshot["seq"])
        while True:
            event: dict[str, Any] | None = None
            with trio.move_on_after(SSE_KEEPALIVE_SECONDS):
                try:
                    event = await rx.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    # The bus dropped us as too slow: end, the client resumes by Last-Event-ID.
                    return
            if event is None:
                yield b": keepalive\n\n"
                continue
            if int(event.get("seq") or 0) <= last:
                continue
            last = int(event["seq"])
            yield sse_frame(event)
            if is_terminal(event):
                return


def build_zip(
    files: Mapping[str, bytes], result_cid: str, extras: Mapping[str, bytes] | None = None
) -> bytes:
    """Deterministic zip (fixed timestamps, sorted names) of a result package plus a
    checksum list in `sha256sum` format, so `sha256sum -c output.sha256` works, and
    `extras` (the meshrun/ proofs, outside the checksum list) after them."""
    buffer = io.BytesIO()
    lines = []
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files):
            data = files[path]
            archive.writestr(_zip_info(path), data)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {path}\n")
        if CHECKSUM_FILE not in files:
            archive.writestr(_zip_info(CHECKSUM_FILE), "".join(lines))
        for path in sorted(extras or {}):
            archive.writestr(_zip_info(path), (extras or {})[path])
        archive.comment = f"meshrun result {result_cid}".encode()
    return buffer.getvalue()


def _zip_info(path: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def parse_time(name: str, text: str) -> float:
    """Unix seconds, or an ISO-8601 date/time (UTC when it names no zone)."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                f"{name}={text!r} is neither unix seconds nor an ISO-8601 date/time",
                {"param": name},
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS, f"{name} must be a finite time", {"param": name}
        )
    return value


@functools.cache
def _array_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields a query string may repeat or comma-separate (cached: schemas are not free)."""
    props = model.model_json_schema().get("properties", {})
    return frozenset(name for name, schema in props.items() if _is_array(schema))


def _is_array(schema: Mapping[str, Any]) -> bool:
    if schema.get("type") == "array":
        return True
    return any(_is_array(option) for option in schema.get("anyOf", []))


def bind_params(name: str, model: type[BaseModel], params: object) -> BaseModel:
    """Validate params for a method the registry does not hold (a fallback, a
    connection-scoped call) with the same messages and codes as its own binding."""

    async def unused(_: BaseModel) -> None:
        return None

    return Method(name, model, unused, summary="", result="").bind(params)


def _last_event_id(request: Request) -> int | None:
    text = request.headers.get("last-event-id")
    if text is None:
        return None
    try:
        return max(0, int(text))
    except ValueError:
        raise MeshrunError(
            ErrorCode.INVALID_REQUEST, "Last-Event-ID must be an event sequence number"
        ) from None


def _too_large() -> MeshrunError:
    return MeshrunError(
        ErrorCode.MESSAGE_TOO_LARGE,
        f"request body is larger than the REST limit of {MAX_REST_BODY_BYTES} bytes",
        {"max_body_bytes": MAX_REST_BODY_BYTES},
    )


def _safe(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_.")[:128] or "job"

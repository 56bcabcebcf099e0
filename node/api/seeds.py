"""The seed documents' own routes, as thin adapters over meshrun's JSON-RPC methods.

Each route turns the seed's request into the params of one RPC method, calls it
through the registry (same validation, same error codes as POST /rpc), and maps
the answer to the seed's shape (node/api/seedshapes.py). Nothing here runs a job
its own way. Auth is the node's: the middleware in front of every route takes
`Authorization: Bearer`, a bare `Authorization: <token>` or `X-Api-Key`.

- AITBC 001: `POST /api/v1/jobs`, `GET /api/v1/jobs/{id}`, `POST /api/v1/jobs/{id}/cancel`
  (the `/v1/jobs…` routes of AITBC 003 are node/api/rest.py's).
- TensorOne 002: `GET /v2/jobs/{jobId}/status?include=&format=`,
  `GET /v2/jobs/{jobId}/status/stream` (SSE), `POST /v2/jobs/status/batch`.
- Bacalhau 004: `POST /requester/{submit,list,states,events,results,cancel}`;
  a submission is signed by the client (Ed25519 over the canonical JSON of
  `job_create_payload`) and checked against `client_public_key` before the node
  relays it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from crypto.keys import peer_id_from_public_key, verify_signature
from node.api.rest import RestApi, error_response, json_response, sse_frames
from node.api.rpc.jsonrpc import _internal_error, _meshrun_error_in
from node.api.seedshapes import (
    aitbc_submit_params,
    bacalhau_event,
    bacalhau_job,
    bacalhau_shard,
    tensorone_status,
)
from protocol.errors import ErrorCode, MeshrunError

TENSORONE_INCLUDES = ("logs", "metrics", "resources")
TENSORONE_FORMATS = ("json", "summary")
MAX_BATCH_JOBS = 100
_ED25519_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class SeedRoute:
    """One seed route and what /openapi.json says of it."""

    seed: str
    method: str
    path: str
    handler: str
    summary: str
    rpc: str
    success_status: int = 200
    media_type: str = "application/json"


SEED_ROUTES: tuple[SeedRoute, ...] = (
    SeedRoute("AITBC 001", "POST", "/api/v1/jobs", "aitbc_submit",
              "Submit {prompt, model, params} or AITBC 003's body (job.submit); prompts "
              "are refused with UNSUPPORTED", "job.submit", 201),
    SeedRoute("AITBC 001", "GET", "/api/v1/jobs/{job_id}", "aitbc_get",
              "A job's record with AITBC's names (job.get)", "job.get"),
    SeedRoute("AITBC 001", "POST", "/api/v1/jobs/{job_id}/cancel", "aitbc_cancel",
              "Cancel a job (job.cancel)", "job.cancel"),
    SeedRoute("TensorOne 002", "GET", "/v2/jobs/{job_id}/status", "tensorone_status",
              "A job's status in camelCase; include=logs,metrics,resources; "
              "format=json|summary (job.get)", "job.get"),
    SeedRoute("TensorOne 002", "GET", "/v2/jobs/{job_id}/status/stream", "tensorone_stream",
              "Server-sent events of a job until it ends (as /v1/jobs/{job_id}/status/stream)",
              "job.get", media_type="text/event-stream"),
    SeedRoute("TensorOne 002", "POST", "/v2/jobs/status/batch", "tensorone_batch",
              'Statuses of {"jobIds": [...], "include": [...]}, a list in their order; an '
              "unknown id's entry carries error JOB_NOT_FOUND", "job.get"),
    SeedRoute("Bacalhau 004", "POST", "/requester/submit", "bacalhau_submit",
              "Submit a client-signed job_create_payload (Ed25519 over its canonical JSON, "
              "checked against client_public_key); Spec.Engine must be ONNX", "job.submit"),
    SeedRoute("Bacalhau 004", "POST", "/requester/list", "bacalhau_list",
              "Jobs (job.list), or the one with `id`", "job.list"),
    SeedRoute("Bacalhau 004", "POST", "/requester/states", "bacalhau_states",
              "A job's state: Nodes → Shards → State, RunOutput, PublishedResults", "job.get"),
    SeedRoute("Bacalhau 004", "POST", "/requester/events", "bacalhau_events",
              "A job's events under Bacalhau's names (Bid, BidAccepted, ResultsAccepted…)",
              "job.events"),
    SeedRoute("Bacalhau 004", "POST", "/requester/results", "bacalhau_results",
              "A job's published results: [{NodeID, Data{StorageSource, Name, CID}}]",
              "job.get"),
    SeedRoute("Bacalhau 004", "POST", "/requester/cancel", "bacalhau_cancel",
              "Cancel a job ({job_id}, or a signed {payload: {JobId}}); returns its state",
              "job.cancel"),
)  # fmt: skip


def canonical_payload(payload: Any) -> bytes:
    """The bytes a Bacalhau client signs: the payload as compact, key-sorted JSON."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class SeedApi:
    """The seed routes, bound to the REST API (its registry, body reader, SSE)."""

    def __init__(self, rest: RestApi) -> None:
        self.rest = rest

    def routes(self) -> list[Route]:
        return [
            Route(route.path, self._guard(route.path, getattr(self, route.handler)),
                  methods=[route.method])
            for route in SEED_ROUTES
        ]  # fmt: skip

    def _guard(self, path: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                with self.rest.budget.hold() as held:
                    request.state.body_hold = held
                    return await handler(request)
            except Exception as exc:
                err = _meshrun_error_in(exc) or _internal_error(f"{request.method} {path}", exc)
                if path.startswith("/v2/"):
                    err = tensorone_error(err, request.path_params.get("job_id"))
                return error_response(err)

        return endpoint

    async def call(self, method: str, **params: Any) -> Any:
        return await self.rest.invoke(method, params)

    async def body(self, request: Request) -> dict[str, Any]:
        return await self.rest.read_body(request)

    # -------------------------------------------------------------- AITBC 001

    async def aitbc_submit(self, request: Request) -> Response:
        """`{"prompt", "model", "params"}` (001) or 003's body: the same job.submit."""
        body = await self.body(request)
        params = aitbc_submit_params(body)
        job = await self.rest.invoke("job.submit", params)
        return json_response(
            await self.rest.seed_view(job),
            status=201,
            headers={"location": f"/api/v1/jobs/{job['job_id']}"},
        )

    async def aitbc_get(self, request: Request) -> Response:
        job = await self.call("job.get", job_id=request.path_params["job_id"])
        return json_response(await self.rest.seed_view(job))

    async def aitbc_cancel(self, request: Request) -> Response:
        job = await self.call("job.cancel", job_id=request.path_params["job_id"])
        return json_response(await self.rest.seed_view(job))

    # ---------------------------------------------------------- TensorOne 002

    async def tensorone_status(self, request: Request) -> Response:
        include, fmt = _tensorone_query(request)
        job_id = request.path_params["job_id"]
        job = await self.call("job.get", job_id=job_id, include=include)
        return json_response(tensorone_status(job, include, summary=fmt == "summary"))

    async def tensorone_stream(self, request: Request) -> Response:
        job = await self.call("job.get", job_id=request.path_params["job_id"])
        if self.rest.bus is None:
            raise MeshrunError(ErrorCode.INTERNAL_ERROR, "this server has no event bus")
        return StreamingResponse(
            sse_frames(self.rest, self.rest.bus, job["job_id"], None),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def tensorone_batch(self, request: Request) -> Response:
        body = await self.body(request)
        unknown = sorted(set(body) - {"jobIds", "include", "format"})
        job_ids = body.get("jobIds")
        if unknown or not isinstance(job_ids, list) or not job_ids:
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                'the body is {"jobIds": [1..100 ids], "include"?: [logs, metrics, '
                'resources], "format"?: json|summary}'
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                {"unknown": unknown},
            )
        if len(job_ids) > MAX_BATCH_JOBS or not all(isinstance(j, str) for j in job_ids):
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                f"jobIds must be at most {MAX_BATCH_JOBS} strings",
                {"limit": MAX_BATCH_JOBS},
            )
        include = _includes(body.get("include") or [])
        fmt = _format(body.get("format") or "json")
        statuses: list[dict[str, Any]] = []
        for job_id in dict.fromkeys(job_ids):
            try:
                job = await self.call("job.get", job_id=job_id, include=include)
            except MeshrunError as err:
                if err.code is not ErrorCode.JOB_NOT_FOUND:
                    raise
                statuses.append({"jobId": job_id, **tensorone_error_body(err, job_id)})
                continue
            statuses.append(tensorone_status(job, include, summary=fmt == "summary"))
        return json_response(statuses)

    # ----------------------------------------------------------- Bacalhau 004

    async def bacalhau_submit(self, request: Request) -> Response:
        body = await self.body(request)
        payload, client_id = verify_client_signature(body, "job_create_payload")
        params = bacalhau_submit_params(payload)
        job = await self.rest.invoke("job.submit", params)
        return json_response({"job": bacalhau_job(job, client_id)})

    async def bacalhau_list(self, request: Request) -> Response:
        body = await self.body(request)
        _only(body, {"client_id", "id", "max_jobs", "return_all", "sort_by", "sort_reverse"})
        if body.get("client_id") and not body.get("return_all"):
            # Jobs are the node owner's; no client is recorded per job, so a filter by
            # client would be a guess. Say so rather than return everything silently.
            raise MeshrunError(
                ErrorCode.UNSUPPORTED,
                "this node does not record jobs per client: omit client_id, or set "
                "return_all to list every job of the node",
                {"client_id": body["client_id"]},
            )
        sort_by = str(body.get("sort_by") or "created_at")
        keys = {"created_at": "created_at", "id": "job_id", "updated_at": "updated_at"}
        if sort_by not in keys:
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                f"sort_by {sort_by!r} is not one of {', '.join(sorted(keys))}",
                {"sort_by": sort_by},
            )
        if body.get("id"):
            jobs = [await self.call("job.get", job_id=str(body["id"]))]
        else:
            limit = int(body.get("max_jobs") or 100)
            jobs = (await self.call("job.list", limit=max(1, min(limit, 1000))))["jobs"]
        jobs = sorted(jobs, key=lambda j: (j.get(keys[sort_by]) or 0, j.get("job_id", "")))
        if body.get("sort_reverse"):
            jobs = list(reversed(jobs))
        return json_response({"jobs": [bacalhau_job(j) for j in jobs]})

    async def _state_job(self, request: Request) -> tuple[str, dict[str, Any]]:
        body = await self.body(request)
        _only(body, {"client_id", "job_id"})
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "job_id is required", {"param": "job_id"})
        return job_id, dict(await self.call("job.get", job_id=job_id, include=["logs"]))

    async def bacalhau_states(self, request: Request) -> Response:
        _, job = await self._state_job(request)
        return json_response({"state": bacalhau_state(job)})

    async def bacalhau_events(self, request: Request) -> Response:
        job_id, _ = await self._state_job(request)
        events = (await self.call("job.events", job_id=job_id))["events"]
        return json_response({"events": [bacalhau_event(job_id, e) for e in events]})

    async def bacalhau_results(self, request: Request) -> Response:
        _, job = await self._state_job(request)
        results = []
        if job.get("result_cid"):
            shard = bacalhau_shard(job, {})
            results.append({"NodeID": job.get("executor"), "Data": shard["PublishedResults"]})
        return json_response({"results": results})

    async def bacalhau_cancel(self, request: Request) -> Response:
        body = await self.body(request)
        if "payload" in body:  # signed, as Bacalhau's CancelRequest
            payload, _ = verify_client_signature(body, "payload")
            job_id = payload.get("JobId") or payload.get("JobID") or payload.get("job_id")
            reason = str(payload.get("Reason") or "canceled by the client")
        else:
            _only(body, {"client_id", "job_id"})
            job_id, reason = body.get("job_id"), "canceled by the client"
        if not isinstance(job_id, str) or not job_id:
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "job_id is required", {"param": "job_id"})
        await self.call("job.cancel", job_id=job_id, reason=reason[:256])
        job = await self.call("job.get", job_id=job_id, include=["logs"])
        return json_response({"state": bacalhau_state(job)})


# ------------------------------------------------------------------ helpers


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"unknown field(s) {', '.join(unknown)}; "
            f"this request takes {', '.join(sorted(allowed))}",
            {"unknown": unknown},
        )


def _includes(values: Any) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise MeshrunError(ErrorCode.INVALID_PARAMS, "include must be a list", {"param": "include"})
    parts = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    bad = sorted(set(parts) - set(TENSORONE_INCLUDES))
    if bad:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"include takes {', '.join(TENSORONE_INCLUDES)}; not {', '.join(bad)}",
            {"param": "include", "unknown": bad},
        )
    return list(dict.fromkeys(parts))


def _format(value: Any) -> str:
    if value not in TENSORONE_FORMATS:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"format is json or summary, not {value!r}",
            {"param": "format"},
        )
    return str(value)


def _tensorone_query(request: Request) -> tuple[list[str], str]:
    query = request.query_params
    unknown = sorted(set(query.keys()) - {"include", "format", "access_token"})
    if unknown:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"unknown query parameter(s) {', '.join(unknown)}; use include and format",
            {"unknown": unknown},
        )
    return _includes(query.getlist("include")), _format(query.get("format", "json"))


def tensorone_error_body(err: MeshrunError, job_id: str | None) -> dict[str, Any]:
    details = dict(err.details)
    if job_id is not None:
        details.setdefault("jobId", job_id)
    if err.code is ErrorCode.JOB_NOT_FOUND:
        details.setdefault(
            "possibleReasons",
            [
                "Job ID is incorrect",
                "Job was deleted after completion (job.delete)",
                "Job was submitted to another node",
            ],
        )
    return {"error": err.code.value, "message": err.message, "details": details}


def tensorone_error(err: MeshrunError, job_id: str | None) -> MeshrunError:
    body = tensorone_error_body(err, job_id)
    return MeshrunError(err.code, err.message, body["details"])


def bacalhau_state(job: Mapping[str, Any]) -> dict[str, Any]:
    executor = job.get("executor")
    nodes: dict[str, Any] = {}
    if executor:
        logs = job.get("logs") or {}
        nodes[str(executor)] = {"Shards": {"0": bacalhau_shard(job, logs)}}
    return {"Nodes": nodes, "State": bacalhau_job(job)["Status"]["State"]}


def _decode_b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MeshrunError(ErrorCode.INVALID_PARAMS, f"{what} must be base64", {"param": what})
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS, f"{what} is not base64", {"param": what}
        ) from None


def verify_client_signature(body: Mapping[str, Any], field: str) -> tuple[dict[str, Any], str]:
    """Check a Bacalhau-style signed request; return its payload and the client's PeerID.

    `client_public_key` is a base64 Ed25519 key (32 bytes, or libp2p's 36-byte
    protobuf form); `signature` the base64 Ed25519 signature of the canonical JSON
    of `body[field]`. A `ClientID` in the payload must be that key's PeerID.
    """
    _only(body, {"client_public_key", "signature", field})
    payload = body.get(field)
    if not isinstance(payload, dict):
        raise MeshrunError(ErrorCode.INVALID_PARAMS, f"{field} must be an object", {"param": field})
    key = _decode_b64(body.get("client_public_key"), "client_public_key")
    if len(key) == 36 and key.startswith(_ED25519_PROTOBUF_PREFIX):
        key = key[4:]
    if len(key) != 32:
        raise MeshrunError(
            ErrorCode.SIGNATURE_INVALID,
            "client_public_key must be an Ed25519 public key (32 bytes, base64)",
            {"param": "client_public_key"},
        )
    signature = _decode_b64(body.get("signature"), "signature")
    if not verify_signature(key, canonical_payload(payload), signature):
        raise MeshrunError(
            ErrorCode.SIGNATURE_INVALID,
            f"signature does not verify against client_public_key over {field} "
            "(canonical JSON: sorted keys, no spaces, UTF-8)",
            {"param": "signature"},
        )
    client_id = peer_id_from_public_key(key)
    claimed = payload.get("ClientID")
    if claimed not in (None, "", client_id):
        raise MeshrunError(
            ErrorCode.SIGNATURE_INVALID,
            f"ClientID {claimed!r} is not the PeerID of client_public_key ({client_id})",
            {"client_id": client_id},
        )
    return payload, client_id


def bacalhau_submit_params(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`job_create_payload` → job.submit's params.

    meshrun runs ONNX models: `Spec.Engine` must be `ONNX` (a Docker or WASM engine
    is UNSUPPORTED), `Spec.Model` a catalog name or CID, `Spec.Inputs[0].CID` the
    .npz bundle, `Spec.Timeout` seconds, `Spec.Verifier` none/receipt/redundant:K.
    """
    spec = payload.get("Spec")
    if not isinstance(spec, dict):
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS, "job_create_payload.Spec is required", {"param": "Spec"}
        )
    engine = str(spec.get("Engine") or "")
    if engine.lower() not in ("onnx", "meshrun"):
        raise MeshrunError(
            ErrorCode.UNSUPPORTED,
            f"Spec.Engine {engine or '(none)'!r} is not supported: meshrun runs ONNX models "
            'on .npz inputs ("Engine": "ONNX", "Model", "Inputs": [{"CID": ...}])',
            {"param": "Spec.Engine", "supported": ["ONNX"]},
        )
    allowed = {"Engine", "Model", "Inputs", "Timeout", "Verifier", "Priority"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"unknown Spec field(s) {', '.join(unknown)}; an ONNX Spec takes "
            f"{', '.join(sorted(allowed))}",
            {"unknown": unknown},
        )
    inputs = spec.get("Inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            'Spec.Inputs must be one entry, {"StorageSource": "IPFS", "CID": <.npz CID>}',
            {"param": "Spec.Inputs"},
        )
    params: dict[str, Any] = aitbc_submit_params(
        {"model": spec.get("Model"), "input": inputs[0].get("CID")}
    )
    if spec.get("Timeout") is not None:
        params["timeout_seconds"] = spec["Timeout"]
    if spec.get("Verifier") is not None:
        params["verification"] = spec["Verifier"]
    if spec.get("Priority") is not None:
        params["priority"] = spec["Priority"]
    return params


__all__ = ["SEED_ROUTES", "SeedApi", "SeedRoute", "canonical_payload", "verify_client_signature"]

"""JSON-RPC methods for the job lifecycle (submit, follow, cancel, list, export…).

REST routes and the CLI reuse these through the registry, so validation, error
codes and result shapes are defined once, here.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.api.rpc import NoParams, Registry
from protocol.errors import ErrorCode, MeshrunError
from protocol.lifecycle import LogEvent
from protocol.messages import VERIFICATION_PATTERN
from storage.cid import Cid
from storage.errors import ContentTooLarge, StorageError

if TYPE_CHECKING:
    from node.api.methods.served import ServedNode
    from node.jobs.store import JobRecord
    from node.roles.requester import Requester

MAX_WAIT_SECONDS = 300.0
StatusName = Literal[
    "pending", "bidding", "assigned", "running", "completed",
    "failed", "timeout", "canceling", "canceled",
]  # fmt: skip


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequirementsParams(_Params):
    provider: Literal["any", "cpu", "cuda", "tensorrt"] = "any"
    gpu_type: str | None = Field(default=None, max_length=64)
    gpu_count: int = Field(default=0, ge=0, le=64)
    min_vram_gb: float = Field(default=0.0, ge=0)
    max_model_bytes: int | None = Field(default=None, ge=0)


class OutputConfig(_Params):
    outputs: list[str] = Field(
        default_factory=list, max_length=256, description="model outputs to keep (default: all)"
    )


VERIFICATION_FORMS = (
    "none, receipt, redundant:K (K executors, K 2..9) "
    "or sample:P (audited with probability P, 0..1, up to 4 decimals)"
)
# Execution params users reach for when they mean a verification policy; accepting
# them silently would run the job unverified while the user believes otherwise.
VERIFICATION_KNOBS = frozenset({"redundancy", "redundant", "verification", "verify"})
# The execution params an executor reads (node/roles/compute.py); any other key is
# refused rather than carried in the spec and silently ignored.
EXECUTION_PARAMS: dict[str, str] = {
    "batch_chunk": "run a batched input in slices of N items (progress per slice)",
    "deterministic": "ask onnxruntime for deterministic kernels",
    "ort_log_level": "onnxruntime log level in the job's logs (verbose … fatal)",
}
# Text-generation knobs (the AITBC seed's prompt jobs). meshrun has no prompt job kind
# yet, so a job that asks for one is refused as UNSUPPORTED with that reason.
GENERATION_PARAMS = frozenset(
    {"max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "stream", "seed", "stop"}
)


class ToleranceParams(_Params):
    mode: Literal["values", "argmax", "topk"] = Field(
        default="values",
        description="values: element-wise within atol/rtol; argmax: same class; "
        "topk: same top-k set",
    )
    atol: float | None = Field(default=None, ge=0, le=1e6, description="absolute tolerance")
    rtol: float | None = Field(default=None, ge=0, le=1e6, description="relative tolerance")
    k: int = Field(default=5, ge=1, le=1000, description="k of topk")


class JobSubmitParams(_Params):
    model_cid: str | None = Field(default=None, description="CID of the .onnx model")
    model: str | None = Field(default=None, description="a model name from this node's catalog")
    inputs_cid: str | None = Field(default=None, description="CID of the .npz inputs (required)")
    prompt: str | None = Field(
        default=None,
        max_length=100_000,
        description="a text-generation prompt: not supported yet, refused as UNSUPPORTED",
    )
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description='execution knobs, e.g. {"batch_chunk": 8}'
    )
    verification: str | None = Field(
        default=None,
        max_length=32,
        description=f"how the result is checked: {VERIFICATION_FORMS} "
        "(default: the node's --verify, receipt unless set)",
        json_schema_extra={"pattern": VERIFICATION_PATTERN},
    )
    tolerance: ToleranceParams | None = Field(
        default=None, description="how executors' outputs are compared (redundant, sample)"
    )
    requirements: RequirementsParams | None = None
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    timeout_seconds: float = Field(default=60.0, gt=0, le=7 * 24 * 3600)
    max_price: float | None = Field(default=None, ge=0)
    output_config: OutputConfig | None = None
    bid_window_seconds: float | None = Field(default=None, gt=0, le=60)
    wait: float | None = Field(
        default=None,
        gt=0,
        le=MAX_WAIT_SECONDS,
        description="seconds to wait for the job to end before answering: submit and wait "
        "in one call; the record comes back as it then stands, ended or not",
    )

    @field_validator("verification")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(VERIFICATION_PATTERN, value):
            raise ValueError(f"unknown verification policy {value!r}; use {VERIFICATION_FORMS}")
        return value

    @field_validator("params")
    @classmethod
    def _no_verification_knobs(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        knobs = sorted(VERIFICATION_KNOBS & set(value))
        if knobs:
            raise ValueError(
                f"{', '.join(knobs)} is not an execution param; ask for a policy with "
                f'the `verification` param instead (e.g. "verification": "redundant:2")'
            )
        return value


class JobIdParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)


class JobGetParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)
    include: list[Literal["logs", "metrics", "resources"]] = Field(default_factory=list)


class JobBatchParams(_Params):
    job_ids: list[str] = Field(min_length=1, max_length=100)


class JobWaitParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)
    timeout: float = Field(default=30.0, gt=0, le=MAX_WAIT_SECONDS)


class JobCancelParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)
    force: bool = Field(default=False, description="accepted for CLI parity; never prompts")
    reason: str = Field(default="canceled by the user", max_length=256)


class JobEventsParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)
    after_seq: int = Field(default=0, ge=0)


class JobFilter(_Params):
    status: StatusName | None = None
    from_time: float | None = Field(default=None, description="unix seconds, inclusive")
    to_time: float | None = Field(default=None, description="unix seconds, exclusive")
    days: float | None = Field(default=None, gt=0, description="only the last N days")


class JobListParams(JobFilter):
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page")


class JobExportParams(JobFilter):
    format: Literal["json", "csv"] = "json"


class JobStatsParams(_Params):
    days: float | None = Field(default=None, gt=0)


class ModelAddParams(_Params):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    data_b64: str | None = Field(default=None, description="the .onnx bytes, base64")
    cid: str | None = Field(default=None, description="or: the CID of a model already stored")


def check_job_kind(p: JobSubmitParams) -> None:
    """Refuse what meshrun cannot run, with a code a script can match: a prompt job
    (UNSUPPORTED), an execution param no executor reads (INVALID_PARAMS)."""
    generation = sorted(GENERATION_PARAMS & set(p.params))
    if p.prompt is not None or generation:
        asked = "a prompt" if p.prompt is not None else f"the params {', '.join(generation)}"
        raise MeshrunError(
            ErrorCode.UNSUPPORTED,
            f"text-generation (prompt) jobs are not supported: this job gives {asked}, but "
            "meshrun runs ONNX models on .npz tensor inputs (model or model_cid + inputs_cid) "
            "and no text-generation model is installed on this network",
            {
                "kind": "prompt",
                "model": p.model,
                "generation_params": generation,
                "supported": "model or model_cid + inputs_cid (.npz)",
            },
        )
    unknown = sorted(set(p.params) - set(EXECUTION_PARAMS))
    if unknown:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"unknown execution param(s) {', '.join(unknown)}; an executor reads only "
            f"{', '.join(sorted(EXECUTION_PARAMS))}",
            {"unknown": unknown, "known": EXECUTION_PARAMS},
        )
    if p.inputs_cid is None:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            "inputs_cid is required: the CID of an .npz bundle, one array per model input",
            {"param": "inputs_cid"},
        )


def _refreshed_estimate(
    planned: float, started_at: float | None, progress: float | None, now: float | None = None
) -> float:
    """The bid's ETA while it holds; once it has passed and the job still runs, the
    run's pace so far (past the 5 % fetch mark), and never a time already gone."""
    now = time.time() if now is None else now
    if planned > now:
        return planned
    estimate = planned
    if started_at is not None and progress is not None and 5.0 < progress < 100.0:
        estimate = started_at + (now - started_at) * 100.0 / progress
    return max(estimate, now + 1.0)


def parse_cid(text: str) -> Cid:
    try:
        return Cid.decode(text)
    except ValueError as exc:
        raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": text}) from None


def _window(f: JobFilter) -> tuple[float | None, float | None]:
    since = f.from_time
    if f.days is not None:
        since = max(since or 0.0, time.time() - f.days * 86400)
    return since, f.to_time


EXPORT_COLUMNS = (
    "job_id", "status", "model_cid", "inputs_cid", "executor", "result_cid", "price",
    "created_at", "started_at", "completed_at", "error_code", "error_message", "retry_count",
)  # fmt: skip


def register_job_methods(registry: Registry, node: ServedNode) -> None:
    db = node.ctx.db

    def requester() -> Requester:
        if node.requester is None:
            raise MeshrunError(
                ErrorCode.WRONG_MODE,
                f"this node runs in {node.mode} mode; submit jobs to a requester node",
            )
        return node.requester

    def detailed(record: JobRecord, include: list[str] | None = None) -> dict[str, Any]:
        view = record.public()
        accepted = db.last_event(record.job_id, LogEvent.BID_ACCEPTED)
        view["price"] = accepted["data"].get("price") if accepted else None
        eta = accepted["data"].get("eta_seconds") if accepted else None
        if eta is not None and not record.status.terminal and accepted:
            view["estimated_completion"] = _refreshed_estimate(
                accepted["at"] + float(eta), record.started_at, record.progress
            )
        else:
            view["estimated_completion"] = record.completed_at
        for part in include or []:
            view[part] = _included(record, part)
        return view

    def _included(record: JobRecord, part: str) -> Any:
        receipt = record.receipt or {}
        if part == "resources":
            return {"executor": record.executor, **receipt.get("resources", {})}
        if part == "metrics":
            events = {e["type"]: e["at"] for e in db.events(record.job_id)}
            phases: dict[str, float] = {}
            for name, start, end in (
                ("bidding_s", "Published", "BidAccepted"),
                ("execution_s", "BidAccepted", "ResultsPublished"),
                ("verification_s", "ResultsPublished", "ReceiptVerified"),
            ):
                if start in events and end in events:
                    phases[name] = round(events[end] - events[start], 4)
            return {"phases": phases, "executor_timings_ms": receipt.get("timings_ms", {})}
        logs: dict[str, str] = {}
        if record.result_cid:
            for name in ("stdout", "stderr"):
                try:
                    target = node.ctx.store.resolve_path(
                        Cid.decode(record.result_cid), f"logs/{name}.log"
                    )
                    data = node.ctx.store.cat(target, max_bytes=node.ctx.content.limit())
                    logs[name] = data.decode(errors="replace")
                except (StorageError, KeyError):
                    logs[name] = ""
        return logs

    @registry.method(
        "job.submit", JobSubmitParams, summary="Submit an ONNX inference job",
        result="job record + estimated_cost, estimated_time_seconds",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.INVALID_SPEC,
                ErrorCode.WRONG_MODE, ErrorCode.MODEL_NOT_FOUND, ErrorCode.UNSUPPORTED],
    )  # fmt: skip
    async def job_submit(p: JobSubmitParams) -> dict[str, Any]:
        check_job_kind(p)
        if (p.model_cid is None) == (p.model is None):
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS, "give exactly one of model_cid or model (a catalog name)"
            )
        model_cid = p.model_cid if p.model_cid is not None else db.model_cid(str(p.model))
        parse_cid(model_cid)
        inputs_cid = str(p.inputs_cid)
        parse_cid(inputs_cid)
        req = requester()
        record = await req.submit(
            model_cid,
            inputs_cid,
            p.timeout_seconds,
            max_price=p.max_price,
            priority=p.priority,
            requirements=p.requirements.model_dump() if p.requirements else None,
            bid_window=p.bid_window_seconds,
            params=p.params,
            output_names=p.output_config.outputs if p.output_config else None,
            verification=p.verification,
            tolerance=p.tolerance.model_dump() if p.tolerance else None,
        )
        if p.wait is not None:
            record = await req.wait(record.job_id, p.wait)
        return {**detailed(record), **req.estimates(p.max_price, p.bid_window_seconds)}

    @registry.method(
        "job.get", JobGetParams, summary="A job's current record",
        result="job record (+ logs, metrics, resources when included)",
        errors=[ErrorCode.JOB_NOT_FOUND],
    )  # fmt: skip
    async def job_get(p: JobGetParams) -> dict[str, Any]:
        return detailed(db.get(p.job_id), list(p.include))

    @registry.method(
        "job.get_batch", JobBatchParams, summary="Several job records at once",
        result="{jobs: [job record], missing: [job_id]}",
    )  # fmt: skip
    async def job_get_batch(p: JobBatchParams) -> dict[str, Any]:
        jobs, missing = [], []
        for job_id in p.job_ids:
            record = db.find(job_id)
            if record is None:
                missing.append(job_id)
            else:
                jobs.append(detailed(record))
        return {"jobs": jobs, "missing": missing}

    @registry.method(
        "job.wait", JobWaitParams, summary="Wait until a job is terminal or the timeout passes",
        result="job record", errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.WRONG_MODE],
    )  # fmt: skip
    async def job_wait(p: JobWaitParams) -> dict[str, Any]:
        db.get(p.job_id)
        return detailed(await requester().wait(p.job_id, p.timeout))

    @registry.method(
        "job.cancel", JobCancelParams,
        summary="Cancel a job; a running executor is told to stop",
        result="job record (canceled)",
        errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.ILLEGAL_TRANSITION, ErrorCode.WRONG_MODE],
    )  # fmt: skip
    async def job_cancel(p: JobCancelParams) -> dict[str, Any]:
        db.get(p.job_id)
        return detailed(await requester().cancel(p.job_id, p.reason))

    @registry.method(
        "job.list", JobListParams, summary="Jobs on this node, newest first, paged",
        result="{jobs, total, has_more, next_cursor}",
    )  # fmt: skip
    async def job_list(p: JobListParams) -> dict[str, Any]:
        since, until = _window(p)
        records, total, next_cursor = db.query_jobs(p.status, since, until, p.limit, p.cursor)
        return {
            "jobs": [detailed(r) for r in records],
            "total": total,
            "has_more": next_cursor is not None,
            "next_cursor": next_cursor,
        }

    @registry.method(
        "job.events", JobEventsParams, summary="A job's event log",
        result="{job_id, events: [{seq, at, type, peer, data}]}", errors=[ErrorCode.JOB_NOT_FOUND],
    )  # fmt: skip
    async def job_events(p: JobEventsParams) -> dict[str, Any]:
        events = [e for e in db.events(p.job_id) if e["seq"] > p.after_seq]
        return {"job_id": p.job_id, "events": events}

    @registry.method(
        "job.bids", JobIdParams, summary="Bids and reasoned refusals a job received",
        result="{job_id, bids}", errors=[ErrorCode.JOB_NOT_FOUND],
    )  # fmt: skip
    async def job_bids(p: JobIdParams) -> dict[str, Any]:
        db.get(p.job_id)
        return {"job_id": p.job_id, "bids": db.bids(p.job_id)}

    @registry.method(
        "job.results", JobIdParams, summary="The files of a completed job's result package",
        result="{job_id, result_cid, files: [{path, size, sha256}]}",
        errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.JOB_NOT_FINISHED, ErrorCode.CID_NOT_FOUND],
    )  # fmt: skip
    async def job_results(p: JobIdParams) -> dict[str, Any]:
        record = db.get(p.job_id)
        if record.result_cid is None:
            raise MeshrunError(
                ErrorCode.JOB_NOT_FINISHED,
                f"job {p.job_id} has no result (status {record.status.value})",
                {"status": record.status.value},
            )
        limit = node.ctx.content.limit()
        try:
            files = await trio.to_thread.run_sync(
                lambda: node.ctx.store.read_tree(Cid.decode(record.result_cid), max_bytes=limit)
            )
        except ContentTooLarge as exc:
            raise MeshrunError(
                ErrorCode.CONTENT_TOO_LARGE,
                f"result {record.result_cid}: {exc}",
                {"cid": record.result_cid, "limit": limit},
            ) from None
        except (StorageError, KeyError) as exc:
            raise MeshrunError(
                ErrorCode.CID_NOT_FOUND, f"result {record.result_cid} is not stored here: {exc}"
            ) from None
        return {
            "job_id": p.job_id,
            "result_cid": record.result_cid,
            "files": [
                {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for path, data in sorted(files.items())
            ],
        }

    @registry.method(
        "job.export", JobExportParams, summary="Job history as JSON or CSV",
        result="{format, count, content}",
    )  # fmt: skip
    async def job_export(p: JobExportParams) -> dict[str, Any]:
        since, until = _window(p)
        records, total, _ = db.query_jobs(p.status, since, until, 100_000, None)
        rows = [detailed(r) for r in records]
        if p.format == "json":
            return {"format": "json", "count": total, "content": rows}
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            error = row.get("error") or {}
            writer.writerow(
                {
                    **{k: row.get(k) for k in EXPORT_COLUMNS},
                    "error_code": error.get("code"),
                    "error_message": error.get("message"),
                }
            )
        return {"format": "csv", "count": total, "content": out.getvalue()}

    @registry.method(
        "job.stats", JobStatsParams, summary="Totals, success rate, average time, amount spent",
        result="{total, by_status, success_rate, average_completion_seconds, total_spent}",
    )  # fmt: skip
    async def job_stats(p: JobStatsParams) -> dict[str, Any]:
        since = time.time() - p.days * 86400 if p.days else None
        return db.stats(since)

    @registry.method(
        "job.delete", JobIdParams, summary="Delete a finished job and its result blocks",
        result="{job_id, deleted, result_cid, blocks_removed}",
        errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.JOB_NOT_FINISHED],
    )  # fmt: skip
    async def job_delete(p: JobIdParams) -> dict[str, Any]:
        record = db.get(p.job_id)
        if not record.status.terminal:
            raise MeshrunError(
                ErrorCode.JOB_NOT_FINISHED,
                f"job {p.job_id} is {record.status.value}; cancel it before deleting it",
                {"status": record.status.value},
            )
        # Only blocks nothing else keeps go: results share blocks (every empty log).
        forgotten = await node.ctx.content.forget_job(p.job_id, record.result_cid)
        removed = int(forgotten["removed_blocks"])
        db.delete(p.job_id)
        return {
            "job_id": p.job_id,
            "deleted": True,
            "result_cid": record.result_cid,
            "blocks_removed": removed,
        }

    @registry.method(
        "model.add", ModelAddParams, summary="Name a model in this node's catalog",
        result="{name, cid}", errors=[ErrorCode.INVALID_PARAMS, ErrorCode.CID_NOT_FOUND],
    )  # fmt: skip
    async def model_add(p: ModelAddParams) -> dict[str, Any]:
        if (p.data_b64 is None) == (p.cid is None):
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "give exactly one of data_b64 or cid")
        if p.data_b64 is not None:
            try:
                data = base64.b64decode(p.data_b64, validate=True)
            except (binascii.Error, ValueError):
                raise MeshrunError(ErrorCode.INVALID_PARAMS, "data_b64 is not base64") from None
            cid = await trio.to_thread.run_sync(node.ctx.store.add_bytes, data)
        else:
            cid = parse_cid(str(p.cid))
            if node.ctx.store.missing_blocks(cid):
                raise MeshrunError(ErrorCode.CID_NOT_FOUND, f"{cid} is not stored on this node")
        db.add_model(p.name, str(cid))
        return {"name": p.name, "cid": str(cid)}

    @registry.method(
        "model.list", NoParams, summary="This node's model catalog", result="{models: [...]}"
    )
    async def model_list(_: NoParams) -> dict[str, Any]:
        return {"models": db.models()}


__all__ = ["parse_cid", "register_job_methods"]

"""The seed documents' response shapes, computed from meshrun's own job record.

Pure functions (no I/O): the REST routes in node/api/rest.py and the seed routes
in node/api/seeds.py map a `job.get` record to the field names a seed's client
expects, keeping meshrun's own names beside them where the two differ.

- AITBC (`/v1/jobs…`): `miner_id`, `result`, `model`, ISO-8601 times.
- TensorOne (`/v2/jobs/{jobId}/status`): camelCase, its state names.
- Bacalhau (`/requester/*`): `Metadata`, `Nodes → Shards`, `RunOutput`, `PublishedResults`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from protocol.errors import ErrorCode, MeshrunError
from storage.cid import Cid

# The record's times, unix seconds in `job.get`, ISO-8601 in the seed shapes.
TIME_FIELDS = ("created_at", "started_at", "completed_at", "updated_at", "estimated_completion")


def iso(ts: object) -> str | None:
    """Unix seconds → '2026-02-13T10:00:00Z' (millisecond precision when not whole)."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    moment = datetime.fromtimestamp(float(ts), UTC)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def is_job_record(value: object) -> bool:
    return isinstance(value, Mapping) and "job_id" in value and "status" in value


# ------------------------------------------------------------------------- AITBC


def aitbc_job(job: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A `job.get` record with AITBC's names added: `miner_id` (= executor), `result`
    (= result_cid), `model` (the catalog name, else the model CID) and ISO-8601 times;
    the unix seconds stay under `<field>_unix`."""
    view = dict(job)
    view["miner_id"] = job.get("executor")
    view["result"] = job.get("result_cid")
    model_cid = job.get("model_cid")
    view["model"] = (names or {}).get(str(model_cid), model_cid) if model_cid else None
    for name in TIME_FIELDS:
        if name in job:
            value = job.get(name)
            view[f"{name}_unix"] = value
            view[name] = iso(value)
    return view


AITBC_OUTPUT_FORMATS = frozenset({"json", "zip", "npy"})


def _is_cid(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        Cid.decode(text)
    except ValueError:
        return False
    return True


def is_aitbc_submit(body: Mapping[str, Any]) -> bool:
    """A `POST /v1/jobs` body in AITBC's words rather than job.submit's params."""
    output = body.get("output_config")
    seed_output = isinstance(output, Mapping) and bool({"destination", "format"} & set(output))
    return "input" in body or seed_output


def aitbc_submit_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """AITBC's submit body → job.submit's params, refusing what meshrun cannot honour.

    `model` is a catalog name (or a CID); `input` is a file id (the CID of an .npz
    bundle) or a string, which is a prompt; `output_config.destination` must be
    local; `format` json (output.json), zip or npy. Every other key goes to
    job.submit as is, which refuses the ones it does not know.
    """
    params = {k: v for k, v in body.items() if k not in ("input", "output_config", "model")}
    model = body.get("model")
    if model is not None:
        params["model_cid" if _is_cid(model) else "model"] = model
    given = body.get("input")
    if given is not None:
        if not isinstance(given, str):
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                "input must be a string: a file id (the CID of an .npz bundle) or a prompt",
                {"param": "input"},
            )
        params["inputs_cid" if _is_cid(given) else "prompt"] = given
    output = body.get("output_config")
    if isinstance(output, Mapping):
        config = dict(output)
        destination = config.pop("destination", "local")
        if destination not in ("local", None):
            raise MeshrunError(
                ErrorCode.UNSUPPORTED,
                f"output_config.destination {destination!r} is not supported: results stay "
                "on the node's store (and its IPFS daemon, with --ipfs-api); fetch them with "
                "GET /v1/jobs/{job_id}/download",
                {"param": "output_config.destination", "supported": ["local"]},
            )
        fmt = config.pop("format", "json")
        if fmt not in AITBC_OUTPUT_FORMATS:
            raise MeshrunError(
                ErrorCode.UNSUPPORTED,
                f"output_config.format {fmt!r} is not supported; a result is output.json "
                "plus outputs/<name>.npy, downloaded as a zip",
                {"param": "output_config.format", "supported": sorted(AITBC_OUTPUT_FORMATS)},
            )
        if config:
            params["output_config"] = config
    elif output is not None:
        params["output_config"] = output
    return params


def aitbc_result(value: Any, names: Mapping[str, str] | None = None) -> Any:
    """A REST result with every job record in it (one, a page, a batch) in AITBC's shape."""
    if is_job_record(value):
        return aitbc_job(value, names)
    if isinstance(value, Mapping) and isinstance(value.get("jobs"), list):
        return {
            **value,
            "jobs": [aitbc_job(j, names) if is_job_record(j) else j for j in value["jobs"]],
        }
    return value


# --------------------------------------------------------------------- TensorOne

TENSORONE_STATES = {
    "pending": "queued",
    "bidding": "queued",
    "assigned": "initializing",
    "running": "running",
    "canceling": "running",
    "completed": "completed",
    "failed": "failed",
    "timeout": "timeout",
    "canceled": "cancelled",
}
_SUGGESTIONS = {
    "RESOURCE_EXHAUSTED": "Reduce the input size or batch, or ask for an executor with more memory",
    "TIMEOUT": "Raise timeout_seconds or split the batch",
    "NO_BIDS": "Check that a compute node is connected and meets the requirements",
    "EXECUTION_FAILED": "Check the model and inputs (see logs/stderr.log)",
    "INPUT_TOO_LARGE": "Send smaller inputs or split the batch",
}


def _size_text(n: object) -> str | None:
    if not isinstance(n, (int, float)):
        return None
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    return None


def tensorone_status(
    job: Mapping[str, Any], include: list[str], *, summary: bool = False
) -> dict[str, Any]:
    """`GET /v2/jobs/{jobId}/status`: the record in TensorOne's camelCase shape."""
    status = str(job.get("status"))
    state = TENSORONE_STATES.get(status, status)
    error = job.get("error") or None
    if summary:
        return {
            "jobId": job["job_id"],
            "status": state,
            "progress": job.get("progress"),
            "result": job.get("result_cid"),
            "error": error.get("message") if isinstance(error, Mapping) else None,
        }
    view: dict[str, Any] = {
        "jobId": job["job_id"],
        "status": state,
        "meshrunStatus": status,
        "progress": job.get("progress"),
        "endpointId": job.get("model_cid"),
        "priority": job.get("priority"),
        "createdAt": iso(job.get("created_at")),
        "startedAt": iso(job.get("started_at")),
        "estimatedCompletion": iso(job.get("estimated_completion")),
        "currentStep": job.get("substate") or status,
        "metadata": {
            "executor": job.get("executor"),
            "modelCid": job.get("model_cid"),
            "inputsCid": job.get("inputs_cid"),
        },
        "tags": dict(job.get("tags") or {}),
        "retryCount": job.get("retry_count") or 0,
        "nextRetryAt": None,
    }
    started, done = job.get("started_at"), job.get("completed_at")
    if isinstance(started, (int, float)) and isinstance(done, (int, float)):
        view["executionTime"] = round(done - started, 3)
    if status == "completed":
        view["completedAt"] = iso(done)
        view["output"] = {
            "result": job.get("result_cid"),
            "outputUrl": f"/v1/jobs/{job['job_id']}/download",
            "size": None,
            "format": "zip",
        }
    elif status in ("failed", "timeout", "canceled"):
        view["failedAt" if status != "canceled" else "cancelledAt"] = iso(done)
    if isinstance(error, Mapping):
        code = str(error.get("code"))
        details = dict(error.get("details") or {})
        if code in _SUGGESTIONS:
            details.setdefault("suggestion", _SUGGESTIONS[code])
        view["error"] = {"code": code, "message": error.get("message"), "details": details}
        view["retryable"] = bool(error.get("retryable"))
    execution: dict[str, Any] = {
        "duration": view.get("executionTime"),
        "costAccrued": job.get("price"),
        "tokensProcessed": None,
    }
    if "metrics" in include:
        view["metrics"] = job.get("metrics")
        view["execution"] = execution
    else:
        view["execution"] = execution
    if "resources" in include:
        view["resources"] = tensorone_resources(job.get("resources") or {})
    if "logs" in include:
        view["logs"] = job.get("logs")
    return view


def tensorone_resources(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The executor's measured resources (receipt) under TensorOne's names."""
    device = raw.get("device") or raw.get("provider")
    return {
        "gpuType": raw.get("gpu_name") or raw.get("gpu_type") or device,
        "gpuUtilization": raw.get("gpu_utilization") or raw.get("gpu_util_percent"),
        "memoryUsage": _size_text(raw.get("peak_rss_bytes") or raw.get("memory_bytes")),
        "memoryTotal": _size_text(raw.get("memory_total_bytes")),
        "cpuUsage": raw.get("cpu_percent"),
        "executor": raw.get("executor"),
        "raw": dict(raw),
    }


# ---------------------------------------------------------------------- Bacalhau

BACALHAU_STATES = {
    "pending": "New",
    "bidding": "New",
    "assigned": "Bidding",
    "running": "Running",
    "canceling": "Running",
    "completed": "Completed",
    "failed": "Error",
    "timeout": "Error",
    "canceled": "Cancelled",
}
BACALHAU_EVENTS = {
    "Created": "Created",
    "BidReceived": "Bid",
    "BidAccepted": "BidAccepted",
    "BidRejected": "BidRejected",
    "ExecutionStarted": "RunStarted",
    "ResultsPublished": "ResultsProposed",
    "ReceiptVerified": "ResultsAccepted",
    "ReceiptRejected": "ResultsRejected",
    "Completed": "ResultsPublished",
    "Failed": "Error",
    "TimedOut": "Error",
    "Canceled": "Cancelled",
}


def bacalhau_job(job: Mapping[str, Any], client_id: str | None = None) -> dict[str, Any]:
    return {
        "APIVersion": "V1beta1",
        "Metadata": {
            "ID": job["job_id"],
            "CreatedAt": iso(job.get("created_at")),
            "ClientID": client_id or job.get("requester"),
        },
        "Spec": {
            "Engine": "ONNX",
            "Model": job.get("model_cid"),
            "Inputs": [{"StorageSource": "IPFS", "CID": job.get("inputs_cid")}],
            "Timeout": job.get("timeout_seconds"),
        },
        "Status": {
            "State": BACALHAU_STATES.get(str(job.get("status")), str(job.get("status"))),
            "meshrunStatus": job.get("status"),
        },
    }


def bacalhau_shard(job: Mapping[str, Any], logs: Mapping[str, str]) -> dict[str, Any]:
    executor = job.get("executor")
    error = job.get("error") or {}
    verification = job.get("verification") or {}
    published: dict[str, Any] = {}
    if job.get("result_cid"):
        published = {
            "StorageSource": "IPFS",
            "Name": f"job-{job['job_id']}-shard-0-host-{executor}",
            "CID": job.get("result_cid"),
        }
    done = job.get("status") in ("completed", "failed", "timeout", "canceled")
    return {
        "NodeId": executor,
        "State": BACALHAU_STATES.get(str(job.get("status")), str(job.get("status"))),
        "Status": job.get("substate") or job.get("status"),
        "VerificationResult": {
            "Complete": job.get("status") == "completed",
            "Result": job.get("status") == "completed"
            and verification.get("decision") not in ("disputed", "failed"),
        }
        if done
        else {},
        "PublishedResults": published,
        "RunOutput": {
            "stdout": logs.get("stdout", ""),
            "stdouttruncated": False,
            "stderr": logs.get("stderr", ""),
            "stderrtruncated": False,
            "exitCode": 0 if job.get("status") == "completed" else (1 if error else None),
            "runnerError": error.get("message", "") if isinstance(error, Mapping) else "",
        },
    }


def bacalhau_event(job_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    kind = str(event.get("type"))
    return {
        "JobID": job_id,
        "SourceNodeID": event.get("peer"),
        "EventName": BACALHAU_EVENTS.get(kind, kind),
        "EventTime": iso(event.get("at")),
        "meshrunEvent": kind,
        "Seq": event.get("seq"),
        "Data": event.get("data"),
    }

"""The node's JSON-RPC methods: the one door users, the CLI and the SDK share."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from node.rpc import NoParams, Registry
from protocol.errors import ErrorCode, MeshrunError
from storage.cid import Cid
from storage.errors import BlockNotFound, PathNotFound, StorageError

if TYPE_CHECKING:
    from node.requester import Requester
    from node.service import Node

MAX_WAIT_SECONDS = 300.0


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageAddParams(_Params):
    data_b64: str = Field(description="the bytes to store, base64")


class StorageGetParams(_Params):
    cid: str
    path: str | None = Field(default=None, description="a file inside a directory CID")


class StorageTreeParams(_Params):
    cid: str


class RequirementsParams(_Params):
    provider: Literal["any", "cpu", "cuda", "tensorrt"] = "any"
    gpu_type: str | None = None
    gpu_count: int = Field(default=0, ge=0, le=64)
    min_vram_gb: float = Field(default=0.0, ge=0)
    max_model_bytes: int | None = Field(default=None, ge=0)


class JobSubmitParams(_Params):
    model_cid: str
    inputs_cid: str
    timeout_seconds: float = Field(default=60.0, gt=0, le=7 * 24 * 3600)
    max_price: float | None = Field(default=None, ge=0)
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    requirements: RequirementsParams | None = None
    bid_window_seconds: float | None = Field(default=None, gt=0, le=60)


class JobIdParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)


class JobWaitParams(_Params):
    job_id: str = Field(min_length=1, max_length=128)
    timeout: float = Field(default=30.0, gt=0, le=MAX_WAIT_SECONDS)


class JobListParams(_Params):
    status: (
        Literal[
            "pending",
            "bidding",
            "assigned",
            "running",
            "completed",
            "failed",
            "timeout",
            "canceling",
            "canceled",
        ]
        | None
    ) = None
    limit: int = Field(default=100, ge=1, le=1000)


def _cid(text: str) -> Cid:
    try:
        return Cid.decode(text)
    except ValueError as exc:
        raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": text}) from None


def build_registry(node: Node) -> Registry:
    registry = Registry(title="meshrun node")

    def requester() -> Requester:
        if node.requester is None:
            raise MeshrunError(
                ErrorCode.WRONG_MODE,
                f"this node runs in {node.mode} mode; submit jobs to a requester node",
            )
        return node.requester

    @registry.method(
        "node.info",
        NoParams,
        summary="Who this node is and how to reach it",
        result="peer_id, mode, listen_addrs, rpc_url, providers, peers",
    )
    async def node_info(_: NoParams) -> dict[str, Any]:
        return node.info()

    @registry.method(
        "node.peers",
        NoParams,
        summary="Peers this node is connected to",
        result="{peers: [peer_id], topic_peers: [peer_id]}",
    )
    async def node_peers(_: NoParams) -> dict[str, Any]:
        return node.peers()

    @registry.method(
        "storage.add",
        StorageAddParams,
        summary="Store bytes as a UnixFS file",
        result="{cid, size}",
        errors=[ErrorCode.INVALID_PARAMS],
    )
    async def storage_add(p: StorageAddParams) -> dict[str, Any]:
        try:
            data = base64.b64decode(p.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "data_b64 is not valid base64") from None
        cid = await trio.to_thread.run_sync(node.ctx.store.add_bytes, data)
        return {"cid": str(cid), "size": len(data)}

    @registry.method(
        "storage.get",
        StorageGetParams,
        summary="Read a file by CID (and path)",
        result="{cid, data_b64, size}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND],
    )
    async def storage_get(p: StorageGetParams) -> dict[str, Any]:
        root = _cid(p.cid)
        store = node.ctx.store
        try:
            target = store.resolve_path(root, p.path) if p.path else root
            data = await trio.to_thread.run_sync(store.cat, target)
        except (BlockNotFound, PathNotFound) as exc:
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, str(exc), {"cid": p.cid}) from None
        except StorageError as exc:
            raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": p.cid}) from None
        return {"cid": str(target), "size": len(data), "data_b64": base64.b64encode(data).decode()}

    @registry.method(
        "storage.tree",
        StorageTreeParams,
        summary="Every file under a directory CID",
        result="{cid, files: {path: b64}}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND],
    )
    async def storage_tree(p: StorageTreeParams) -> dict[str, Any]:
        root = _cid(p.cid)
        try:
            files = await trio.to_thread.run_sync(node.ctx.store.read_tree, root)
        except BlockNotFound as exc:
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, str(exc), {"cid": p.cid}) from None
        except StorageError as exc:
            raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": p.cid}) from None
        return {
            "cid": p.cid,
            "files": {k: base64.b64encode(v).decode() for k, v in sorted(files.items())},
        }

    @registry.method(
        "job.submit",
        JobSubmitParams,
        summary="Submit an ONNX inference job",
        result="the job record (job_id, status, ...)",
        errors=[
            ErrorCode.INVALID_CID,
            ErrorCode.CID_NOT_FOUND,
            ErrorCode.INVALID_SPEC,
            ErrorCode.WRONG_MODE,
        ],
    )
    async def job_submit(p: JobSubmitParams) -> dict[str, Any]:
        _cid(p.model_cid)
        _cid(p.inputs_cid)
        record = await requester().submit(
            p.model_cid,
            p.inputs_cid,
            p.timeout_seconds,
            max_price=p.max_price,
            priority=p.priority,
            requirements=p.requirements.model_dump() if p.requirements else None,
            bid_window=p.bid_window_seconds,
        )
        return dict(record.public())

    @registry.method(
        "job.get",
        JobIdParams,
        summary="A job's current record",
        result="job record",
        errors=[ErrorCode.JOB_NOT_FOUND],
    )
    async def job_get(p: JobIdParams) -> dict[str, Any]:
        return node.ctx.db.get(p.job_id).public()

    @registry.method(
        "job.wait",
        JobWaitParams,
        summary="Wait until a job is terminal or the timeout passes",
        result="job record",
        errors=[ErrorCode.JOB_NOT_FOUND, ErrorCode.WRONG_MODE],
    )
    async def job_wait(p: JobWaitParams) -> dict[str, Any]:
        node.ctx.db.get(p.job_id)
        return (await requester().wait(p.job_id, p.timeout)).public()

    @registry.method(
        "job.list",
        JobListParams,
        summary="Jobs on this node, newest first",
        result="{jobs: [job record]}",
    )
    async def job_list(p: JobListParams) -> dict[str, Any]:
        return {"jobs": [r.public() for r in node.ctx.db.list_jobs(p.status, p.limit)]}

    @registry.method(
        "job.events",
        JobIdParams,
        summary="A job's event log",
        result="{job_id, events: [...]}",
        errors=[ErrorCode.JOB_NOT_FOUND],
    )
    async def job_events(p: JobIdParams) -> dict[str, Any]:
        return {"job_id": p.job_id, "events": node.ctx.db.events(p.job_id)}

    @registry.method(
        "job.bids",
        JobIdParams,
        summary="Bids and refusals a job received",
        result="{job_id, bids: [...]}",
        errors=[ErrorCode.JOB_NOT_FOUND],
    )
    async def job_bids(p: JobIdParams) -> dict[str, Any]:
        node.ctx.db.get(p.job_id)
        return {"job_id": p.job_id, "bids": node.ctx.db.bids(p.job_id)}

    @registry.method(
        "rpc.discover",
        NoParams,
        summary="This API as an OpenRPC document",
        result="OpenRPC document",
    )
    async def rpc_discover(_: NoParams) -> dict[str, Any]:
        return dict(registry.openrpc())

    return registry

"""The node's JSON-RPC methods: the one door users, the CLI and the SDK share."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from node.api.methods.earnings import register_earnings_methods
from node.api.methods.jobs import parse_cid, register_job_methods
from node.api.methods.served import ServedNode
from node.api.methods.share import register_share_methods
from node.api.methods.storage import register_storage_methods, too_large
from node.api.rpc import NoParams, Registry
from node.api.share import Shares
from protocol.errors import ErrorCode, MeshrunError
from storage.errors import BlockNotFound, ContentTooLarge, PathNotFound, StorageError


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeersParams(_Params):
    limit: int = Field(default=100, ge=0, le=10_000, description="most peer records to list")
    role: Literal["executor", "requester"] | None = Field(
        default=None, description="only records of peers in this role"
    )


class StorageAddParams(_Params):
    data_b64: str = Field(description="the bytes to store, base64")


class StorageGetParams(_Params):
    cid: str
    path: str | None = Field(default=None, description="a file inside a directory CID")


class StorageTreeParams(_Params):
    cid: str


def build_registry(node: ServedNode, shares: Shares | None = None) -> Registry:
    """Every method of `node`; `shares` is the gateway's, so a revocation is seen there."""
    registry = Registry(title="meshrun node")

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
        PeersParams,
        summary="Peers this node is connected to, and what it knows of each peer's past",
        result="{peers: [peer_id], topic_peers: [peer_id], known: int, reputation: "
        "[{peer, role, score, why, excluded_until, audits_passed, counts: {outcome: n}, "
        "latency, last_seen}]}",
    )
    async def node_peers(p: PeersParams) -> dict[str, Any]:
        return node.peers(limit=p.limit, role=p.role)

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
        cid = await node.ctx.content.add_bytes(data)  # stored, pinned, announced
        return {"cid": str(cid), "size": len(data)}

    @registry.method(
        "storage.get",
        StorageGetParams,
        summary="Read a file by CID (and path)",
        result="{cid, data_b64, size}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.CONTENT_TOO_LARGE],
    )
    async def storage_get(p: StorageGetParams) -> dict[str, Any]:
        root = parse_cid(p.cid)
        store = node.ctx.store
        limit = node.ctx.content.limit()
        try:
            target = store.resolve_path(root, p.path) if p.path else root
            data = await trio.to_thread.run_sync(lambda: store.cat(target, max_bytes=limit))
        except (BlockNotFound, PathNotFound) as exc:
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, str(exc), {"cid": p.cid}) from None
        except ContentTooLarge as exc:
            raise too_large(p.cid, exc, limit) from None
        except StorageError as exc:
            raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": p.cid}) from None
        return {"cid": str(target), "size": len(data), "data_b64": base64.b64encode(data).decode()}

    @registry.method(
        "storage.tree",
        StorageTreeParams,
        summary="Every file under a directory CID",
        result="{cid, files: {path: b64}}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.CONTENT_TOO_LARGE],
    )
    async def storage_tree(p: StorageTreeParams) -> dict[str, Any]:
        root = parse_cid(p.cid)
        store = node.ctx.store
        limit = node.ctx.content.limit()
        try:
            files = await trio.to_thread.run_sync(lambda: store.read_tree(root, max_bytes=limit))
        except BlockNotFound as exc:
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, str(exc), {"cid": p.cid}) from None
        except ContentTooLarge as exc:
            raise too_large(p.cid, exc, limit) from None
        except StorageError as exc:
            raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": p.cid}) from None
        return {
            "cid": p.cid,
            "files": {k: base64.b64encode(v).decode() for k, v in sorted(files.items())},
        }

    register_job_methods(registry, node)
    register_storage_methods(registry, node)
    register_earnings_methods(registry, node)
    register_share_methods(registry, node, shares or Shares(node.ctx.identity, node.ctx.data_dir))

    @registry.method(
        "rpc.discover",
        NoParams,
        summary="This API as an OpenRPC document",
        result="OpenRPC document",
    )
    async def rpc_discover(_: NoParams) -> dict[str, Any]:
        return dict(registry.openrpc())

    return registry

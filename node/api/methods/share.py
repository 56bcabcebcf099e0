"""JSON-RPC methods for share links (node/api/share.py): create one, revoke one.

Only the node's owner (the token holder) can mint a link: a share is a
capability signed with the node's key, so whoever may call these may hand out
read access to the node's content, and nobody else may.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from node.api.methods.jobs import parse_cid
from node.api.rpc import Registry
from node.api.share import MAX_SHARE_SECONDS, SHARE_PARAM, Shares
from protocol.errors import ErrorCode, MeshrunError

if TYPE_CHECKING:
    from node.api.methods.served import ServedNode

DEFAULT_SHARE_SECONDS = 7 * 86400


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShareCreateParams(_Params):
    target: str = Field(
        min_length=1, max_length=256, description="a job id (shares its result CID) or a CID"
    )
    path: str = Field(default="", max_length=1024, description="only this path under the CID")
    expires_in: int = Field(
        default=DEFAULT_SHARE_SECONDS, gt=0, le=MAX_SHARE_SECONDS, description="seconds"
    )


class ShareRevokeParams(_Params):
    share: str = Field(min_length=1, max_length=4096, description="the link, its token or its id")


def share_url(node: ServedNode, cid: str, path: str, token: str) -> str:
    base = str(node.info().get("rpc_url") or "").removesuffix("/rpc")
    tail = f"/{path}" if path else "/"
    return f"{base}/ipfs/{cid}{tail}?{SHARE_PARAM}={token}"


def resolve_target(node: ServedNode, target: str) -> tuple[str, str | None]:
    """(CID, job id): a job id resolves to its result; anything else must be a CID."""
    record = node.ctx.db.find(target)
    if record is not None:
        if not record.result_cid:
            raise MeshrunError(
                ErrorCode.JOB_NOT_FINISHED,
                f"job {target} is {record.status.value} and has no result to share yet",
                {"job_id": target, "status": record.status.value},
            )
        return record.result_cid, target
    return str(parse_cid(target)), None


def register_share_methods(registry: Registry, node: ServedNode, shares: Shares) -> None:
    @registry.method(
        "share.create", ShareCreateParams,
        summary="A link that opens a job's result (or a CID) in a browser, with no token",
        result="{url, token, id, cid, path, job_id, expires_at}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.JOB_NOT_FINISHED, ErrorCode.INVALID_PARAMS],
    )  # fmt: skip
    async def share_create(p: ShareCreateParams) -> dict[str, Any]:
        cid, job_id = resolve_target(node, p.target)
        share, token = shares.issue(cid, p.path, p.expires_in)
        return {
            "url": share_url(node, cid, share.path, token),
            "token": token,
            "id": share.id,
            "cid": cid,
            "path": share.path,
            "job_id": job_id,
            "expires_at": share.expires_at,
        }

    @registry.method(
        "share.revoke", ShareRevokeParams,
        summary="Make a share link stop working before it expires",
        result="{id, revoked, already, until}",
        errors=[ErrorCode.INVALID_PARAMS],
    )  # fmt: skip
    async def share_revoke(p: ShareRevokeParams) -> dict[str, Any]:
        return shares.revoke(p.share)

"""JSON-RPC methods for what a compute node earned: totals and a verifiable export.

The export is paged (a cursor per page) so a long ledger never becomes one
response; every line carries the requester's signed settlement, so whoever
holds the file can check it offline (`meshrun client earnings verify`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.api.rpc import Registry
from protocol.errors import ErrorCode

if TYPE_CHECKING:
    from node.api.methods.served import ServedNode

MAX_EXPORT_PAGE = 1000


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EarningsParams(_Params):
    since: float | None = Field(default=None, description="settled at or after (epoch seconds)")
    until: float | None = Field(default=None, description="settled before (epoch seconds)")
    days: float | None = Field(default=None, gt=0, description="or: the last N days")

    @model_validator(mode="after")
    def _ordered(self) -> EarningsParams:
        if self.since is not None and self.until is not None and self.until < self.since:
            raise ValueError("until is before since")
        return self

    def window(self) -> tuple[float | None, float | None]:
        since = self.since
        if self.days is not None:
            since = max(since or 0.0, time.time() - self.days * 86400)
        return since, self.until


class EarningsExportParams(EarningsParams):
    cursor: int = Field(default=0, ge=0, description="next_cursor of the previous page")
    limit: int = Field(default=500, ge=1, le=MAX_EXPORT_PAGE)


def register_earnings_methods(registry: Registry, node: ServedNode) -> None:
    ledger = node.ctx.ledger

    @registry.method(
        "node.earnings", EarningsParams,
        summary="Settled earnings by day and by requester, and jobs not settled yet",
        result="{total, settled_jobs, disputed_jobs, by_day: [{day, amount, jobs}], "
        "by_requester: [{requester, amount, jobs}], unsettled: [{job_id, requester, price, "
        "completed_at}] (the newest 1000), unsettled_jobs, unsettled_amount}",
        errors=[ErrorCode.INVALID_PARAMS],
    )  # fmt: skip
    async def node_earnings(p: EarningsParams) -> dict[str, Any]:
        since, until = p.window()
        return {"peer_id": node.ctx.peer_id, **ledger.earnings(since, until)}

    @registry.method(
        "node.earnings_export", EarningsExportParams,
        summary="Received settlements as lines a requester's public key verifies offline",
        result="{lines: [{v, job_id, requester, provider, receipt_cid, result_cid, price, "
        "policy, outcome, settled_at, requester_public_key_b64, envelope_b64}], count, "
        "next_cursor}",
        errors=[ErrorCode.INVALID_PARAMS],
    )  # fmt: skip
    async def node_earnings_export(p: EarningsExportParams) -> dict[str, Any]:
        since, until = p.window()
        page = list(ledger.export(since, until, after=p.cursor, limit=p.limit + 1))
        lines = [line for _, line in page[: p.limit]]
        more = len(page) > p.limit
        return {
            "lines": lines,
            "count": len(lines),
            "next_cursor": page[p.limit - 1][0] if more else None,
        }

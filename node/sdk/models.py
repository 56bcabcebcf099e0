"""Typed results of the node's JSON-RPC methods, one model per result shape.

Every model tolerates what a newer node adds (extra="allow": unknown fields are
kept and readable), and all but the identifying fields have defaults, so an
older node's smaller reply still validates.
"""

from __future__ import annotations

import base64
from collections.abc import ItemsView, KeysView, ValuesView
from typing import Any

from pydantic import BaseModel, ConfigDict

from protocol.jobstate import JobStatus


class ApiModel(BaseModel):
    """Base of every result the SDK returns.

    New code reads typed attributes: `job.status` (a `JobStatus`), `job.error.code`.

    The mapping methods (`job["status"]`, `job.get("error")`, `"receipt" in job`,
    `keys()`, `items()`, `values()`, `dict(job)`, `{**job}`) are kept for scripts
    written against the dict-returning SDK. They show exactly the JSON the node
    sent: plain strings, numbers, lists and dicts, and only the keys the node sent,
    so such a script sees what it saw before. `to_dict()` is that JSON as a dict
    (for `json.dumps`). Iterating a model is pydantic's (name, value) pairs, not keys.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON values, with only the keys the node sent."""
        return self.model_dump(mode="json", exclude_unset=True)

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return self.model_dump(mode="json", exclude_unset=True, include={key})[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.model_fields_set

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> KeysView[str]:
        return self.to_dict().keys()

    def items(self) -> ItemsView[str, Any]:
        return self.to_dict().items()

    def values(self) -> ValuesView[Any]:
        return self.to_dict().values()


# ---------------------------------------------------------------------------- node


class NodeInfo(ApiModel):
    """`node.info`: who the node is and how it is connected."""

    peer_id: str
    mode: str | None = None
    version: str | None = None
    listen_addrs: list[str] = []
    rpc_url: str | None = None
    data_dir: str | None = None
    connected_peers: int = 0
    topic_peers: int = 0
    execution_providers: list[str] = []
    price: float | None = None
    device: dict[str, Any] = {}
    uptime_seconds: float | None = None
    # Compute nodes: {"slots", "busy", "queued", "max_queue", "devices": [{slot, kind,
    # device_id, job}]}; None on a requester.
    capacity: dict[str, Any] | None = None


class PeerStanding(ApiModel):
    """What the node knows of one peer in one role (executor or requester).

    `score` in [0, 1] (0.5: a stranger) weighs its bids; `why` says it in words;
    while `excluded_until` is set, its bids are not taken. `counts` are every
    outcome seen: won, completed, verified, disputed, failed, timed_out, lost
    for executors; accepted, settled, disputed for requesters.
    """

    peer: str
    role: str = "executor"
    score: float = 0.5
    why: str = ""
    excluded_until: float | None = None
    audits_passed: int = 0
    counts: dict[str, int] = {}
    latency: float | None = None
    last_seen: float | None = None


class Peers(ApiModel):
    """`node.peers`: peer IDs connected, those on the job topic, and the reputation
    records (`known` in all, the most recently seen first)."""

    peers: list[str] = []
    topic_peers: list[str] = []
    known: int = 0
    reputation: list[PeerStanding] = []


class ApiDocument(ApiModel):
    """`rpc.discover`: the node's API as an OpenRPC document."""

    openrpc: str
    info: dict[str, Any] = {}
    methods: list[dict[str, Any]] = []
    components: dict[str, Any] = {}


# ---------------------------------------------------------------------------- jobs


class JobError(ApiModel):
    """Why a job failed: a code from protocol/errors.py (a plain string, so a code
    a newer node introduces still reads), a message, details, and whether a retry
    may succeed."""

    code: str
    message: str = ""
    details: dict[str, Any] = {}
    retryable: bool = False


class Receipt(ApiModel):
    """The executor's signed statement of what it ran and what came out."""

    job_id: str | None = None
    spec_cid: str | None = None
    model_cid: str | None = None
    inputs_cid: str | None = None
    result_cid: str | None = None
    provider: str | None = None
    execution_provider: str | None = None
    device: str | None = None
    output_digests: dict[str, str] = {}
    timings_ms: dict[str, float] = {}
    resources: dict[str, float] = {}
    started_at: float | None = None
    finished_at: float | None = None


class VerificationExecutor(ApiModel):
    """One executor of a job as its verification policy saw it."""

    peer: str | None = None
    attempt: int | None = None
    result_cid: str | None = None
    receipt_envelope_b64: str | None = None
    # running, accepted, verified (agreed), unaudited, disputed, lost, failed, timed_out…
    outcome: str | None = None


class Verification(ApiModel):
    """How the job's result was checked (`job.get`'s `verification`): the policy,
    its decision, and each executor's part in it."""

    policy: str | None = None
    tolerance: dict[str, Any] = {}
    # pending, accepted, agreed, mismatch or unaudited
    decision: str | None = None
    audited: bool | None = None
    # Agreeing answers that settle the job.
    quorum: int | None = None
    executors: list[VerificationExecutor] = []
    agreed: list[str] = []
    disputed: list[str] = []
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None


class Job(ApiModel):
    """A job record (`job.submit`, `job.get`, `job.wait`, `job.cancel`, and in lists)."""

    job_id: str
    status: JobStatus
    substate: str | None = None
    progress: float = 0.0
    priority: str = "normal"
    estimated_completion: float | None = None
    executor: str | None = None
    price: float | None = None
    result_cid: str | None = None
    receipt: Receipt | None = None
    receipt_envelope_b64: str | None = None
    error: JobError | None = None
    retry_count: int = 0
    # None until the job's verification policy has something to say.
    verification: Verification | None = None
    # The signed spec; its CID is the job id (what offline verification starts from).
    spec_envelope_b64: str | None = None
    model_cid: str | None = None
    inputs_cid: str | None = None
    requester: str | None = None
    timeout_seconds: float | None = None
    max_price: float | None = None
    created_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    updated_at: float | None = None
    # Only in job.submit's result: what the job will likely cost and take.
    estimated_cost: float | None = None
    estimated_time_seconds: float | None = None
    # Only with job.get's `include`:
    logs: dict[str, str] | None = None
    metrics: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (completed, failed, timeout or canceled)."""
        return self.status.terminal


class JobBatch(ApiModel):
    """`job.get_batch`: the records found, and the IDs that were not."""

    jobs: list[Job] = []
    missing: list[str] = []


class JobPage(ApiModel):
    """`job.list`: one page of jobs, newest first; pass `next_cursor` for the next."""

    jobs: list[Job] = []
    total: int = 0
    has_more: bool = False
    next_cursor: str | None = None


class Event(ApiModel):
    """One entry of a job's event log (`job.events`), or of its live status stream.

    Stream events also carry the job's `status`, `substate` and `progress` after
    the event; the stream's first event is a `Snapshot` with the record in
    `data["job"]`. Events replayed after a reconnect have no status.
    """

    job_id: str | None = None
    seq: int = 0
    at: float | None = None
    type: str
    peer: str | None = None
    data: dict[str, Any] = {}
    status: JobStatus | None = None
    substate: str | None = None
    progress: float | None = None

    @property
    def terminal(self) -> bool:
        """Whether this event ends the job (its status is terminal)."""
        return self.status is not None and self.status.terminal


class EventLog(ApiModel):
    """`job.events`: a job's logged events, in order."""

    job_id: str
    events: list[Event] = []


class Bid(ApiModel):
    """A bid (`kind="bid"`: price, ETA, device) or a reasoned refusal (`"nobid"`)."""

    provider: str
    kind: str
    job_id: str | None = None
    price: float | None = None
    eta_seconds: float | None = None
    execution_providers: list[str] = []
    device: str | None = None
    created_at: float | None = None
    reason: str | None = None
    message: str | None = None


class Bids(ApiModel):
    """`job.bids`: every bid and refusal a job received."""

    job_id: str
    bids: list[Bid] = []


class ResultFile(ApiModel):
    path: str
    size: int
    sha256: str


class Results(ApiModel):
    """`job.results`: the files of a finished job's result package."""

    job_id: str
    result_cid: str
    files: list[ResultFile] = []


class JobExport(ApiModel):
    """`job.export`: job records (format json) or a CSV text (format csv)."""

    format: str
    count: int = 0
    content: list[Job] | str = []


class Stats(ApiModel):
    """`job.stats`: totals of this node's submitted jobs."""

    total: int = 0
    by_status: dict[str, int] = {}
    success_rate: float | None = None
    average_completion_seconds: float | None = None
    total_spent: float = 0.0


class EarningsDay(ApiModel):
    """Settled earnings of one UTC day."""

    day: str
    amount: float = 0.0
    jobs: int = 0


class EarningsByRequester(ApiModel):
    """Settled earnings from one requester."""

    requester: str
    amount: float = 0.0
    jobs: int = 0


class UnsettledJob(ApiModel):
    """A job this compute node completed that no settlement names yet."""

    job_id: str
    requester: str | None = None
    price: float | None = None
    completed_at: float | None = None


class Earnings(ApiModel):
    """`node.earnings`: what a compute node was paid, signed by its requesters."""

    peer_id: str | None = None
    total: float = 0.0
    settled_jobs: int = 0
    disputed_jobs: int = 0
    by_day: list[EarningsDay] = []
    by_requester: list[EarningsByRequester] = []
    # The newest unsettled jobs are listed; the count and amount cover all of them.
    unsettled: list[UnsettledJob] = []
    unsettled_jobs: int = 0
    unsettled_amount: float = 0.0


class EarningsExport(ApiModel):
    """`node.earnings_export`: one page of export lines (each verifiable offline)."""

    lines: list[dict[str, Any]] = []
    count: int = 0
    next_cursor: int | None = None


class Share(ApiModel):
    """`share.create`: a link that opens a result in a browser with no token, until it expires."""

    url: str
    token: str
    id: str
    cid: str
    path: str = ""
    job_id: str | None = None
    expires_at: float


class Revoked(ApiModel):
    """`share.revoke`: the link stops working (`already`: it had been revoked before)."""

    id: str
    revoked: bool
    already: bool = False
    until: float | None = None


class LoginLink(ApiModel):
    """`explorer.login_link`: a one-time URL that logs a browser into the node's explorer."""

    url: str
    expires_at: float


class Deleted(ApiModel):
    """`job.delete`: the job is gone, with the result blocks only it kept."""

    job_id: str
    deleted: bool
    result_cid: str | None = None
    blocks_removed: int = 0


class CatalogModel(ApiModel):
    """A named model in the node's catalog (`model.add`, `model.list`)."""

    name: str
    cid: str
    added_at: float | None = None


class ModelCatalog(ApiModel):
    """`model.list`."""

    models: list[CatalogModel] = []


# ---------------------------------------------------------------------------- storage


def _decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class StorageAdd(ApiModel):
    """`storage.add`: the CID the bytes are stored under."""

    cid: str
    size: int | None = None


class StorageFile(ApiModel):
    """`storage.get`: a file's bytes (base64 on the wire; `.data` decodes them)."""

    cid: str
    data_b64: str
    size: int | None = None

    @property
    def data(self) -> bytes:
        return _decode(self.data_b64)


class StorageTree(ApiModel):
    """`storage.tree`: every file under a directory CID, base64 by path."""

    cid: str
    files: dict[str, str] = {}

    def contents(self) -> dict[str, bytes]:
        """The files' bytes by path."""
        return {path: _decode(b64) for path, b64 in self.files.items()}


class Fetched(ApiModel):
    """`storage.fetch`: where a CID came from (local, mesh or ipfs) and what it took."""

    cid: str
    source: str
    provider: str | None = None
    blocks: int | None = None
    seconds: float | None = None
    bytes: int | None = None


class ProviderRecord(ApiModel):
    peer_id: str
    addrs: list[str] = []
    seen_at: float | None = None


class Providers(ApiModel):
    """`storage.providers`: peers that announced they provide a CID."""

    cid: str
    providers: list[ProviderRecord] = []


class CarExport(ApiModel):
    """`storage.export_car`: the DAG under a CID as a CARv1 file (`.car` decodes it)."""

    cid: str
    car_b64: str
    size: int | None = None
    blocks: int | None = None

    @property
    def car(self) -> bytes:
        return _decode(self.car_b64)


class CarImport(ApiModel):
    """`storage.import_car`: the CAR's roots, and whether each DAG is now complete."""

    roots: list[str] = []
    blocks: int = 0
    complete: dict[str, bool] = {}
    bytes: int = 0


class Pinned(ApiModel):
    """`storage.pin`."""

    cid: str
    label: str
    expires: bool = False
    fetch: Fetched | None = None


class Unpinned(ApiModel):
    """`storage.unpin`: roots no pin keeps any more (collected at the next GC)."""

    unpinned: list[str] = []


class Pin(ApiModel):
    cid: str
    label: str
    created_at: float | None = None
    expires: bool = False


class Pins(ApiModel):
    """`storage.pins`."""

    pins: list[Pin] = []


class GcReport(ApiModel):
    """`storage.gc`: pins expired and blocks removed."""

    expired_pins: list[dict[str, Any]] = []
    retention_days: float | None = None
    marked_blocks: int = 0
    removed_blocks: int = 0
    freed_bytes: int = 0
    spared_young_blocks: int = 0
    seconds: float | None = None


class Published(ApiModel):
    """`storage.publish`: the DAG is on the IPFS daemon."""

    cid: str
    method: str | None = None
    seconds: float | None = None


class StorageStatus(ApiModel):
    """`storage.status`: blockstore size, pins, retention, IPFS daemon, providers."""

    blocks: int = 0
    pins: int = 0
    pinned_roots: int = 0
    retention_days: float | None = None
    gc_interval_seconds: float | None = None
    last_gc: dict[str, Any] | None = None
    ipfs: dict[str, Any] | None = None
    providers: dict[str, Any] = {}
    bytes: int = 0


__all__ = [
    "ApiDocument",
    "ApiModel",
    "Bid",
    "Bids",
    "CarExport",
    "CarImport",
    "CatalogModel",
    "Deleted",
    "Earnings",
    "EarningsByRequester",
    "EarningsDay",
    "EarningsExport",
    "Event",
    "EventLog",
    "Fetched",
    "GcReport",
    "Job",
    "JobBatch",
    "JobError",
    "JobExport",
    "JobPage",
    "LoginLink",
    "ModelCatalog",
    "NodeInfo",
    "PeerStanding",
    "Peers",
    "Pin",
    "Pinned",
    "Pins",
    "ProviderRecord",
    "Providers",
    "Published",
    "Receipt",
    "ResultFile",
    "Results",
    "Revoked",
    "Share",
    "Stats",
    "StorageAdd",
    "StorageFile",
    "StorageStatus",
    "StorageTree",
    "Unpinned",
    "UnsettledJob",
    "Verification",
    "VerificationExecutor",
]

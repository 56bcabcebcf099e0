"""Prometheus metrics of one node at `GET /metrics`, in the text exposition format.

Each node has a registry of its own, never prometheus-client's global one: tests
(and the in-process devnet) run several nodes in one process, and a shared
registry would sum their counters or refuse the second node's names.

Counters move where the events already are, so the roles need no metrics code:
the job database's event bus tells us every transition, bid and refusal (a
watcher task turns them into counters and histograms); `Content.fetch` and the
mesh's topic validators are wrapped once at start; gauges that mirror state
(jobs by status, peers, worker restarts) are read at scrape time from the
database and the mesh, so they can never drift from what the node reports.

The endpoint is behind the node's token like everything else (job counts and
peer ids describe what the owner does) unless the operator starts the node with
`--metrics-public`, for a Prometheus server that cannot hold a secret.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from node.jobs.bus import EventBus
from node.jobs.store import JobDB
from protocol.jobstate import JobStatus

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from trio_typing import TaskStatus

log = logging.getLogger("meshrun.metrics")

METRICS_PATH = "/metrics"
# Seconds: inference jobs run from milliseconds (a tiny MLP) to an hour.
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_FETCH_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Label values come from peers (a NoBid's reason): bounded in length and count so a
# peer cannot grow the registry without limit by inventing reasons.
_MAX_REASON = 48
_MAX_REASONS = 64
_SEEN_JOBS = 10_000


class NodeMetrics:
    """The registry of one node, its instruments, and what feeds them."""

    def __init__(
        self,
        db: JobDB,
        *,
        peers: Callable[[], int] = lambda: 0,
        worker_starts: Callable[[], Iterable[int]] = list,
        blocks_served: Callable[[], Mapping[str, int]] = dict,
        replies_sent: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> None:
        self.db = db
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.job_events = Counter(
            "meshrun_job_events", "Job events logged, by role and event type",
            ["role", "type"], registry=r,
        )  # fmt: skip
        self.jobs_finished = Counter(
            "meshrun_jobs_finished", "Jobs that reached a terminal status, by role and status",
            ["role", "status"], registry=r,
        )  # fmt: skip
        self.bids = Counter(
            "meshrun_bids",
            "Replies to this node's jobs: bid (accepted for the auction), nobid (refused by "
            "the provider, with its reason) and rejected (a bid this node turned down)",
            ["kind", "reason"], registry=r,
        )  # fmt: skip
        self.execution_seconds = Histogram(
            "meshrun_job_execution_seconds",
            "From running to terminal (compute: the execution; requester: until the "
            "verified result)",
            ["role", "status"], buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.fetch_seconds = Histogram(
            "meshrun_fetch_seconds", "Time to make a missing DAG local, by where it came from",
            ["source"], buckets=_FETCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.fetched_bytes = Counter(
            "meshrun_fetched_bytes", "Bytes fetched from other nodes or the IPFS daemon",
            ["source"], registry=r,
        )  # fmt: skip
        self.fetch_failures = Counter(
            "meshrun_fetch_failures", "Fetches that failed, by error code", ["code"], registry=r
        )
        self.served_bytes = Counter(
            "meshrun_served_bytes", "Bytes of content served, by door", ["via"], registry=r
        )
        self.gossip = Counter(
            "meshrun_gossip_messages", "Gossip messages this node's validators saw",
            ["topic", "outcome"], registry=r,
        )  # fmt: skip
        r.register(_StateCollector(db, peers, worker_starts))
        r.register(_TransferCollector(blocks_served, replies_sent))
        self._roles: OrderedDict[str, str] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._reasons: set[str] = set()

    # ------------------------------------------------------------------ feeding

    async def watch(
        self, bus: EventBus, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Turn job events into counters for as long as the node runs.

        Resubscribes when the bus drops us as slow: a missed event costs a count,
        never the node (the gauges from the database stay exact).
        """
        first = True
        while True:
            with bus.subscribe() as events:
                if first:
                    task_status.started()
                    first = False
                async for event in events:
                    try:
                        self.observe_event(event)
                    except Exception:  # a metrics bug must not stop the node
                        log.exception("metrics: cannot count event %r", event.get("type"))
            await trio.sleep(0.1)

    def observe_event(self, event: dict[str, Any]) -> None:
        job_id = str(event.get("job_id") or "")
        role = self._role(job_id)
        kind = str(event.get("type") or "")
        self.job_events.labels(role, kind).inc()
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        if kind == "BidReceived":
            self.bids.labels("bid", "").inc()
        elif kind == "NoBid":
            self.bids.labels("nobid", self._reason(data.get("reason"))).inc()
        elif kind == "BidRejected":
            why = str(data.get("reason") or "price")
            self.bids.labels(
                "rejected", "excluded" if why.startswith("excluded") else "price"
            ).inc()
        status = str(event.get("status") or "")
        if status in _TERMINAL and job_id not in self._finished:
            self._remember(self._finished, job_id, None)
            self.jobs_finished.labels(role, status).inc()
            record = self.db.find(job_id)
            if record is not None and record.completed_at is not None:
                start = record.started_at or record.created_at
                self.execution_seconds.labels(role, status).observe(
                    max(0.0, record.completed_at - start)
                )
            if role == "compute" and record is not None and record.receipt:
                # The compute role fetches a job's model and inputs itself (not through
                # Content.fetch); its own receipt says how long that took.
                timings = record.receipt.get("timings_ms") or {}
                fetch_ms = timings.get("fetch_ms") if isinstance(timings, dict) else None
                if isinstance(fetch_ms, int | float) and fetch_ms >= 0:
                    self.fetch_seconds.labels("job_inputs").observe(fetch_ms / 1000.0)

    def _role(self, job_id: str) -> str:
        role = self._roles.get(job_id)
        if role is None:
            record = self.db.find(job_id) if job_id else None
            role = record.role if record is not None else "unknown"
            self._remember(self._roles, job_id, role)
        return role

    def _reason(self, value: object) -> str:
        reason = "".join(ch for ch in str(value or "none")[:_MAX_REASON] if ch.isprintable())
        if reason not in self._reasons:
            if len(self._reasons) >= _MAX_REASONS:
                return "other"
            self._reasons.add(reason)
        return reason

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > _SEEN_JOBS:
            table.popitem(last=False)

    def instrument_fetch(self, content: Any) -> None:
        """Time every `content.fetch` and count its bytes (wrapped on the instance,
        so the content room needs no metrics code)."""
        inner: Callable[..., Awaitable[dict[str, Any]]] = content.fetch

        async def fetch(*args: Any, **kwargs: Any) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                result = await inner(*args, **kwargs)
            except Exception as exc:
                code = getattr(getattr(exc, "code", None), "value", type(exc).__name__)
                self.fetch_failures.labels(str(code)).inc()
                raise
            source = str(result.get("source") or "unknown")
            if source != "local":
                self.fetch_seconds.labels(source).observe(time.perf_counter() - started)
                self.fetched_bytes.labels(source).inc(int(result.get("bytes") or 0))
            return result

        content.fetch = fetch

    def instrument_gossip(self, mesh: Any) -> None:
        """Count what each topic validator accepts and rejects (wraps `mesh.subscribe`)."""
        inner = mesh.subscribe

        async def subscribe(topic: str, validator: Callable[[str, bytes, bytes], bool]) -> Any:
            accepted = self.gossip.labels(topic, "accepted")
            rejected = self.gossip.labels(topic, "rejected")

            def counted(forwarder: str, origin: bytes, data: bytes) -> bool:
                ok = validator(forwarder, origin, data)
                (accepted if ok else rejected).inc()
                return ok

            return await inner(topic, counted)

        mesh.subscribe = subscribe

    # ------------------------------------------------------------------ serving

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, _: Request) -> Response:
        # On the event loop: the collector reads the job database, whose SQLite
        # connection belongs to this thread; a scrape is a few small queries.
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


_TERMINAL = frozenset(status.value for status in JobStatus if status.terminal)


class _StateCollector(Collector):
    """Gauges read at scrape time: jobs by role and status, peers, worker restarts."""

    def __init__(
        self, db: JobDB, peers: Callable[[], int], worker_starts: Callable[[], Iterable[int]]
    ) -> None:
        self.db = db
        self.peers = peers
        self.worker_starts = worker_starts

    def describe(self) -> Iterator[Metric]:
        return iter(self._families({}, 0, []))

    def collect(self) -> Iterator[Metric]:
        rows = self.db.connection.execute(
            "SELECT role, status, COUNT(*) FROM jobs GROUP BY role, status"
        )
        counts = {(str(role), str(status)): int(n) for role, status, n in rows}
        return iter(self._families(counts, self.peers(), list(self.worker_starts())))

    @staticmethod
    def _families(
        counts: dict[tuple[str, str], int], peers: int, starts: list[int]
    ) -> list[Metric]:
        jobs = GaugeMetricFamily(
            "meshrun_jobs", "Jobs in this node's database, by role and status",
            labels=["role", "status"],
        )  # fmt: skip
        for (role, status), n in sorted(counts.items()):
            jobs.add_metric([role, status], n)
        connected = GaugeMetricFamily("meshrun_peers_connected", "Peers connected now")
        connected.add_metric([], peers)
        restarts = CounterMetricFamily(
            "meshrun_worker_restarts",
            "Executor worker processes started again after the first (a crash, a kill "
            "past a limit, a recycle)",
        )
        restarts.add_metric([], sum(max(0, n - 1) for n in starts))
        return [jobs, connected, restarts]


class _TransferCollector(Collector):
    """Counters the block servers and the compute role keep themselves, read at scrape time.

    Bytes served over the block exchange and bitswap (by door), and the bids and
    reasoned refusals a compute node sent (its own reasons: a fixed set).
    """

    def __init__(
        self,
        blocks_served: Callable[[], Mapping[str, int]],
        replies_sent: Callable[[], Mapping[tuple[str, str], int]],
    ) -> None:
        self.blocks_served = blocks_served
        self.replies_sent = replies_sent

    def describe(self) -> Iterator[Metric]:
        return iter(self._families({}, {}))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(dict(self.blocks_served()), dict(self.replies_sent())))

    @staticmethod
    def _families(served: dict[str, int], replies: dict[tuple[str, str], int]) -> list[Metric]:
        blocks = CounterMetricFamily(
            "meshrun_blocks_served_bytes",
            "Bytes of blocks served to peers, by protocol (exchange, bitswap)",
            labels=["via"],
        )
        for via, n in sorted(served.items()):
            blocks.add_metric([via], n)
        sent = CounterMetricFamily(
            "meshrun_bids_sent",
            "Bids and reasoned refusals this compute node sent, by kind and reason",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(replies.items()):
            sent.add_metric([kind, reason], n)
        return [blocks, sent]


def mount_metrics(app: Starlette, metrics: NodeMetrics) -> None:
    app.add_route(METRICS_PATH, metrics.endpoint, methods=["GET"])

"""The requester role: publish signed job specs, collect bids, accept one,
follow the run, verify the receipt and the result, keep the job record true.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError

from crypto.envelope import open_envelope, seal
from node.blocks import fetch_dag
from node.context import NodeContext, job_id_of, spec_cid_of
from node.jobdb import JobRecord
from node.mesh import Frames
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.market import bid_acceptable, rank_bids
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Receipt,
    Requirements,
)
from storage.blockstore import BaseBlockstore, MemoryBlockstore
from storage.cid import RAW, Cid
from storage.unixfs import decode_pbnode

log = logging.getLogger("meshrun.requester")

DEFAULT_BID_WINDOW = 2.0
# After the first acceptable bid, how long later bids may still compete: twice
# the widest bid_delay spread, so nodes that heard the job together all count.
BID_SETTLE = 0.1
SPEC_TTL = 120.0
MAX_RETRIES = 2
RECEIPT_GRACE = 15.0


CANCEL_GRACE = 5.0


class ExecutorLost(Exception):
    """The accepted executor went away (or failed retryably) before finishing."""


@dataclass
class JobRun:
    """What the requester holds for a job it is driving, so cancel can reach it."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    frames: Frames | None = None
    provider: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class BidCollector:
    spec: JobSpec
    expected: int
    bids: list[Bid] = field(default_factory=list)
    refusals: list[NoBid] = field(default_factory=list)
    enough: trio.Event = field(default_factory=trio.Event)
    first: trio.Event = field(default_factory=trio.Event)

    def note(self) -> None:
        if self.bids:
            self.first.set()
            if len(self.bids) + len(self.refusals) >= self.expected:
                self.enough.set()

    async def wait(self, settle: float) -> None:
        """Until every topic peer answered, or `settle` s after the first acceptable bid.

        Waiting for every peer made the slowest of N busy nodes set the pace
        (and a peer that never hears the job made it the whole window).
        """
        await self.first.wait()
        with trio.move_on_after(settle):
            await self.enough.wait()


class Requester:
    def __init__(self, ctx: NodeContext, bid_window: float = DEFAULT_BID_WINDOW) -> None:
        self.ctx = ctx
        self.bid_window = bid_window
        self._collectors: dict[str, BidCollector] = {}
        self._runs: dict[str, JobRun] = {}
        self._changed: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.ctx.mesh.handle(BID_PROTOCOL, self._on_bid_stream)
        self._recover()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _recover(self) -> None:
        """A restarted requester never leaves a job stuck: it ends each one it cannot follow."""
        for record in self.ctx.db.unfinished():
            if record.role != "requester":
                continue
            target = (
                JobStatus.CANCELED if record.status == JobStatus.CANCELING else JobStatus.FAILED
            )
            error = {
                "code": ErrorCode.EXECUTOR_LOST.value,
                "message": f"the requester node restarted while the job was {record.status.value}",
                "details": {},
                "retryable": True,
            }
            self.ctx.db.move(record.job_id, target, "Failed", self.ctx.peer_id, error, error=error)
            log.warning("job %s was %s at restart: marked failed", record.job_id, record.status)

    # ---- submission -------------------------------------------------------------

    async def submit(
        self,
        model_cid: str,
        inputs_cid: str,
        timeout_seconds: float,
        max_price: float | None = None,
        priority: str = "normal",
        requirements: dict[str, Any] | None = None,
        bid_window: float | None = None,
        params: dict[str, Any] | None = None,
        output_names: list[str] | None = None,
    ) -> JobRecord:
        store = self.ctx.store
        for name, cid_text in (("model", model_cid), ("inputs", inputs_cid)):
            try:
                cid = Cid.decode(cid_text)
            except ValueError as exc:
                raise MeshrunError(ErrorCode.INVALID_CID, f"{name} CID: {exc}") from exc
            if store.missing_blocks(cid):
                raise MeshrunError(
                    ErrorCode.CID_NOT_FOUND,
                    f"{name} {cid_text} is not in this node's blockstore; add it with storage.add",
                )
        now = time.time()
        try:
            spec = JobSpec(
                model_cid=model_cid,
                inputs_cid=inputs_cid,
                requester=self.ctx.peer_id,
                requester_addrs=self.ctx.mesh.listen_addrs(),
                nonce=os.urandom(16),
                created_at=now,
                expires_at=now + SPEC_TTL,
                timeout_seconds=float(timeout_seconds),
                max_price=None if max_price is None else float(max_price),
                priority=priority,  # type: ignore[arg-type]
                requirements=Requirements.model_validate(requirements or {}),
                model_bytes=dag_bytes(store, Cid.decode(model_cid)),
                inputs_bytes=dag_bytes(store, Cid.decode(inputs_cid)),
                params=params or {},
                output_names=output_names or [],
            )
        except ValueError as exc:
            raise MeshrunError(ErrorCode.INVALID_SPEC, str(exc)) from exc
        envelope = seal(self.ctx.identity, spec)
        job_id = job_id_of(envelope)
        record = self.ctx.db.create(
            job_id, "requester", spec.to_wire(), envelope, self.ctx.peer_id, self.ctx.peer_id
        )
        assert self._nursery is not None, "requester not started"
        window = self.bid_window if bid_window is None else bid_window
        self._runs[job_id] = JobRun()
        self._nursery.start_soon(self._drive, job_id, spec, envelope, window)
        return record

    def estimates(self, max_price: float | None, bid_window: float | None) -> dict[str, Any]:
        """What a submit will likely cost and take, from this node's own recent history."""
        window = self.bid_window if bid_window is None else bid_window
        history = self.ctx.db.recent_outcomes(50)
        prices = [h["price"] for h in history if h["price"] is not None]
        durations = [h["duration"] for h in history if h["duration"] is not None]
        cost = sum(prices) / len(prices) if prices else max_price
        if cost is not None and max_price is not None:
            cost = min(cost, max_price)
        typical = sorted(durations)[len(durations) // 2] if durations else window + 1.0
        return {"estimated_cost": cost, "estimated_time_seconds": round(typical, 3)}

    # ---- cancel -----------------------------------------------------------------

    async def cancel(self, job_id: str, reason: str = "canceled by the user") -> JobRecord:
        """Stop a job wherever it is; an executor that is running it is told to stop."""
        record = self.ctx.db.get(job_id)
        if record.status.terminal:
            raise MeshrunError(
                ErrorCode.ILLEGAL_TRANSITION,
                f"job {job_id} already ended ({record.status.value}); nothing to cancel",
                {"status": record.status.value},
            )
        if record.status != JobStatus.CANCELING:
            self._move(
                job_id,
                JobStatus.CANCELING,
                "CancelRequested",
                peer=self.ctx.peer_id,
                data={"reason": reason},
            )
        run = self._runs.get(job_id)
        if run is None:
            return self._move(job_id, JobStatus.CANCELED, "Canceled", data={"reason": reason})
        if run.frames is not None:
            cancel = Cancel(job_id=job_id, requester=self.ctx.peer_id, reason=reason)
            try:
                with trio.fail_after(CANCEL_GRACE):
                    await run.frames.write(seal(self.ctx.identity, cancel))
            except (BaseLibp2pError, trio.TooSlowError, OSError):
                log.info("job %s: executor unreachable for cancel", job_id)
        with trio.move_on_after(CANCEL_GRACE):
            await run.done.wait()
        run.scope.cancel()
        with trio.move_on_after(CANCEL_GRACE):
            await run.done.wait()
        record = self.ctx.db.get(job_id)
        if not record.status.terminal:
            record = self._move(job_id, JobStatus.CANCELED, "Canceled", data={"reason": reason})
        return record

    # ---- events for waiters -----------------------------------------------------

    def _touch(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _move(self, job_id: str, status: JobStatus, event: str, **kw: Any) -> JobRecord:
        record = self.ctx.db.move(job_id, status, event, **kw)
        self._touch(job_id)
        return record

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        with trio.move_on_after(timeout):
            while True:
                record = self.ctx.db.get(job_id)
                if record.status.terminal:
                    return record
                event = self._changed.setdefault(job_id, trio.Event())
                await event.wait()
        return self.ctx.db.get(job_id)

    # ---- the job's life ---------------------------------------------------------

    async def _drive(self, job_id: str, spec: JobSpec, envelope: bytes, window: float) -> None:
        run = self._runs.setdefault(job_id, JobRun())
        try:
            with run.scope, trio.fail_after(spec.timeout_seconds + window + RECEIPT_GRACE):
                await self._drive_inner(job_id, spec, envelope, window)
            if run.scope.cancelled_caught:
                self._finish_cancel(job_id, {"reason": "canceled before the executor answered"})
        except trio.TooSlowError:
            self._fail(
                job_id,
                ErrorCode.TIMEOUT,
                "the job did not finish in time",
                status=JobStatus.TIMEOUT,
            )
        except MeshrunError as exc:
            self._fail(job_id, exc.code, exc.message, exc.details)
        except Exception as exc:
            log.exception("job %s crashed the requester's driver", job_id)
            self._fail(job_id, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self._collectors.pop(job_id, None)
            self._runs.pop(job_id, None)
            run.done.set()

    def _finish_cancel(self, job_id: str, data: dict[str, Any]) -> None:
        record = self.ctx.db.find(job_id)
        if record is None or record.status.terminal:
            return
        if record.status != JobStatus.CANCELING:
            self._move(job_id, JobStatus.CANCELING, "CancelRequested", data=data)
        self._move(job_id, JobStatus.CANCELED, "Canceled", peer=record.executor, data=data)

    def _fail(
        self,
        job_id: str,
        code: ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
        status: JobStatus = JobStatus.FAILED,
        retryable: bool = False,
    ) -> None:
        record = self.ctx.db.find(job_id)
        if record is None or record.status.terminal:
            return
        error = {
            "code": code.value,
            "message": message,
            "details": details or {},
            "retryable": retryable,
        }
        event = "TimedOut" if status == JobStatus.TIMEOUT else "Failed"
        self._move(job_id, status, event, peer=record.executor, data=error, error=error)
        log.info("job %s %s: %s", job_id, status.value, message)

    async def _drive_inner(
        self, job_id: str, spec: JobSpec, envelope: bytes, window: float
    ) -> None:
        expected = len(self.ctx.mesh.topic_peers(JOBS_TOPIC))
        collector = BidCollector(spec, expected)
        self._collectors[job_id] = collector
        self._move(job_id, JobStatus.BIDDING, "Published", data={"topic_peers": expected})
        await self.ctx.mesh.publish(JOBS_TOPIC, envelope)
        with trio.move_on_after(window):
            await collector.wait(BID_SETTLE)
        ranked = rank_bids(collector.bids)
        if not ranked:
            reasons = {r.provider: f"{r.reason}: {r.message}" for r in collector.refusals}
            raise MeshrunError(
                ErrorCode.NO_BIDS,
                f"no compute node bid within {window:.1f}s "
                f"({expected} peer(s) on {JOBS_TOPIC}, {len(reasons)} declined)",
                {"refusals": reasons},
            )
        for attempt, bid in enumerate(ranked[: 1 + MAX_RETRIES]):
            if self.ctx.db.get(job_id).status == JobStatus.CANCELING:
                self._finish_cancel(job_id, {"reason": "canceled while bidding"})
                return
            if attempt:
                self.ctx.db.update(job_id, retry_count=attempt)
                self._move(
                    job_id,
                    JobStatus.BIDDING,
                    "Retried",
                    peer=bid.provider,
                    data={"attempt": attempt},
                )
            self._move(
                job_id,
                JobStatus.ASSIGNED,
                "BidAccepted",
                peer=bid.provider,
                data={"price": bid.price, "eta_seconds": bid.eta_seconds},
                executor=bid.provider,
            )
            try:
                await self._run_on(job_id, spec, bid)
                return
            except ExecutorLost as exc:
                log.warning("job %s: executor %s lost (%s)", job_id, bid.provider, exc)
                self.ctx.db.add_event(job_id, "ExecutorLost", bid.provider, {"reason": str(exc)})
        raise MeshrunError(
            ErrorCode.EXECUTOR_LOST, f"every accepted executor was lost ({len(ranked)} bid(s))"
        )

    async def _run_on(self, job_id: str, spec: JobSpec, bid: Bid) -> None:
        accept = Accept(
            job_id=job_id,
            requester=self.ctx.peer_id,
            provider=bid.provider,
            price=bid.price,
            accepted_at=time.time(),
        )
        try:
            frames = await self.ctx.mesh.open(bid.provider, JOB_PROTOCOL)
        except Exception as exc:
            raise ExecutorLost(f"cannot open a job stream: {exc}") from exc
        run = self._runs.get(job_id)
        if run is not None:
            run.frames, run.provider = frames, bid.provider
        finished = False
        try:
            await frames.write(seal(self.ctx.identity, accept))
            while True:
                try:
                    data = await frames.read()
                except (BaseLibp2pError, EOFError) as exc:
                    raise ExecutorLost(f"stream ended: {type(exc).__name__}") from exc
                opened = open_envelope(data)
                message = opened.message
                if opened.signer != bid.provider or getattr(message, "job_id", None) != job_id:
                    raise MeshrunError(
                        ErrorCode.SIGNATURE_INVALID,
                        f"job stream carried a {message.KIND} from {opened.signer} "
                        "that is not for this job or not from its executor",
                    )
                if isinstance(message, Progress):
                    self._on_progress(job_id, message)
                elif isinstance(message, Failure) and message.code == ErrorCode.CANCELED.value:
                    finished = True
                    self._finish_cancel(
                        job_id, {"reason": message.message, "resources": message.resources}
                    )
                    return
                elif isinstance(message, Failure) and message.retryable:
                    finished = True
                    raise ExecutorLost(f"{message.code}: {message.message}")
                elif isinstance(message, Failure):
                    finished = True
                    partial = await self._keep_partial(job_id, message, spec.timeout_seconds)
                    self._fail(
                        job_id,
                        _code(message.code),
                        f"executor {message.provider[-8:]} reported: {message.message}",
                        {
                            "executor": message.provider,
                            "resources": message.resources,
                            **({"partial_result_cid": partial} if partial else {}),
                        },
                        status=(
                            JobStatus.TIMEOUT
                            if message.code == ErrorCode.TIMEOUT.value
                            else JobStatus.FAILED
                        ),
                        retryable=message.retryable,
                    )
                    return
                elif isinstance(message, Receipt):
                    finished = True
                    await self._on_receipt(job_id, spec, message, data)
                    return
        finally:
            if run is not None:
                run.frames = None
            with trio.CancelScope(shield=True):
                if not finished:
                    await self._tell_executor_to_stop(frames, job_id)
                await frames.close()

    async def _keep_partial(self, job_id: str, failure: Failure, timeout: float) -> str | None:
        """Fetch and pin what a failed run finished; losing it would waste the work done."""
        if not failure.partial_result_cid:
            return None
        try:
            root = Cid.decode(failure.partial_result_cid)
            await fetch_dag(
                self.ctx.mesh.bitswap, self.ctx.store, root, failure.provider, min(timeout, 60.0)
            )
            await self.ctx.content.keep(root, f"job:{job_id}")
        except (MeshrunError, ValueError) as exc:
            log.warning("job %s: could not keep its partial result: %s", job_id, exc)
            return None
        self.ctx.db.add_event(
            job_id, "PartialResultsKept", failure.provider, {"result_cid": str(root)}
        )
        return str(root)

    async def _tell_executor_to_stop(self, frames: Frames, job_id: str) -> None:
        """A timeout or cancel on our side must stop the run over there too."""
        cancel = Cancel(job_id=job_id, requester=self.ctx.peer_id, reason="requester stopped")
        with trio.move_on_after(1.0), contextlib.suppress(BaseLibp2pError, OSError):
            await frames.write(seal(self.ctx.identity, cancel))

    def _on_progress(self, job_id: str, message: Progress) -> None:
        record = self.ctx.db.get(job_id)
        if record.status == JobStatus.CANCELING:
            return
        if record.status == JobStatus.ASSIGNED:
            self._move(job_id, JobStatus.RUNNING, "ExecutionStarted", peer=message.provider)
        self.ctx.db.update(job_id, substate=message.substate, progress=message.progress)
        self.ctx.db.add_event(
            job_id,
            "Progress",
            message.provider,
            {"substate": message.substate, "progress": message.progress},
        )
        self._touch(job_id)

    async def _on_receipt(
        self, job_id: str, spec: JobSpec, receipt: Receipt, envelope: bytes
    ) -> None:
        if self.ctx.db.get(job_id).status == JobStatus.CANCELING:
            self._finish_cancel(job_id, {"reason": "canceled; the executor finished anyway"})
            return
        spec_opened = open_envelope(self.ctx.db.get(job_id).spec_envelope, JobSpec)
        mismatches = [
            name
            for name, want in (
                ("spec_cid", spec_cid_of(spec_opened)),
                ("model_cid", spec.model_cid),
                ("inputs_cid", spec.inputs_cid),
            )
            if getattr(receipt, name) != want
        ]
        if mismatches:
            raise MeshrunError(
                ErrorCode.VERIFICATION_MISMATCH,
                f"receipt disagrees with the job spec on {', '.join(mismatches)}",
            )
        if self.ctx.db.get(job_id).status == JobStatus.ASSIGNED:
            self._move(job_id, JobStatus.RUNNING, "ExecutionStarted", peer=receipt.provider)
        self.ctx.db.add_event(
            job_id, "ResultsPublished", receipt.provider, {"result_cid": receipt.result_cid}
        )
        root = Cid.decode(receipt.result_cid)
        stats = await fetch_dag(
            self.ctx.mesh, self.ctx.store, root, receipt.provider, spec.timeout_seconds
        )
        await trio.to_thread.run_sync(self._verify_result, root, receipt)
        await self.ctx.content.keep(root, f"job:{job_id}")  # pinned, announced, mirrored
        self.ctx.db.add_event(
            job_id,
            "ReceiptVerified",
            receipt.provider,
            {"result_cid": receipt.result_cid, "fetch": stats},
        )
        self._move(
            job_id,
            JobStatus.COMPLETED,
            "Completed",
            peer=receipt.provider,
            result_cid=receipt.result_cid,
            receipt=receipt.to_wire(),
            receipt_envelope=envelope,
            substate=None,
            progress=100.0,
        )

    def _verify_result(self, root: Cid, receipt: Receipt) -> None:
        """Re-derive the result CID from the fetched bytes and check every output digest."""
        files = self.ctx.store.read_tree(root)
        rebuilt = MemoryBlockstore().add_tree(files)
        if rebuilt != root:
            raise MeshrunError(
                ErrorCode.VERIFICATION_MISMATCH,
                f"result bytes re-hash to {rebuilt}, not the reported {root}",
            )
        for path, digest in receipt.output_digests.items():
            data = files.get(path)
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                raise MeshrunError(
                    ErrorCode.VERIFICATION_MISMATCH, f"{path} does not match the receipt's digest"
                )

    # ---- bids -------------------------------------------------------------------

    async def _on_bid_stream(self, frames: Frames) -> None:
        """Bids and refusals from one compute node, which keeps the stream for later jobs."""
        try:
            while True:
                try:
                    data = await frames.read()
                except (BaseLibp2pError, EOFError):
                    return
                self._on_bid(frames.remote_peer, data)
        finally:
            await frames.close()

    def _on_bid(self, remote: str, data: bytes) -> None:
        try:
            opened = open_envelope(data)
        except MeshrunError as exc:
            log.warning("dropping bad bid from %s: %s", remote, exc)
            return
        message = opened.message
        if not isinstance(message, (Bid, NoBid)):
            log.warning("dropping %s on the bid protocol from %s", message.KIND, opened.signer)
            return
        collector = self._collectors.get(message.job_id)
        if collector is None:
            log.debug("late or unknown bid for %s from %s", message.job_id, opened.signer)
            return
        if isinstance(message, NoBid):
            collector.refusals.append(message)
            self.ctx.db.add_bid(message.job_id, message.provider, "nobid", data, message.to_wire())
            self.ctx.db.add_event(
                message.job_id,
                "NoBid",
                message.provider,
                {"reason": message.reason, "message": message.message},
            )
        elif bid_acceptable(collector.spec, message, time.time()):
            collector.bids.append(message)
            self.ctx.db.add_bid(message.job_id, message.provider, "bid", data, message.to_wire())
            self.ctx.db.add_event(
                message.job_id,
                "BidReceived",
                message.provider,
                {"price": message.price, "eta_seconds": message.eta_seconds},
            )
        else:
            self.ctx.db.add_event(
                message.job_id,
                "BidRejected",
                message.provider,
                {"price": message.price, "max_price": collector.spec.max_price},
            )
        collector.note()


def _code(name: str) -> ErrorCode:
    try:
        return ErrorCode(name)
    except ValueError:
        return ErrorCode.EXECUTION_FAILED


def dag_bytes(store: BaseBlockstore, cid: Cid) -> int:
    """Bytes a fetcher will move for this DAG (Kubo's cumulative size)."""
    block = store.get(cid)
    if cid.codec == RAW:
        return len(block)
    return len(block) + sum(link.tsize for link in decode_pbnode(block).links)

"""The requester role: the I/O around each job's machine (protocol.lifecycle.RequesterJob).

This module decides nothing about a job. Per job it runs one driver task that
feeds the machine what happened (a bid, a frame from the executor, a lost
stream, a fetched result, time) and carries out what the machine answers
(record a move, publish, send an Accept, fetch a result). The tasks that read a
job stream or fetch a result belong to that job's nursery, which belongs to the
role's nursery, so nothing outlives the job or the node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError

from crypto.envelope import open_envelope, seal
from node.aio import inline_if_small
from node.content.blocks import fetch_dag
from node.jobs.store import JobRecord
from node.roles.context import NodeContext, job_id_of, spec_cid_of
from node.transport.frames import Frames
from protocol.compare import CompareError, compare_outputs, outputs_from_files
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import (
    AcceptNotDelivered,
    BadFrame,
    BidIn,
    CancelAsked,
    CloseStream,
    Compared,
    CompareResults,
    Crashed,
    Effect,
    ExecutorFrame,
    FetchPartial,
    FetchResult,
    KeepResult,
    LogEvent,
    Move,
    NoBidIn,
    Observe,
    PartialFetched,
    Publish,
    Record,
    Recovered,
    RequesterEvent,
    RequesterJob,
    ResultFetched,
    ResultUnavailable,
    SaveBid,
    SendAccept,
    SendCancel,
    SendResume,
    SetProgress,
    Settle,
    SetVerification,
    Start,
    StreamLost,
    Tick,
)
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    RESUME_PROTOCOL,
    Bid,
    Cancel,
    JobSpec,
    NoBid,
    Requirements,
    Tolerance,
)
from protocol.policy import RequesterPolicy
from storage.blockstore import BaseBlockstore
from storage.cid import Cid
from storage.digest import digest_tree
from storage.errors import StorageError

log = logging.getLogger("meshrun.requester")
_RANDOM = random.SystemRandom()

DEFAULT_BID_WINDOW = RequesterPolicy.bid_window
OPEN_TIMEOUT = 10.0
# How long the driver waits for one executor's Accept to leave before it goes on.
SEND_FIRST = 0.05
# How stale the submit-time cost and duration estimates may be, in seconds.
ESTIMATE_TTL = 1.0
# A result this small (its receipt's size) is re-hashed on the event loop: a
# worker thread's hand-off costs more than hashing a few KiB.
INLINE_RESULT_BYTES = 64 * 1024
# Events queued per job: a bid flood beyond this is dropped, not buffered.
INBOX = 512


@dataclass
class LiveJob:
    """A job this node is driving now: its machine, its inbox, its open stream."""

    machine: RequesterJob
    envelope: bytes
    send: trio.MemorySendChannel[RequesterEvent]
    receive: trio.MemoryReceiveChannel[RequesterEvent]
    done: trio.Event = field(default_factory=trio.Event)
    nursery: trio.Nursery | None = None
    # The open job stream of each live run (several under redundant or audited jobs).
    streams: dict[int, Frames] = field(default_factory=dict)
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)


class Requester:
    def __init__(
        self,
        ctx: NodeContext,
        bid_window: float = DEFAULT_BID_WINDOW,
        policy: RequesterPolicy | None = None,
        max_result_bytes: int = RequesterPolicy.max_result_bytes,
        default_verification: str = "receipt",
    ) -> None:
        self.ctx = ctx
        self.default_verification = default_verification
        self.policy = policy or RequesterPolicy(
            bid_window=bid_window, max_result_bytes=max_result_bytes
        )
        self.bid_window = self.policy.bid_window
        self._live: dict[str, LiveJob] = {}
        self._changed: dict[str, trio.Event] = {}
        self._history: tuple[float, list[dict[str, Any]]] | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.ctx.mesh.handle(BID_PROTOCOL, self._on_bid_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._recover()
            task_status.started()
            await trio.sleep_forever()

    def _machine(self, record: JobRecord) -> RequesterJob:
        opened = open_envelope(record.spec_envelope, JobSpec)
        spec = opened.message
        assert isinstance(spec, JobSpec)
        return RequesterJob(
            job_id=record.job_id,
            me=self.ctx.peer_id,
            spec=spec,
            spec_cid=spec_cid_of(opened),
            policy=self.policy,
            status=record.status,
            executor=record.executor,
        )

    def _recover(self) -> None:
        """A restarted requester picks up every unfinished job where it was.

        Each gets its driver again, fed first what the records hold
        (lifecycle.Recovered): a job that was bidding re-opens its bid window, one
        that was assigned or running asks its executor where it stands (a Resume),
        one that can do neither ends, saying why. Nothing is left stuck.
        """
        assert self._nursery is not None
        for record in self.ctx.db.unfinished():
            if record.role != "requester":
                continue
            machine = self._machine(record)
            send, receive = trio.open_memory_channel[RequesterEvent](INBOX)
            live = LiveJob(machine, record.spec_envelope, send, receive)
            self._live[record.job_id] = live
            event = self._recovered(record)
            self._nursery.start_soon(self._drive, record.job_id, live, event)
            log.warning("job %s was %s at restart: resuming it", record.job_id, record.status.value)

    def _recovered(self, record: JobRecord) -> Recovered:
        """What this node's records hold of a job it finds unfinished at restart."""
        bids: list[BidIn] = []
        for row in self.ctx.db.bid_envelopes(record.job_id):
            try:
                opened = open_envelope(row, Bid)
            except MeshrunError:
                continue
            bid = opened.message
            assert isinstance(bid, Bid)
            bids.append(BidIn(bid, row, self.ctx.reputation.standing(bid.provider)))
        tried: list[str] = []
        accepted_at: float | None = None
        price: float | None = None
        for event in self.ctx.db.events(record.job_id):
            data = event["data"]
            if event["type"] == LogEvent.EXECUTOR_LOST.value and event["peer"]:
                tried.append(str(event["peer"]))
            elif event["type"] == LogEvent.BID_ACCEPTED.value and event["peer"] == record.executor:
                at, paid = data.get("accepted_at"), data.get("price")
                accepted_at = float(at) if isinstance(at, (int, float)) else None
                price = float(paid) if isinstance(paid, (int, float)) else None
        return Recovered(
            topic_peers=self._topic_peers(),
            bids=tuple(bids),
            tried=tuple(tried),
            retries=record.retry_count,
            accepted_at=accepted_at,
            price=price,
        )

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
        verification: str | None = None,
        tolerance: dict[str, Any] | None = None,
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
                expires_at=now + self.policy.spec_ttl,
                timeout_seconds=float(timeout_seconds),
                max_price=None if max_price is None else float(max_price),
                priority=priority,  # type: ignore[arg-type]
                requirements=Requirements.model_validate(requirements or {}),
                verification=verification or self.default_verification,
                tolerance=Tolerance.model_validate(tolerance or {}),
                model_bytes=dag_bytes(store, Cid.decode(model_cid)),
                inputs_bytes=dag_bytes(store, Cid.decode(inputs_cid)),
                params=params or {},
                output_names=output_names or [],
            )
        except ValueError as exc:
            raise MeshrunError(ErrorCode.INVALID_SPEC, str(exc)) from exc
        envelope = seal(self.ctx.identity, spec)
        job_id = job_id_of(envelope)
        opened = open_envelope(envelope, JobSpec)
        machine = RequesterJob(
            job_id=job_id,
            me=self.ctx.peer_id,
            spec=spec,
            spec_cid=spec_cid_of(opened),
            policy=self.policy,
            window=self.bid_window if bid_window is None else bid_window,
            # Drawn here, where no executor can see it: an audited run and an
            # unaudited one look the same from the executor's side.
            audit_draw=_RANDOM.random(),
        )
        record = self.ctx.db.create(
            job_id, "requester", spec.to_wire(), envelope, self.ctx.peer_id, machine.create()
        )
        assert self._nursery is not None, "requester not started"
        send, receive = trio.open_memory_channel[RequesterEvent](INBOX)
        live = LiveJob(machine, envelope, send, receive)
        self._live[job_id] = live
        self._nursery.start_soon(self._drive, job_id, live, None)
        return record

    def estimates(self, max_price: float | None, bid_window: float | None) -> dict[str, Any]:
        """What a submit will likely cost and take, from this node's own recent history
        (read at most once per ESTIMATE_TTL: 64 submits at once ran its query 64 times)."""
        window = self.bid_window if bid_window is None else bid_window
        now = time.monotonic()
        if self._history is None or now - self._history[0] >= ESTIMATE_TTL:
            self._history = (now, self.ctx.db.recent_outcomes(50))
        history = self._history[1]
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
        live = self._live.get(job_id)
        if live is None:  # nothing drives it (it cannot be, but a record must never stick)
            machine = self._machine(record)
            for effect in machine.handle(CancelAsked(reason), time.time()):
                if isinstance(effect, Move):
                    self._apply(job_id, effect)
            return self.ctx.db.get(job_id)
        await live.send.send(CancelAsked(reason))
        with trio.move_on_after(self.policy.cancel_grace + 2.0):
            await live.done.wait()
        return self.ctx.db.get(job_id)

    # ---- waiters ----------------------------------------------------------------

    def _touch(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _apply(self, job_id: str, move: Move) -> JobRecord:
        record = self.ctx.db.apply(job_id, move)
        self._touch(job_id)
        if move.target.terminal:
            error = record.error or {}
            log.info("job %s %s %s", job_id, move.target.value, error.get("message", ""))
        return record

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        with trio.move_on_after(timeout):
            while True:
                live = self._live.get(job_id)
                # A job whose machine is still going cannot be terminal on disk: the
                # record is read when it may be, not at each of its progress writes.
                if live is None or live.machine.finished:
                    record = self.ctx.db.get(job_id)
                    if record.status.terminal:
                        return record
                event = self._changed.setdefault(job_id, trio.Event())
                await event.wait()
        return self.ctx.db.get(job_id)

    # ---- the driver ---------------------------------------------------------------

    def _topic_peers(self) -> int:
        return len(self.ctx.mesh.topic_peers(JOBS_TOPIC))

    async def _drive(self, job_id: str, live: LiveJob, first: RequesterEvent | None) -> None:
        """Drive one job from `first` (None: a new job's Start) to its end."""
        machine = live.machine
        try:
            async with trio.open_nursery() as nursery:
                live.nursery = nursery
                start = first if first is not None else Start(self._topic_peers())
                await self._carry(job_id, live, machine.handle(start, time.time()))
                while not machine.finished:
                    deadline = machine.next_deadline(time.time())
                    wait = math.inf if deadline is None else max(0.0, deadline - time.time())
                    event: RequesterEvent
                    with trio.move_on_after(wait) as idle:
                        event = await live.receive.receive()
                    if idle.cancelled_caught:
                        event = Tick(self._topic_peers())
                    await self._carry(job_id, live, machine.handle(event, time.time()))
                nursery.cancel_scope.cancel()
        except Exception as exc:
            log.exception("job %s crashed the requester's driver", job_id)
            with contextlib.suppress(Exception):
                crash = Crashed(f"{type(exc).__name__}: {exc}")
                for effect in machine.handle(crash, time.time()):
                    if isinstance(effect, Move):
                        self._apply(job_id, effect)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_streams(job_id, live, 0, None)
            self._live.pop(job_id, None)
            live.done.set()
            self._touch(job_id)

    async def _carry(self, job_id: str, live: LiveJob, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Move):
                self._apply(job_id, effect)
            elif isinstance(effect, Record):
                self.ctx.db.add_event(job_id, effect.log, effect.peer, dict(effect.data))
                self._touch(job_id)
            elif isinstance(effect, SetProgress):
                self.ctx.db.set_progress(job_id, effect.substate, effect.progress)
                self._touch(job_id)
            elif isinstance(effect, SaveBid):
                self.ctx.db.add_bid(
                    job_id, effect.provider, effect.kind, effect.envelope, dict(effect.body)
                )
            elif isinstance(effect, Publish):
                await self.ctx.mesh.publish(JOBS_TOPIC, live.envelope)
            elif isinstance(effect, (SendAccept, SendResume)):
                assert live.nursery is not None
                sent: trio.Event = await live.nursery.start(self._follow, job_id, live, effect)
                # Each executor's Accept leaves before the next one's bookkeeping (a
                # `redundant:K` job writes rows for every executor it accepts), but
                # a peer slow to open a stream holds the others up no longer than this.
                with trio.move_on_after(SEND_FIRST):
                    await sent.wait()
            elif isinstance(effect, CloseStream):
                await self._close_streams(job_id, live, effect.attempt, effect.cancel)
            elif isinstance(effect, SendCancel):
                for attempt, frames in list(live.streams.items()):
                    if effect.attempt in (0, attempt):
                        await self._write_cancel(
                            frames, job_id, effect.reason, self.policy.cancel_grace
                        )
            elif isinstance(effect, FetchResult):
                assert live.nursery is not None
                live.nursery.start_soon(self._fetch_result, job_id, live, effect)
            elif isinstance(effect, FetchPartial):
                assert live.nursery is not None
                live.nursery.start_soon(self._fetch_partial, job_id, live, effect)
            elif isinstance(effect, KeepResult):
                await self.ctx.content.keep(Cid.decode(effect.cid), f"job:{job_id}")
            elif isinstance(effect, CompareResults):
                assert live.nursery is not None
                live.nursery.start_soon(self._compare, live, effect)
            elif isinstance(effect, SetVerification):
                self.ctx.db.set_verification(job_id, dict(effect.summary))
                self._touch(job_id)
            elif isinstance(effect, Observe):
                self.ctx.reputation.observe(effect.peer, effect.outcome, latency=effect.latency)
            elif isinstance(effect, Settle):
                # Signed and kept durably here; delivery retries on its own.
                await self.ctx.settlements.settle(job_id, effect)
            else:  # pragma: no cover - a new effect type without a driver is a bug
                raise TypeError(f"the requester cannot carry out {effect!r}")

    # ---- the job stream of one attempt ------------------------------------------

    async def _follow(
        self,
        job_id: str,
        live: LiveJob,
        effect: SendAccept | SendResume,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open a job stream to the accepted bidder, send the Accept (or, after a
        restart, a resume stream and the Resume), report every frame."""
        attempt = effect.attempt
        sent = trio.Event()
        with trio.CancelScope() as scope:
            live.scopes[attempt] = scope
            task_status.started(sent)
            try:
                if isinstance(effect, SendAccept):
                    with trio.fail_after(OPEN_TIMEOUT):
                        # The negotiation goes with the Accept: it arrives in half a
                        # round trip, not two and a half.
                        frames = await self.ctx.mesh.open_pipelined(
                            effect.accept.provider, JOB_PROTOCOL
                        )
                else:
                    frames = await self._open_resume(effect.resume.provider)
                live.streams[attempt] = frames
                message = effect.accept if isinstance(effect, SendAccept) else effect.resume
                with trio.fail_after(OPEN_TIMEOUT):
                    await frames.write(seal(self.ctx.identity, message))
            except Exception as exc:
                await live.send.send(AcceptNotDelivered(attempt, f"{type(exc).__name__}: {exc}"))
                return
            finally:
                sent.set()
            while True:
                try:
                    data = await frames.read()
                except Exception as exc:  # EOF, reset, a frame over the limit
                    await live.send.send(StreamLost(attempt, type(exc).__name__))
                    return
                try:
                    opened = open_envelope(data)
                except MeshrunError as exc:
                    await live.send.send(BadFrame(attempt, exc.message))
                    return
                await live.send.send(ExecutorFrame(attempt, opened.signer, opened.message, data))

    async def _open_resume(self, provider: str) -> Frames:
        """A resume stream to `provider`, retried while the restarted node's
        connections come back (RequesterPolicy.resume_wait); the last failure is raised."""
        deadline = trio.current_time() + self.policy.resume_wait
        while True:
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    return await self.ctx.mesh.open(provider, RESUME_PROTOCOL)
            except Exception:
                if trio.current_time() >= deadline:
                    raise
            await trio.sleep(0.5)

    async def _write_cancel(self, frames: Frames, job_id: str, reason: str, limit: float) -> None:
        cancel = Cancel(job_id=job_id, requester=self.ctx.peer_id, reason=reason[:256])
        with trio.move_on_after(limit), contextlib.suppress(BaseLibp2pError, OSError, EOFError):
            await frames.write(seal(self.ctx.identity, cancel))

    async def _close_streams(
        self, job_id: str, live: LiveJob, attempt: int, cancel: str | None
    ) -> None:
        """Close the job stream of `attempt` (0: all of them), telling the executor to
        stop first when asked."""
        for key in sorted(set(live.streams) | set(live.scopes)):
            if attempt not in (0, key):
                continue
            frames, scope = live.streams.pop(key, None), live.scopes.pop(key, None)
            if scope is not None:
                scope.cancel()
            if frames is None:
                continue
            if cancel is not None:
                await self._write_cancel(frames, job_id, cancel, 1.0)
            await frames.close()

    # ---- fetching what the executor made ------------------------------------------

    def _remaining(self, live: LiveJob) -> float:
        deadline = live.machine.deadline
        return 60.0 if deadline is None else max(1.0, deadline - time.time())

    async def _fetch_result(self, job_id: str, live: LiveJob, effect: FetchResult) -> None:
        """Fetch the result DAG from the executor, then re-derive its CID and file digests."""
        try:
            root = Cid.decode(effect.cid)
            stats = await fetch_dag(
                self.ctx.mesh,
                self.ctx.store,
                root,
                effect.provider,
                self._remaining(live),
                max_bytes=effect.max_bytes,
                discard=self.ctx.content.discard,
            )
            rebuilt, digests = await inline_if_small(
                effect.max_bytes, INLINE_RESULT_BYTES, self._digest_tree, root, effect.max_bytes
            )
        except (MeshrunError, ValueError) as exc:
            await live.send.send(ResultUnavailable(effect.attempt, str(exc)))
            return
        await live.send.send(ResultFetched(effect.attempt, rebuilt, digests, stats))

    def _digest_tree(self, root: Cid, max_bytes: int) -> tuple[str, Mapping[str, str]]:
        return digest_tree(self.ctx.store.read_tree(root, max_bytes=max_bytes))

    async def _compare(self, live: LiveJob, effect: CompareResults) -> None:
        """Compare two verified results' tensors, off the event loop: both trees are
        local (fetched and re-hashed) and bounded by this node's result limit."""
        limit = self.policy.max_result_bytes

        def work() -> Compared:
            try:
                a = outputs_from_files(
                    self.ctx.store.read_tree(Cid.decode(effect.a_cid), max_bytes=limit)
                )
                b = outputs_from_files(
                    self.ctx.store.read_tree(Cid.decode(effect.b_cid), max_bytes=limit)
                )
            except (CompareError, StorageError, ValueError) as exc:
                return Compared(effect.a, effect.b, False, detail=f"unreadable result: {exc}")
            verdict = compare_outputs(a, b, effect.tolerance)
            return Compared(
                effect.a,
                effect.b,
                verdict.agree,
                verdict.max_abs_diff,
                verdict.max_rel_diff,
                verdict.detail,
            )

        await live.send.send(await trio.to_thread.run_sync(work))

    async def _fetch_partial(self, job_id: str, live: LiveJob, effect: FetchPartial) -> None:
        """Fetch and pin what a failed run finished; losing it would waste the work done."""
        kept: str | None = None
        try:
            root = Cid.decode(effect.cid)
            await fetch_dag(
                self.ctx.mesh,
                self.ctx.store,
                root,
                effect.provider,
                min(self._remaining(live), 60.0),
                max_bytes=effect.max_bytes,
                discard=self.ctx.content.discard,
            )
            await self.ctx.content.keep(root, f"job:{job_id}")
            kept = str(root)
        except (MeshrunError, ValueError) as exc:
            log.warning("job %s: could not keep its partial result: %s", job_id, exc)
        await live.send.send(PartialFetched(effect.attempt, kept))

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
            # Logged aggregated, and the sender's score lowered (banned past the threshold).
            self.ctx.mesh.report(remote, "bid", exc.code.value, str(exc))
            return
        message = opened.message
        if not isinstance(message, (Bid, NoBid)):
            self.ctx.mesh.report(
                remote, "bid", "WRONG_KIND", f"a {message.KIND} signed by {opened.signer}"
            )
            return
        live = self._live.get(message.job_id)
        if live is None:
            log.debug("late or unknown bid for %s from %s", message.job_id, opened.signer)
            return
        event: RequesterEvent = (
            BidIn(message, data, self.ctx.reputation.standing(message.provider))
            if isinstance(message, Bid)
            else NoBidIn(message, data)
        )
        try:
            live.send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.debug("job %s: inbox full, bid from %s dropped", message.job_id, opened.signer)


def dag_bytes(store: BaseBlockstore, cid: Cid) -> int:
    """Bytes a fetcher will move for this DAG (Kubo's cumulative size), checked link
    by link: a local DAG whose sizes lie is refused here, before any compute node
    is asked to fetch it within the size the spec declares."""
    try:
        walk = store.check_dag(cid)
    except StorageError as exc:
        raise MeshrunError(ErrorCode.INVALID_SPEC, f"{cid} cannot be sent as a job: {exc}") from exc
    return walk.dag_size or 0


__all__ = ["DEFAULT_BID_WINDOW", "JobStatus", "Requester", "dag_bytes"]

"""The compute role: hear job specs, bid (or say why not), run accepted jobs in
the executor pool, publish the result package and send a signed receipt.

Whether to bid, at what ETA, whether an Accept is genuine and how each job's
record moves are decided in protocol/ (policy and lifecycle.ComputeJob); this
module gathers the facts and does the I/O. Accepted jobs run in the role's
own nursery, not inside libp2p's stream-handler callback, so the role owns
every task it starts and a node shutdown cancels them all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from libp2p.exceptions import BaseLibp2pError

from crypto.envelope import open_envelope, seal
from node.aio import inline_if_small
from node.content.blocks import fetch_dag
from node.executor.pool import ExecutionResult
from node.executor.slots import Slots
from node.executor.split import run_split
from node.jobs.store import JobRecord
from node.roles.context import NodeContext, job_id_of, spec_cid_of
from node.roles.result_package import build_files
from node.transport.frames import Frames
from node.transport.gossip import dropped, open_gossip
from protocol.capacity import RunTimes, Scheduler, eta, load_price
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import (
    CancelFrame,
    ComputeEvent,
    ComputeJob,
    Crashed,
    LogEvent,
    Move,
    Progressed,
    Record,
    RequesterGone,
    Restarted,
    ResumeAsked,
    RunFailed,
    RunSucceeded,
    SendFrame,
    SetProgress,
    StopWork,
    Tick,
    WorkStarted,
    WorkStopped,
)
from protocol.market import ExpiringSet, bid_delay
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    RESUME_PROTOCOL,
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Receipt,
    Resume,
)
from protocol.policy import (
    Capabilities,
    Refusal,
    accept_problem,
    error_code,
    refusal,
    resume_problem,
)
from protocol.redact import scrub
from storage.cid import Cid
from storage.errors import ContentTooLarge
from storage.unixfs import cumulative_size

log = logging.getLogger("meshrun.compute")

ACCEPT_TIMEOUT = 10.0
MAX_MODEL_BYTES = 2 * 1024**3
MAX_INPUT_BYTES = 1024**3
# Job specs remembered (seen) and offers kept, each at most: a flood of fresh
# specs evicts the oldest instead of growing the node.
MAX_SEEN = 4096
MAX_OFFERS = 1024
# Specs being considered at once; more arriving meanwhile are dropped.
MAX_CONSIDERING = 64
# Accepted jobs waiting for a free slot; past this the node answers NoBid BUSY.
DEFAULT_MAX_QUEUE = 16
# How long a finished job's receipt is handed to its requester's Resume (seconds).
DEFAULT_RESUME_GRACE = 300.0
# Inputs up to this size (as the spec declares them) are read on the event loop.
INLINE_INPUT_BYTES = 64 * 1024


@dataclass
class Offer:
    spec: JobSpec
    envelope: bytes
    spec_cid: str
    bid: Bid


@dataclass
class Run:
    """An accepted job while it runs here: its machine, its stream, its work scope."""

    machine: ComputeJob
    frames: Frames
    offer: Offer
    work: trio.CancelScope = field(default_factory=trio.CancelScope)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    started: float = field(default_factory=time.monotonic)
    # The slots the scheduler gave this job; empty while it waits in the queue.
    slots: tuple[str, ...] = ()
    ready: trio.Event = field(default_factory=trio.Event)
    # The run's own nursery (set by _execute): a re-attached stream's watcher runs there.
    nursery: trio.Nursery | None = None
    # Set when the machine's next deadline moved earlier (a progress point held back).
    wake: trio.Event = field(default_factory=trio.Event)


class Compute:
    def __init__(
        self,
        ctx: NodeContext,
        slots: Slots,
        price: float = 1.0,
        device: str = "cpu",
        max_model_bytes: int = MAX_MODEL_BYTES,
        gpus: list[dict[str, Any]] | None = None,
        max_input_bytes: int = MAX_INPUT_BYTES,
        max_queue: int = DEFAULT_MAX_QUEUE,
        resume_grace: float = DEFAULT_RESUME_GRACE,
    ) -> None:
        self.gpus = gpus or []
        self.resume_grace = resume_grace
        self.ctx = ctx
        self.slots = slots
        self.scheduler = Scheduler(slots.slots, max_queue)
        # Bids and reasoned refusals sent, by (kind, reason): the node's metrics read it.
        self.replies: Counter[tuple[str, str]] = Counter()
        self.run_times = RunTimes()
        self.price = price
        self.device = device
        self.max_model_bytes = max_model_bytes
        self.max_input_bytes = max_input_bytes
        self._seen = ExpiringSet(MAX_SEEN)
        self._offer_ids = ExpiringSet(MAX_OFFERS)
        self._offers: dict[str, Offer] = {}
        self._runs: dict[str, Run] = {}
        self._considering = 0
        self._nursery: trio.Nursery | None = None
        self.model_dir = ctx.data_dir / "models"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        # Text sent to peers never names these (the data dir holds identity.key).
        self._private_roots = [str(ctx.data_dir.resolve()), str(Path.home())]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            price=self.price,
            providers=tuple(self.slots.providers),
            device=self.device,
            gpus=tuple(self.gpus),
            max_model_bytes=self.max_model_bytes,
            max_input_bytes=self.max_input_bytes,
            max_job_memory_bytes=self.slots.max_job_memory,
        )

    def capacity(self) -> dict[str, Any]:
        """What ``node.info`` shows of this node's slots and queue."""
        return self.scheduler.snapshot()

    @staticmethod
    def placement(spec: JobSpec) -> tuple[frozenset[str] | None, int]:
        """Which slot kinds may run a job, and how many slots it takes at once."""
        req = spec.requirements
        if req.gpu_count > 0 or req.provider in ("cuda", "tensorrt"):
            return frozenset({"cuda"}), max(1, req.gpu_count)
        return None, 1

    def _kind_for(self, kinds: frozenset[str] | None) -> str:
        offered = {slot.kind for slot in self.slots.slots}
        usable = offered if kinds is None else offered & kinds
        return "cuda" if "cuda" in usable else "cpu"

    def _offer(self, spec: JobSpec) -> tuple[float, float] | Refusal:
        """The price and ETA this node bids now, or why it will not bid (no slot, busy)."""
        kinds, need = self.placement(spec)
        scheduler = self.scheduler
        if not scheduler.can_ever_run(kinds, need):
            cuda = sum(1 for s in self.slots.slots if s.kind == "cuda")
            return Refusal("NO_GPU", f"job needs {need} GPU slot(s); this node offers {cuda}")
        if scheduler.full:
            return Refusal(
                "BUSY",
                f"busy: {scheduler.busy} of {len(scheduler.slots)} slot(s) in use and "
                f"{len(scheduler.queued())} job(s) queued (at most {scheduler.max_queue})",
            )
        kind = self._kind_for(kinds)
        cold = not scheduler.is_warm(spec.model_cid, kind)
        run_seconds = self.run_times.estimate(spec.model_cid, kind, cold)
        price = load_price(
            self.price, scheduler.busy, len(scheduler.queued()), len(scheduler.slots)
        )
        if spec.max_price is not None:
            price = max(self.price, min(price, spec.max_price))
        return price, eta(scheduler, spec.priority, run_seconds, need, kinds=kinds)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self._recover()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.ctx.mesh.handle(JOB_PROTOCOL, self._on_job_stream)
            self.ctx.mesh.handle(RESUME_PROTOCOL, self._on_resume_stream)
            subscription = await self.ctx.mesh.subscribe(JOBS_TOPIC, self._validate)
            task_status.started()
            while True:
                message = await subscription.get()
                if self._considering >= MAX_CONSIDERING:
                    log.debug("dropped a job spec: %d already being considered", MAX_CONSIDERING)
                    continue
                self._considering += 1
                nursery.start_soon(self._consider, bytes(message.data))

    async def _recover(self) -> None:
        """A restarted compute node ends every job it was running, in its own records.

        Their model and inputs then stop counting as live for garbage collection,
        and what the runs pinned (a partial result) is unpinned for it. A Resume
        for such a job is answered with the record's failure, so its requester
        moves on to its next bid.
        """
        for record in self.ctx.db.unfinished():
            if record.role != "compute":
                continue
            machine = ComputeJob(
                job_id=record.job_id,
                me=self.ctx.peer_id,
                requester=record.requester,
                status=record.status,
            )
            for effect in machine.handle(Restarted(), time.time()):
                if isinstance(effect, Move):
                    self.ctx.db.apply(record.job_id, effect)
            unpinned = await self.ctx.content.unpin_label(f"job:{record.job_id}")
            log.warning(
                "job %s was %s at restart: ended (%d pin(s) released)",
                record.job_id,
                record.status.value,
                len(unpinned),
            )

    # ---- gossip -----------------------------------------------------------------

    def _validate(self, forwarder: str, origin: bytes, data: bytes) -> bool:
        """Gossip validator: only well-formed, correctly signed, unexpired specs pass.

        Rejecting here means gossipsub neither delivers nor forwards the message and
        scores the forwarder down; the log line names who sent it.
        """
        spec = open_gossip(data, JobSpec, forwarder, origin, "job spec")
        if spec is None:
            return False
        now = time.time()
        if spec.expires_at < now:
            dropped("job spec", forwarder, "expired", "expired", logging.INFO)
            return False
        if spec.created_at > now + 300:
            dropped("job spec", forwarder, "future", "created in the future")
            return False
        return True

    async def _consider(self, envelope: bytes) -> None:
        try:
            await self._answer(envelope)
        finally:
            self._considering -= 1

    async def _answer(self, envelope: bytes) -> None:
        try:
            opened = open_envelope(envelope, JobSpec)
        except MeshrunError:
            return  # the validator already logged it
        spec = opened.message
        assert isinstance(spec, JobSpec)
        job_id = job_id_of(envelope)
        now = time.time()
        if job_id in self._seen or spec.requester == self.ctx.peer_id:
            return
        self._seen.add(job_id, spec.expires_at, now)
        refused = refusal(spec, self.capabilities)
        offer = self._offer(spec) if refused is None else None
        if isinstance(offer, Refusal):
            refused = offer
        reply: Bid | NoBid
        if refused is not None:
            reply = NoBid(
                job_id=job_id,
                provider=self.ctx.peer_id,
                reason=refused.reason,
                message=scrub(refused.message)[:1024],
            )
            log.info("declining job %s: %s", job_id, refused.message)
        else:
            assert offer is not None and not isinstance(offer, Refusal)
            price, eta_s = offer
            reply = Bid(
                job_id=job_id,
                provider=self.ctx.peer_id,
                price=price,
                eta_seconds=eta_s,
                execution_providers=self.slots.providers,
                device=self.device,
                created_at=now,
                max_job_memory_bytes=self.slots.max_job_memory,
            )
            for dropped in self._offer_ids.add(job_id, spec.expires_at, now):
                self._offers.pop(dropped, None)
            self._offers[job_id] = Offer(spec, envelope, spec_cid_of(opened), reply)
        await trio.sleep(
            bid_delay(job_id, self.ctx.peer_id, len(self.ctx.mesh.topic_peers(JOBS_TOPIC)))
        )
        # Over our connection to the spec's signer, or a dial within the dial
        # budget: the addresses in a spec are whatever its signer wrote.
        sent = await self.ctx.mesh.answer(
            spec.requester,
            spec.requester_addrs,
            BID_PROTOCOL,
            seal(self.ctx.identity, reply),
            reply.KIND,
        )
        if sent:
            self.replies[(reply.KIND, getattr(reply, "reason", ""))] += 1
        if not sent:
            # The requester is gone (restarting, say): forget the job entirely, so
            # that when it publishes the spec again this node answers afresh.
            self._forget_offer(job_id)
            self._seen.discard(job_id)

    def _forget_offer(self, job_id: str) -> None:
        self._offers.pop(job_id, None)
        self._offer_ids.discard(job_id)

    # ---- accepts ----------------------------------------------------------------

    async def _on_job_stream(self, frames: Frames) -> None:
        """Check an Accept before anything changes, then hand the job to the role's nursery."""
        try:
            with trio.fail_after(ACCEPT_TIMEOUT):
                data = await frames.read()
            opened = open_envelope(data, Accept)
        except (MeshrunError, trio.TooSlowError, BaseLibp2pError, EOFError) as exc:
            self.ctx.mesh.report(frames.remote_peer, "job stream", type(exc).__name__, str(exc))
            await frames.reset()
            return
        accept = opened.message
        assert isinstance(accept, Accept)
        offer = self._offers.get(accept.job_id)
        problem = accept_problem(
            accept,
            opened.signer,
            self.ctx.peer_id,
            offer.spec.requester if offer is not None else None,
            time.time(),
        )
        if problem is not None or offer is None or accept.job_id in self._runs:
            problem = problem or "job already running here"
            detail = f"refused accept for {accept.job_id} from {opened.signer}: {problem}"
            self.ctx.mesh.report(frames.remote_peer, "accept", "REFUSED", detail)
            await self._refuse(frames, accept.job_id, ErrorCode.INVALID_SPEC, problem)
            return
        self._forget_offer(accept.job_id)
        spec = offer.spec
        kinds, need = self.placement(spec)
        try:
            admission = self.scheduler.admit(
                accept.job_id,
                spec.priority,
                time.time(),
                kinds=kinds,
                need=need,
                model=spec.model_cid,
            )
        except ValueError as exc:
            await self._refuse(frames, accept.job_id, ErrorCode.INVALID_SPEC, str(exc))
            return
        if admission.outcome == "busy":
            # The queue filled between our bid and this accept: the requester's next bid.
            log.info("job %s: accepted while the queue is full; refused BUSY", accept.job_id)
            message = f"the queue filled since the bid (at most {self.scheduler.max_queue})"
            await self._refuse(frames, accept.job_id, ErrorCode.BUSY, message, retryable=True)
            return
        machine = ComputeJob(job_id=accept.job_id, me=self.ctx.peer_id, requester=accept.requester)
        self.ctx.db.create(
            accept.job_id,
            "compute",
            spec.to_wire(),
            offer.envelope,
            spec.requester,
            machine.accepted(accept.price, accept.accepted_at),
        )
        # What this node knows of its requesters: who settles what they accepted.
        self.ctx.reputation.observe(spec.requester, "accepted", role="requester")
        run = Run(machine, frames, offer, slots=admission.slots)
        if admission.outcome == "run":
            run.ready.set()
        self._runs[accept.job_id] = run
        assert self._nursery is not None
        self._nursery.start_soon(self._execute, run)

    async def _refuse(
        self,
        frames: Frames,
        job_id: str,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
    ) -> None:
        failure = Failure(
            job_id=job_id,
            provider=self.ctx.peer_id,
            code=code.value,
            message=message[:4096],
            retryable=retryable,
        )
        with contextlib.suppress(BaseLibp2pError, OSError, EOFError):
            await frames.write(seal(self.ctx.identity, failure))
        await frames.close()

    # ---- resumes ------------------------------------------------------------------

    async def _on_resume_stream(self, frames: Frames) -> None:
        """A restarted requester asks where a job it accepted stands.

        Checked (protocol.policy.resume_problem) before anything is said about
        the job. Then: a run still going here takes this stream as its job
        stream; a finished one is answered with its signed receipt (within
        --resume-grace of its end), anything else with a signed Failure.
        """
        try:
            with trio.fail_after(ACCEPT_TIMEOUT):
                data = await frames.read()
            opened = open_envelope(data, Resume)
        except (MeshrunError, trio.TooSlowError, BaseLibp2pError, EOFError) as exc:
            self.ctx.mesh.report(frames.remote_peer, "resume", type(exc).__name__, str(exc))
            await frames.reset()
            return
        resume = opened.message
        assert isinstance(resume, Resume)
        job_id, now = resume.job_id, time.time()
        record = self.ctx.db.find(job_id)
        if record is not None and record.role != "compute":
            record = None
        problem = resume_problem(
            resume,
            opened.signer,
            frames.remote_peer,
            self.ctx.peer_id,
            record.requester if record is not None else None,
            self._accepted_at(job_id) if record is not None else None,
            now,
        )
        if problem is not None or record is None:
            problem = problem or "unknown job"
            detail = f"refused resume for {job_id} from {opened.signer}: {problem}"
            self.ctx.mesh.report(frames.remote_peer, "resume", "REFUSED", detail)
            code = ErrorCode.JOB_NOT_FOUND if problem == "unknown job" else ErrorCode.INVALID_SPEC
            await self._refuse(frames, job_id, code, problem, retryable=True)
            return
        run = self._runs.get(job_id)
        if run is not None and not run.machine.finished:
            async with run.send_lock:
                old, run.frames = run.frames, frames
            if not run.machine.finished and run.nursery is not None:
                log.info("job %s: its requester resumed it; re-attached", job_id)
                with contextlib.suppress(Exception):
                    await old.close()
                run.nursery.start_soon(self._watch, run, frames)
                await self._feed(run, ResumeAsked(opened.signer))
                return
            record = self.ctx.db.get(job_id)
        await self._answer_resume(frames, record, now)

    def _accepted_at(self, job_id: str) -> float | None:
        accepted = self.ctx.db.last_event(job_id, LogEvent.BID_ACCEPTED)
        value = (accepted or {}).get("data", {}).get("accepted_at")
        return float(value) if isinstance(value, (int, float)) else None

    async def _answer_resume(self, frames: Frames, record: JobRecord, now: float) -> None:
        """Answer a Resume for a job no longer running here from its record."""
        job_id = record.job_id
        done = record.completed_at or now
        if record.status == JobStatus.COMPLETED and record.receipt_envelope:
            if now - done <= self.resume_grace:
                log.info("job %s: its requester resumed it; sent the kept receipt", job_id)
                self.ctx.db.add_event(
                    job_id, LogEvent.RESUMED, record.requester, {"sent": "receipt"}
                )
                with contextlib.suppress(BaseLibp2pError, OSError, EOFError):
                    await frames.write(record.receipt_envelope)
                await frames.close()
                return
            message = (
                f"the job finished {now - done:.0f}s ago; its receipt is handed to a Resume "
                f"for {self.resume_grace:.0f}s (--resume-grace)"
            )
            await self._refuse(frames, job_id, ErrorCode.EXPIRED, message, retryable=True)
            return
        if record.status.terminal:
            error = record.error or {}
            code = error_code(str(error.get("code") or ErrorCode.CANCELED.value))
            message = str(error.get("message") or f"the run here ended {record.status.value}")
            self.ctx.db.add_event(job_id, LogEvent.RESUMED, record.requester, {"sent": "failure"})
            # Retryable: whatever ended the run here, the requester may try its next bid.
            await self._refuse(frames, job_id, code, message, retryable=True)
            return
        await self._refuse(  # a live record with no run: only between a restart and _recover
            frames, job_id, ErrorCode.EXECUTOR_LOST, "the job is not running here", retryable=True
        )

    def _release(self, job_id: str) -> None:
        """Free a finished job's slots (or queue place) and start whoever waited for them."""
        pending = [job_id]
        while pending:
            for started, slots in self.scheduler.release(pending.pop()):
                waiting = self._runs.get(started)
                if waiting is None:
                    pending.append(started)  # ended while queued; its slots go on
                    continue
                waiting.slots = slots
                waiting.ready.set()

    # ---- the driver ---------------------------------------------------------------

    async def _feed(self, run: Run, event: ComputeEvent) -> None:
        machine = run.machine
        held = machine.held
        effects = machine.handle(event, time.time())
        if machine.held and not held:
            run.wake.set()
        for effect in effects:
            if isinstance(effect, Move):
                self.ctx.db.apply(machine.job_id, effect)
            elif isinstance(effect, Record):
                self.ctx.db.add_event(machine.job_id, effect.log, effect.peer, dict(effect.data))
            elif isinstance(effect, SetProgress):
                self.ctx.db.set_progress(machine.job_id, effect.substate, effect.progress)
            elif isinstance(effect, StopWork):
                run.work.cancel()
            elif isinstance(effect, SendFrame):
                await self._send(run, effect)
            else:  # pragma: no cover - a new effect type without a driver is a bug
                raise TypeError(f"the compute role cannot carry out {effect!r}")

    async def _send(self, run: Run, effect: SendFrame) -> None:
        frames = run.frames
        try:
            async with run.send_lock:
                frames = run.frames
                with trio.fail_after(ACCEPT_TIMEOUT):
                    await frames.write(effect.envelope or seal(self.ctx.identity, effect.message))
        except (BaseLibp2pError, OSError, EOFError, trio.TooSlowError) as exc:
            if not run.machine.finished and frames is run.frames:
                log.info("job %s: requester unreachable (%s)", run.machine.job_id, exc)
                await self._feed(run, RequesterGone(type(exc).__name__))

    async def _execute(self, run: Run) -> None:
        """Run an accepted job while watching its stream for a Cancel or a vanished requester."""
        job_id = run.machine.job_id
        try:
            async with trio.open_nursery() as nursery:
                run.nursery = nursery
                nursery.start_soon(self._watch, run, run.frames)
                nursery.start_soon(self._heartbeat, run)
                with run.work:
                    if not run.ready.is_set():
                        position = self.scheduler.position(job_id)
                        log.info("job %s queued at position %s", job_id, position)
                        await self._feed(run, Progressed("queued", 0.0))
                        await run.ready.wait()
                    await self._run_job(run)
                if run.work.cancelled_caught:
                    used = {"wall_seconds": round(time.monotonic() - run.started, 3)}
                    with trio.move_on_after(2.0):
                        await self._feed(run, WorkStopped(used))
                    log.info("job %s stopped: %s", job_id, run.machine.stop_reason)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            log.exception("job %s crashed the compute driver", job_id)
            with contextlib.suppress(Exception):
                for effect in run.machine.handle(Crashed(f"{type(exc).__name__}"), time.time()):
                    if isinstance(effect, Move):
                        self.ctx.db.apply(job_id, effect)
        finally:
            self._runs.pop(job_id, None)
            self._release(job_id)
            with trio.CancelScope(shield=True):
                await run.frames.close()

    async def _watch(self, run: Run, frames: Frames) -> None:
        """Read the requester's frames on one job stream (a Cancel) until it breaks.

        A broken stream detaches the run, unless a Resume has already replaced it.
        """
        while not run.machine.finished:
            try:
                data = await frames.read()
            except Exception as exc:  # EOF, reset, oversized frame
                if frames is run.frames:
                    await self._feed(run, RequesterGone(type(exc).__name__))
                return
            try:
                opened = open_envelope(data, Cancel)
            except MeshrunError as exc:
                peer = frames.remote_peer
                self.ctx.mesh.report(peer, "job frame", exc.code.value, exc.message)
                continue
            assert isinstance(opened.message, Cancel)
            if opened.message.job_id != run.machine.job_id:
                detail = f"a Cancel for {opened.message.job_id} on the stream of another job"
                self.ctx.mesh.report(frames.remote_peer, "job frame", "WRONG_JOB", detail)
                continue
            await self._feed(run, CancelFrame(opened.signer, opened.message.reason))

    async def _heartbeat(self, run: Run) -> None:
        """Progress frames repeat while nothing else is said, so the requester can tell
        a long model run from a silent, stuck or hostile executor."""
        while not run.machine.finished:
            deadline = run.machine.next_deadline()
            if deadline is None:
                await trio.sleep(0.1)
                continue
            with trio.move_on_after(max(0.0, deadline - time.time())):
                await run.wake.wait()
            if run.wake.is_set():  # a point was held back: its deadline is sooner
                run.wake = trio.Event()
                continue
            await self._feed(run, Tick())

    async def _run_job(self, run: Run) -> None:
        offer, job_id = run.offer, run.machine.job_id
        spec = offer.spec

        async def progress(substate: str, percent: float) -> None:
            await self._feed(run, Progressed(substate, percent))

        started_at = time.time()
        timings: dict[str, float] = {}
        try:
            await self._feed(run, WorkStarted(run.slots))
            t0 = time.perf_counter()
            model_cid, inputs_cid = Cid.decode(spec.model_cid), Cid.decode(spec.inputs_cid)
            # No more than the signed spec declares, nor than this node allows:
            # a DAG whose links lie about their sizes stops at the first lie.
            model_limit = min(spec.model_bytes, self.max_model_bytes)
            inputs_limit = min(spec.inputs_bytes, self.max_input_bytes)
            await self._fetch_all(spec, ((model_cid, model_limit), (inputs_cid, inputs_limit)))
            try:
                model_path = await trio.to_thread.run_sync(self._model_file, model_cid, model_limit)
                inputs = await inline_if_small(
                    spec.inputs_bytes,
                    INLINE_INPUT_BYTES,
                    functools.partial(self.ctx.store.cat, inputs_cid, max_bytes=inputs_limit),
                )
            except ContentTooLarge as exc:
                raise MeshrunError(
                    ErrorCode.CONTENT_TOO_LARGE, str(exc), {"limit": exc.limit}
                ) from None
            timings["fetch_ms"] = (time.perf_counter() - t0) * 1000
            await progress("processing", 5.0)

            async def on_progress(done: int, total: int) -> None:
                await progress("processing", 5.0 + 85.0 * done / max(total, 1))

            chunk = spec.params.get("batch_chunk")
            remaining = spec.timeout_seconds - (time.time() - started_at)
            options: dict[str, Any] = {
                "on_progress": on_progress,
                "batch_chunk": int(chunk) if isinstance(chunk, (int, float)) and chunk else None,
                "deterministic": bool(spec.params.get("deterministic", False)),
                "log_level": str(spec.params.get("ort_log_level", "error")),
                **self._run_options(spec),
            }
            pools = [self.slots[name] for name in run.slots]
            ran_at = time.perf_counter()
            result: ExecutionResult
            if len(pools) > 1:
                result = await run_split(
                    pools, spec.model_cid, model_path, inputs, max(remaining, 0.1), **options
                )
            else:
                result = await pools[0].run(
                    spec.model_cid, model_path, inputs, max(remaining, 0.1), **options
                )
            self._ran(run, spec.model_cid, result, time.perf_counter() - ran_at)
            timings.update(result.timings)
            await progress("finalizing", 92.0)
            outputs = self._outputs(spec, result.outputs)
            if spec.output_names:
                unknown = sorted(set(spec.output_names) - set(outputs))
                if unknown:
                    raise MeshrunError(
                        ErrorCode.EXECUTION_FAILED,
                        f"the model has no output(s) {unknown}; it has {sorted(outputs)}",
                    )
                outputs = {name: outputs[name] for name in spec.output_names}
            files, digests = build_files(
                job_id,
                outputs,
                {
                    "model_cid": spec.model_cid,
                    "inputs_cid": spec.inputs_cid,
                    "executor": self.ctx.peer_id,
                    "execution_provider": result.provider,
                    "cold_start": result.cold_start,
                    "timings_ms": timings,
                },
                stderr=scrub(result.stderr, self._private_roots),
            )
            await progress("uploading", 95.0)
            t1 = time.perf_counter()
            result_cid = await self.ctx.content.add_tree(files, f"job:{job_id}")
            result_bytes = cumulative_size(result_cid, self.ctx.store.get(result_cid))
            timings["publish_ms"] = (time.perf_counter() - t1) * 1000
            resources = dict(result.resources)
            resources["wall_seconds"] = round(time.time() - started_at, 3)
            receipt = Receipt(
                job_id=job_id,
                spec_cid=offer.spec_cid,
                model_cid=spec.model_cid,
                inputs_cid=spec.inputs_cid,
                result_cid=str(result_cid),
                result_bytes=result_bytes,
                provider=self.ctx.peer_id,
                execution_provider=result.provider,
                device=self._device_of(run),
                output_digests=digests,
                timings_ms=timings,
                resources=resources,
                started_at=started_at,
                finished_at=time.time(),
            )
            await self._feed(run, RunSucceeded(receipt, seal(self.ctx.identity, receipt)))
        except MeshrunError as exc:
            partial_cid = await self._publish_partial(job_id, spec, exc)
            log.info("job %s failed here: %s", job_id, exc)
            message = scrub(exc.message, self._private_roots)
            await self._feed(run, RunFailed(exc.code, message, dict(exc.details), partial_cid))

    async def _fetch_all(self, spec: JobSpec, dags: tuple[tuple[Cid, int], ...]) -> None:
        """Fetch the model and the inputs at once: on a link with real latency each
        DAG costs round trips, and one after the other they add up."""
        failures: list[MeshrunError] = []

        async def fetch(cid: Cid, limit: int) -> None:
            try:
                await fetch_dag(
                    self.ctx.mesh,
                    self.ctx.store,
                    cid,
                    spec.requester,
                    spec.timeout_seconds,
                    max_bytes=limit,
                    discard=self.ctx.content.discard,
                )
            except MeshrunError as exc:
                failures.append(exc)
                raise

        try:
            async with trio.open_nursery() as nursery:
                for cid, limit in dags:
                    nursery.start_soon(fetch, cid, limit)
        except BaseExceptionGroup as group:
            if not failures or group.subgroup(trio.Cancelled) is not None:
                raise
            raise failures[0] from None

    def _ran(self, run: Run, model: str, result: ExecutionResult, seconds: float) -> None:
        """What the next bids' ETAs learn from this run: its time, and where it is now warm."""
        kinds = {self._slot_kind(name) for name in run.slots}
        for kind in kinds:
            self.run_times.record(model, kind, result.cold_start, seconds)
        for name in run.slots:
            self.scheduler.note_ran(name, model)

    def _slot_kind(self, name: str) -> str:
        return next(slot.kind for slot in self.slots.slots if slot.name == name)

    def _device_of(self, run: Run) -> str:
        """The device a receipt names: the GPU(s) of the job's slots, or the CPU."""
        names = []
        for slot in self.slots.slots:
            if slot.name in run.slots and slot.kind == "cuda":
                gpu = next((g for g in self.gpus if g.get("index") == slot.device_id), None)
                names.append(str(gpu["name"]) if gpu else slot.name)
        return (" + ".join(names) if names else "cpu")[:256]

    def _run_options(self, spec: JobSpec) -> dict[str, Any]:
        """Extra ExecutorPool.run options; none here. A seam for node/roles/misbehave.py."""
        return {}

    def _outputs(self, spec: JobSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the model returned, as published; misbehave.py's wrong answers replace it."""
        return outputs

    async def _publish_partial(self, job_id: str, spec: JobSpec, exc: MeshrunError) -> str | None:
        """Keep what a failed batched run finished, as a result package marked failed."""
        if not exc.partial_outputs:
            return None
        outputs = {k: v for k, v in exc.partial_outputs.items() if isinstance(v, np.ndarray)}
        files, _ = build_files(
            job_id,
            outputs,
            {
                "model_cid": spec.model_cid,
                "inputs_cid": spec.inputs_cid,
                "executor": self.ctx.peer_id,
                "error": scrub(exc.message, self._private_roots),
            },
            status="failed",
        )
        return str(await self.ctx.content.add_tree(files, f"job:{job_id}"))

    def _model_file(self, cid: Cid, max_bytes: int) -> Path:
        """Models are run from files (onnxruntime maps them); one file per model CID,
        streamed block by block to disk, never held whole in memory."""
        path = self.model_dir / f"{cid}.onnx"
        if not path.exists():
            self.ctx.store.cat_to(cid, path, max_bytes=max_bytes)
        return path

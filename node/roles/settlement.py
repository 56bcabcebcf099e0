"""Settlements on the wire: the requester signs and delivers them, the executor
checks and records them (protocol/settlement.py decides; this module does the I/O).

Delivery is at-least-once from a durable outbox (node/jobs/ledger.py): `settle`
writes the signed settlement before anything is sent, then tries at once; a
loop retries what is still unacknowledged with backoff, after a restart too.
The executor's answer is idempotent, so a settlement delivered twice is
recorded once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio
from libp2p.io.exceptions import MessageTooLarge

from crypto.envelope import open_envelope, seal
from node.jobs.ledger import Outgoing
from node.transport.frames import Frames
from protocol.errors import MeshrunError
from protocol.lifecycle import LogEvent, Settle
from protocol.messages import SETTLE_PROTOCOL, Settlement, SettlementAck
from protocol.settlement import (
    MAX_SETTLEMENT_BYTES,
    RanJob,
    ack_problem,
    next_attempt_at,
    settlement_for,
    settlement_problem,
)
from storage.cid import cid_for_raw

if TYPE_CHECKING:  # NodeContext holds a Settlements: no import at run time, no cycle
    from node.roles.context import NodeContext

log = logging.getLogger("meshrun.settlement")

EXCHANGE_TIMEOUT = 10.0  # open, send, and read the answer of one delivery
READ_TIMEOUT = 10.0  # executor: how long a settlement stream may stay silent
RESCAN = 5.0  # how often the outbox is looked at for executors that came back
CONCURRENT_DELIVERIES = 4
# Settlements for one executor signed within this window share one stream: a
# busy requester pays one stream open per executor and window, not per job.
BATCH_WINDOW = 0.5
MAX_BATCH = 64  # settlements sent on one stream; the executor reads no more


@dataclass(frozen=True)
class Verdict:
    """An executor's answer to one settlement.

    `recorded` None: no signed answer now (this node cannot judge it yet), so
    the requester tries again later; `blame`: the sender sent something false.
    """

    recorded: bool | None
    reason: str
    blame: bool = False


class Settlements:
    """Both ends of SETTLE_PROTOCOL for one node.

    A requester's job driver calls :meth:`settle` once per executor to pay;
    on a compute node :meth:`run` serves the protocol. Start with
    ``await nursery.start(settlements.run)`` before the roles.
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._delivering: set[str] = set()
        self._batches: dict[str, list[Outgoing]] = {}
        self._limiter = trio.CapacityLimiter(CONCURRENT_DELIVERIES)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.ctx.mode == "compute":
            self.ctx.mesh.handle(SETTLE_PROTOCOL, self._on_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._resend_forever()

    # ---- requester ------------------------------------------------------------------

    async def settle(self, job_id: str, effect: Settle) -> Outgoing:
        """Sign, keep and start delivering the settlement of one accepted receipt.

        Returns once the settlement is durable, without waiting for the
        executor: delivery goes on in the background until acknowledged. A
        second call for the same job and executor returns the first settlement
        rather than signing another (the executor records only one per job).
        """
        receipt = effect.receipt
        if receipt.job_id != job_id:
            raise ValueError(f"the receipt is for job {receipt.job_id}, not {job_id}")
        ledger = self.ctx.ledger
        existing = ledger.signed_for(job_id, effect.executor)
        if existing is not None:
            return existing
        record = self.ctx.db.get(job_id)
        if record.role != "requester":
            raise ValueError(f"job {job_id} was not submitted by this node")
        settlement = settlement_for(
            me=self.ctx.peer_id,
            executor=effect.executor,
            receipt=receipt,
            receipt_cid=str(cid_for_raw(effect.receipt_envelope)),
            price=effect.price,
            outcome=effect.outcome,
            policy=str(record.spec.get("verification") or "receipt"),
            now=time.time(),
        )
        outgoing = ledger.record_signed(settlement, seal(self.ctx.identity, settlement))
        self._start_delivery(outgoing)
        return outgoing

    def _start_delivery(self, outgoing: Outgoing) -> None:
        if self._nursery is None:  # not running yet: the loop picks it up when it starts
            return
        if outgoing.receipt_cid in self._delivering:
            return
        self._delivering.add(outgoing.receipt_cid)
        batch = self._batches.setdefault(outgoing.provider, [])
        batch.append(outgoing)
        if len(batch) == 1:
            self._nursery.start_soon(self._deliver_batch, outgoing.provider)

    async def _resend_forever(self) -> None:
        while True:
            now = time.time()
            soonest = math.inf
            for outgoing in self.ctx.ledger.undelivered():
                if outgoing.receipt_cid in self._delivering:
                    continue
                if outgoing.next_attempt_at > now:
                    soonest = min(soonest, outgoing.next_attempt_at)
                    continue
                # An executor that is away is waited for, not dialled: no attempt is spent.
                if self.ctx.mesh.is_connected(outgoing.provider):
                    self._start_delivery(outgoing)
            self._wake = trio.Event()
            with trio.move_on_after(min(RESCAN, max(0.0, soonest - time.time()))):
                await self._wake.wait()

    async def _deliver_batch(self, provider: str) -> None:
        await trio.sleep(BATCH_WINDOW)
        batch = self._batches.pop(provider, [])
        try:
            async with self._limiter:
                for start in range(0, len(batch), MAX_BATCH):
                    statuses = await self.deliver_all(provider, batch[start : start + MAX_BATCH])
                    for outgoing, status in zip(batch[start:], statuses, strict=False):
                        log.info(
                            "settlement of job %s to %s: %s",
                            outgoing.job_id,
                            outgoing.provider,
                            status,
                        )
        finally:
            for outgoing in batch:
                self._delivering.discard(outgoing.receipt_cid)
            self._wake.set()

    async def deliver(self, outgoing: Outgoing) -> str:
        """One delivery attempt; the row's status after it (delivered, refused, unsent…)."""
        return (await self.deliver_all(outgoing.provider, [outgoing]))[0]

    async def deliver_all(self, provider: str, batch: list[Outgoing]) -> list[str]:
        """Send each settlement and read its acknowledgement, in order, on one stream."""
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                frames = await self.ctx.mesh.open(provider, SETTLE_PROTOCOL)
        except Exception as exc:  # unreachable, reset
            return [self._failed(o, f"{type(exc).__name__}: {exc}") for o in batch]
        frames.max_bytes = MAX_SETTLEMENT_BYTES
        statuses: list[str] = []
        try:
            for index, outgoing in enumerate(batch):
                try:
                    with trio.fail_after(EXCHANGE_TIMEOUT):
                        await frames.write(outgoing.envelope)
                        data = await frames.read()
                except Exception as exc:  # reset, silent, over the size limit
                    error = f"{type(exc).__name__}: {exc}"
                    return statuses + [self._failed(o, error) for o in batch[index:]]
                statuses.append(self._answered(outgoing, data))
            return statuses
        finally:
            with trio.CancelScope(shield=True):
                await frames.close()

    def _answered(self, outgoing: Outgoing, data: bytes) -> str:
        try:
            opened = open_envelope(data, SettlementAck, MAX_SETTLEMENT_BYTES)
        except MeshrunError as exc:  # the executor answered, with something that is no ack
            self.ctx.mesh.report(outgoing.provider, "settlement ack", exc.code.value, exc.message)
            return self._failed(outgoing, f"[{exc.code.value}] {exc.message}")
        ack = opened.message
        assert isinstance(ack, SettlementAck)
        problem = ack_problem(
            ack,
            opened.signer,
            executor=outgoing.provider,
            job_id=outgoing.job_id,
            receipt_cid=outgoing.receipt_cid,
        )
        if problem is not None:
            self.ctx.mesh.report(outgoing.provider, "settlement ack", "REFUSED", problem)
            return self._failed(outgoing, problem)
        if ack.recorded:
            self.ctx.ledger.mark_delivered(outgoing.receipt_cid, data)
        else:
            self.ctx.ledger.mark_refused(outgoing.receipt_cid, ack.reason or "refused", data)
        return self._status(outgoing)

    def _failed(self, outgoing: Outgoing, error: str) -> str:
        retry = next_attempt_at(outgoing.attempts + 1, time.time())
        self.ctx.ledger.mark_failed(outgoing.receipt_cid, error, retry)
        return self._status(outgoing)

    def _status(self, outgoing: Outgoing) -> str:
        found = self.ctx.ledger.signed(outgoing.receipt_cid)
        return found.status if found else "gone"

    # ---- compute --------------------------------------------------------------------

    async def _on_stream(self, frames: Frames) -> None:
        """Settlements one after another (at most MAX_BATCH), each answered before the next."""
        frames.max_bytes = MAX_SETTLEMENT_BYTES
        remote = frames.remote_peer
        try:
            for _ in range(MAX_BATCH):
                try:
                    with trio.fail_after(READ_TIMEOUT):
                        data = await frames.read()
                except MessageTooLarge as exc:
                    self.ctx.mesh.report(remote, "settlement", "TOO_LARGE", str(exc))
                    await frames.reset()
                    return
                except Exception:  # the end of the batch, or a silent or vanished peer
                    return
                if not await self._answer(frames, remote, data):
                    return
        finally:
            await frames.close()

    async def _answer(self, frames: Frames, remote: str, data: bytes) -> bool:
        """Check, record and acknowledge one settlement; False ends the stream."""
        try:
            opened = open_envelope(data, Settlement, MAX_SETTLEMENT_BYTES)
        except MeshrunError as exc:
            self.ctx.mesh.report(remote, "settlement", exc.code.value, exc.message)
            await frames.reset()
            return False
        settlement = opened.message
        assert isinstance(settlement, Settlement)
        verdict = self.receive(settlement, opened.signer, data)
        if verdict.blame:
            self.ctx.mesh.report(remote, "settlement", "REFUSED", verdict.reason)
        if verdict.recorded is None:  # no signed word either way: the requester tries later
            return False
        ack = SettlementAck(
            job_id=settlement.job_id,
            provider=self.ctx.peer_id,
            receipt_cid=settlement.receipt_cid,
            recorded=verdict.recorded,
            reason=verdict.reason[:256],
        )
        try:
            with trio.fail_after(READ_TIMEOUT):
                await frames.write(seal(self.ctx.identity, ack))
        except Exception:
            return False
        return True

    def receive(self, settlement: Settlement, signer: str, envelope: bytes) -> Verdict:
        """Check a settlement that arrived and record it when it holds.

        The same envelope again is answered as recorded, so a requester whose
        first acknowledgement was lost stops resending.
        """
        me = self.ctx.peer_id
        ledger = self.ctx.ledger
        kept = ledger.received_envelope(settlement.job_id, me)
        if kept == envelope:
            return Verdict(True, "already recorded")
        job = self._ran_job(settlement.job_id)

        def problem_with(known: RanJob | None) -> str | None:
            return settlement_problem(
                settlement,
                signer,
                me=me,
                job=known,
                already_settled=kept is not None,
                now=time.time(),
            )

        problem = problem_with(job)
        if problem is not None:
            log.info("settlement of job %s from %s refused: %s", settlement.job_id, signer, problem)
            if job is not None and job.receipt_cid is None:
                assumed = replace(job, receipt_cid=settlement.receipt_cid)
                if problem_with(assumed) is None:  # only our missing receipt stands in the way
                    return Verdict(None, problem)
            return Verdict(False, problem, blame=True)
        if ledger.record_received(settlement, envelope):
            outcome = "disputed" if settlement.outcome == "disputed" else "settled"
            self.ctx.reputation.observe(settlement.requester, outcome, role="requester")
            log.info(
                "job %s settled by %s: %g (%s)",
                settlement.job_id,
                settlement.requester,
                settlement.price,
                settlement.outcome,
            )
        return Verdict(True, "recorded")

    def _ran_job(self, job_id: str) -> RanJob | None:
        db = self.ctx.db
        record = db.find(job_id)
        if record is None or record.role != "compute":
            return None
        accepted = db.last_event(job_id, LogEvent.BID_ACCEPTED)
        price = accepted["data"].get("price") if accepted else None
        return RanJob(
            job_id=job_id,
            requester=record.requester,
            executor=record.executor,
            completed=record.status.value == "completed",
            receipt_cid=(
                str(cid_for_raw(record.receipt_envelope)) if record.receipt_envelope else None
            ),
            result_cid=record.result_cid,
            price=float(price) if isinstance(price, (int, float)) else None,
            policy=str(record.spec.get("verification") or "receipt"),
            accepted_at=accepted["at"] if accepted else record.created_at,
        )


__all__ = ["Settlements"]

"""The settlement ledger: a durable outbox on the requester, earnings on the executor,
both in the node's one SQLite file and both still there after a reopen."""

from __future__ import annotations

import json
import time
from pathlib import Path

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from node.jobs.ledger import ABANDONED, DELIVERED, REFUSED, UNSENT, Ledger
from node.jobs.store import JobDB
from protocol.lifecycle import ComputeJob, Move, RunSucceeded, WorkStarted
from protocol.messages import Receipt, Settlement
from protocol.settlement import MAX_SETTLEMENT_BYTES, settlement_for, verify_line
from storage.cid import cid_for_raw
from tests.protocol.test_messages import sample_fields

REQUESTER = Identity(bytes(range(10, 42)))
OTHER_REQUESTER = Identity(bytes(range(11, 43)))
EXECUTOR = Identity(bytes(range(12, 44)))
DAY = 86400.0
T0 = 1_700_006_400.0  # a UTC midnight: 2023-11-15


def _open(tmp_path: Path) -> tuple[JobDB, Ledger]:
    db = JobDB(tmp_path / "jobs.sqlite")
    return db, Ledger(db)


def _receipt(job_id: str) -> tuple[Receipt, bytes]:
    fields = sample_fields("receipt", EXECUTOR.peer_id)
    receipt = Receipt.model_validate({**fields, "job_id": job_id})
    return receipt, seal(EXECUTOR, receipt)


def _job_id(n: int) -> str:
    return str(cid_for_raw(f"job {n}".encode()))


def _settled(
    job_id: str,
    price: float,
    at: float,
    requester: Identity = REQUESTER,
    outcome: str = "accepted",
) -> tuple[Settlement, bytes]:
    receipt, envelope = _receipt(job_id)
    settlement = settlement_for(
        me=requester.peer_id,
        executor=EXECUTOR.peer_id,
        receipt=receipt,
        receipt_cid=str(cid_for_raw(envelope)),
        price=price,
        outcome=outcome,
        policy="receipt",
        now=at,
    )
    return settlement, seal(requester, settlement)


def _ran_here(db: JobDB, job_id: str, price: float, requester: Identity = REQUESTER) -> None:
    """A compute job driven by its real machine: accepted, started, result sent."""
    machine = ComputeJob(job_id=job_id, me=EXECUTOR.peer_id, requester=requester.peer_id)
    db.create(job_id, "compute", {}, b"spec", requester.peer_id, machine.accepted(price))
    now = time.time()
    for event in (WorkStarted(), RunSucceeded(*_receipt(job_id))):
        for effect in machine.handle(event, now):
            if isinstance(effect, Move):
                db.apply(job_id, effect)


def test_the_outbox_keeps_one_settlement_per_job_and_executor(tmp_path: Path) -> None:
    db, ledger = _open(tmp_path)
    first, envelope = _settled(_job_id(1), 2.0, T0)
    row = ledger.record_signed(first, envelope, now=T0)
    assert (row.status, row.attempts, row.price) == (UNSENT, 0, 2.0)
    # A replayed effect signs again (a new time): the first settlement stands.
    again, again_envelope = _settled(_job_id(1), 2.0, T0 + 5)
    assert ledger.record_signed(again, again_envelope).envelope == envelope
    assert [o.receipt_cid for o in ledger.undelivered()] == [first.receipt_cid]

    ledger.mark_failed(first.receipt_cid, "StreamReset: gone", T0 + 10)
    row = ledger.signed(first.receipt_cid)
    assert row is not None and (row.status, row.attempts, row.next_attempt_at) == (
        UNSENT,
        1,
        T0 + 10,
    )
    ledger.mark_delivered(first.receipt_cid, b"ack")
    assert ledger.undelivered() == []
    assert ledger.signed(first.receipt_cid).status == DELIVERED  # type: ignore[union-attr]

    second, envelope2 = _settled(_job_id(2), 1.0, T0 + DAY)
    ledger.record_signed(second, envelope2)
    ledger.mark_failed(second.receipt_cid, "never answered", None)
    assert ledger.signed(second.receipt_cid).status == ABANDONED  # type: ignore[union-attr]
    third, envelope3 = _settled(_job_id(3), 0.5, T0 + DAY)
    ledger.record_signed(third, envelope3)
    ledger.mark_refused(third.receipt_cid, "price 0.5 is not the accepted price 1", b"ack")
    assert ledger.signed(third.receipt_cid).status == REFUSED  # type: ignore[union-attr]

    # Spent is what was signed, delivered or not.
    assert ledger.spent() == 3.5 and ledger.spent(T0 + DAY) == 1.5
    assert db.stats(None)["total_spent"] == 3.5
    assert db.stats(T0 + DAY)["total_spent"] == 1.5


def test_the_outbox_survives_a_restart(tmp_path: Path) -> None:
    db, ledger = _open(tmp_path)
    settlement, envelope = _settled(_job_id(7), 1.5, T0)
    ledger.record_signed(settlement, envelope, now=T0)
    db.close()
    db, ledger = _open(tmp_path)
    [pending] = ledger.undelivered()
    assert pending.envelope == envelope and pending.job_id == _job_id(7)
    assert open_envelope(pending.envelope, Settlement).message == settlement


def test_stats_need_no_ledger_table(tmp_path: Path) -> None:
    assert JobDB(tmp_path / "bare.sqlite").stats(None)["total_spent"] == 0.0


def test_earnings_by_day_and_requester_and_what_is_unsettled(tmp_path: Path) -> None:
    db, ledger = _open(tmp_path)
    for n, price in ((1, 2.0), (2, 1.0), (3, 4.0), (4, 3.0)):
        _ran_here(db, _job_id(n), price, OTHER_REQUESTER if n == 3 else REQUESTER)
    assert {u["job_id"] for u in ledger.unsettled()} == {_job_id(n) for n in (1, 2, 3, 4)}

    received = [
        _settled(_job_id(1), 2.0, T0 + 10),
        _settled(_job_id(2), 1.0, T0 + DAY + 10),
        _settled(_job_id(3), 4.0, T0 + DAY + 20, OTHER_REQUESTER, "disputed"),
    ]
    for settlement, envelope in received:
        assert ledger.record_received(settlement, envelope)
        assert not ledger.record_received(settlement, envelope)  # idempotent

    earned = ledger.earnings()
    assert earned["total"] == 3.0 and earned["settled_jobs"] == 3
    assert earned["disputed_jobs"] == 1
    assert earned["by_day"] == [
        {"day": "2023-11-15", "amount": 2.0, "jobs": 1},
        {"day": "2023-11-16", "amount": 1.0, "jobs": 2},
    ]
    assert earned["by_requester"] == [
        {"requester": REQUESTER.peer_id, "amount": 3.0, "jobs": 2},
        {"requester": OTHER_REQUESTER.peer_id, "amount": 0.0, "jobs": 1},
    ]
    [unsettled] = earned["unsettled"]
    assert unsettled["job_id"] == _job_id(4) and unsettled["price"] == 3.0
    assert unsettled["requester"] == REQUESTER.peer_id and unsettled["completed_at"]
    assert earned["unsettled_amount"] == 3.0 and earned["unsettled_jobs"] == 1
    assert ledger.earnings(since=T0 + DAY)["total"] == 1.0
    assert ledger.earnings(until=T0 + DAY)["settled_jobs"] == 1

    db.close()
    db, ledger = _open(tmp_path)
    assert ledger.earnings()["total"] == 3.0
    assert ledger.received_envelope(_job_id(1), EXECUTOR.peer_id) == received[0][1]


def test_the_export_pages_and_every_line_verifies(tmp_path: Path) -> None:
    _, ledger = _open(tmp_path)
    for n in range(5):
        ledger.record_received(*_settled(_job_id(n), 1.0 + n, T0 + n))
    lines, cursor = [], 0
    while True:
        page = list(ledger.export(after=cursor, limit=2))
        if not page:
            break
        cursor = page[-1][0]
        lines += [line for _, line in page]
    assert [line["job_id"] for line in lines] == [_job_id(n) for n in range(5)]
    assert [line["price"] for line in ledger_lines(ledger, since=T0 + 3)] == [4.0, 5.0]

    def opener(data: bytes) -> object:
        return open_envelope(data, Settlement, MAX_SETTLEMENT_BYTES)

    for line in lines:
        assert all(c.ok for c in verify_line(json.dumps(line), opener))  # type: ignore[arg-type]


def ledger_lines(ledger: Ledger, since: float) -> list[dict[str, object]]:
    return [line for _, line in ledger.export(since=since)]

"""Settlement decisions (protocol.settlement): what a requester signs, what an executor
records, when delivery is retried, and the offline check of an export line."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from protocol import encoding
from protocol.messages import Receipt, Settlement, SettlementAck
from protocol.settlement import (
    MAX_ATTEMPTS,
    MAX_SETTLEMENT_BYTES,
    RETRY_CAP,
    SETTLEMENT_FIELDS,
    RanJob,
    ack_problem,
    export_line,
    next_attempt_at,
    settlement_for,
    settlement_problem,
    verify_line,
)
from storage.cid import cid_for_raw
from tests.protocol.test_messages import ALICE, BOB, sample_fields

REQUESTER, EXECUTOR = ALICE, BOB
MALLORY = Identity(bytes(range(2, 34)))
NOW = 1_700_000_100.0
RECEIPT = Receipt.model_validate(sample_fields("receipt", EXECUTOR.peer_id))
RECEIPT_ENVELOPE = seal(EXECUTOR, RECEIPT)
RECEIPT_CID = str(cid_for_raw(RECEIPT_ENVELOPE))
JOB = RanJob(
    job_id=RECEIPT.job_id,
    requester=REQUESTER.peer_id,
    executor=EXECUTOR.peer_id,
    completed=True,
    receipt_cid=RECEIPT_CID,
    result_cid=RECEIPT.result_cid,
    price=1.25,
    policy="receipt",
    accepted_at=NOW - 60,
)


def settlement(**overrides: Any) -> Settlement:
    made = settlement_for(
        me=REQUESTER.peer_id,
        executor=EXECUTOR.peer_id,
        receipt=RECEIPT,
        receipt_cid=RECEIPT_CID,
        price=1.25,
        outcome="accepted",
        policy="receipt",
        now=NOW,
    )
    return made.model_copy(update=overrides) if overrides else made


def problem(s: Settlement, signer: str = REQUESTER.peer_id, **kw: Any) -> str | None:
    args: dict[str, Any] = {
        "me": EXECUTOR.peer_id,
        "job": JOB,
        "already_settled": False,
        "now": NOW,
    }
    return settlement_problem(s, signer, **{**args, **kw})


def opener(data: bytes) -> Any:
    return open_envelope(data, Settlement, MAX_SETTLEMENT_BYTES)


# ---------------------------------------------------------------- what is signed


def test_the_requester_signs_what_it_accepted() -> None:
    s = settlement()
    assert (s.job_id, s.requester, s.provider) == (
        RECEIPT.job_id,
        REQUESTER.peer_id,
        EXECUTOR.peer_id,
    )
    assert (s.receipt_cid, s.result_cid, s.price, s.outcome) == (
        RECEIPT_CID,
        RECEIPT.result_cid,
        1.25,
        "accepted",
    )
    assert open_envelope(seal(REQUESTER, s), Settlement).message == s


def test_a_disputed_result_is_signed_at_zero_whatever_was_accepted() -> None:
    disputed = settlement_for(
        me=REQUESTER.peer_id,
        executor=EXECUTOR.peer_id,
        receipt=RECEIPT,
        receipt_cid=RECEIPT_CID,
        price=3.0,
        outcome="disputed",
        policy="redundant:2",
        now=NOW,
    )
    assert disputed.price == 0.0 and disputed.outcome == "disputed"


@pytest.mark.parametrize(
    ("executor", "price", "outcome"),
    [
        (MALLORY.peer_id, 1.0, "accepted"),  # someone else's receipt
        (BOB.peer_id, -1.0, "accepted"),
        (BOB.peer_id, float("nan"), "accepted"),
        (BOB.peer_id, 1.0, "paid"),
    ],
)
def test_nothing_inconsistent_is_signed(executor: str, price: float, outcome: str) -> None:
    with pytest.raises(ValueError):
        settlement_for(
            me=REQUESTER.peer_id,
            executor=executor,
            receipt=RECEIPT,
            receipt_cid=RECEIPT_CID,
            price=price,
            outcome=outcome,
            policy="receipt",
            now=NOW,
        )


# ---------------------------------------------------------- what the executor records


def test_an_honest_settlement_is_recorded() -> None:
    assert problem(settlement()) is None
    for outcome in ("verified", "unaudited"):
        assert problem(settlement(outcome=outcome)) is None
    assert problem(settlement(outcome="disputed", price=0.0)) is None
    assert problem(settlement(price=1.25 + 1e-12)) is None  # float noise, not a lower price


def _mallorys() -> Settlement:
    return settlement(requester=MALLORY.peer_id)


@pytest.mark.parametrize(
    ("name", "hostile", "signer", "job", "already", "expected"),
    [
        ("wrong signer", _mallorys(), MALLORY.peer_id, JOB, False, "not the job's requester"),
        ("job not run here", settlement(), REQUESTER.peer_id, None, False, "did not run here"),
        (
            "another job's facts",
            settlement(),
            REQUESTER.peer_id,
            replace(JOB, job_id="bafkreiother0000"),
            False,
            "did not run here",
        ),
        (
            "wrong receipt",
            settlement(receipt_cid="bafkreiwrongreceipt"),
            REQUESTER.peer_id,
            JOB,
            False,
            "is not the one sent",
        ),
        (
            "wrong result",
            settlement(result_cid="bafkreiwrongresult"),
            REQUESTER.peer_id,
            JOB,
            False,
            "is not the one published",
        ),
        ("lower price", settlement(price=0.5), REQUESTER.peer_id, JOB, False, "price 0.5"),
        ("higher price", settlement(price=2.0), REQUESTER.peer_id, JOB, False, "price 2"),
        (
            "disputed but paid",
            settlement(outcome="disputed"),
            REQUESTER.peer_id,
            JOB,
            False,
            "disputed price 0",
        ),
        (
            "another policy",
            settlement(policy="none"),
            REQUESTER.peer_id,
            JOB,
            False,
            "policy 'none'",
        ),
        ("replayed", settlement(), REQUESTER.peer_id, JOB, True, "already settled"),
        (
            "other provider",
            settlement(provider=MALLORY.peer_id),
            REQUESTER.peer_id,
            JOB,
            False,
            "not this node",
        ),
        (
            "not completed here",
            settlement(),
            REQUESTER.peer_id,
            replace(JOB, completed=False),
            False,
            "did not complete here",
        ),
        (
            "someone else ran it",
            settlement(),
            REQUESTER.peer_id,
            replace(JOB, executor=MALLORY.peer_id),
            False,
            "did not complete here",
        ),
        (
            "from the future",
            settlement(settled_at=NOW + 3600),
            REQUESTER.peer_id,
            JOB,
            False,
            "in the future",
        ),
        (
            "before the accept",
            settlement(settled_at=NOW - 86400),
            REQUESTER.peer_id,
            JOB,
            False,
            "before the job was accepted",
        ),
        (
            "no receipt kept",
            settlement(),
            REQUESTER.peer_id,
            replace(JOB, receipt_cid=None),
            False,
            "no receipt",
        ),
        (
            "no price known",
            settlement(),
            REQUESTER.peer_id,
            replace(JOB, price=None),
            False,
            "no accepted price",
        ),
    ],
)
def test_hostile_settlements_are_refused(
    name: str,
    hostile: Settlement,
    signer: str,
    job: RanJob | None,
    already: bool,
    expected: str,
) -> None:
    reason = problem(hostile, signer, job=job, already_settled=already)
    assert reason is not None and expected in reason, (name, reason)


# ------------------------------------------------------------------------ delivery


def test_acks_are_checked_against_what_was_sent() -> None:
    ack = SettlementAck(
        job_id=RECEIPT.job_id, provider=EXECUTOR.peer_id, receipt_cid=RECEIPT_CID, recorded=True
    )
    args = {"executor": EXECUTOR.peer_id, "job_id": RECEIPT.job_id, "receipt_cid": RECEIPT_CID}
    assert ack_problem(ack, EXECUTOR.peer_id, **args) is None
    assert "not the executor" in (ack_problem(ack, MALLORY.peer_id, **args) or "")
    other_job = ack.model_copy(update={"job_id": "bafkreiotherjob"})
    assert "acknowledges job" in (ack_problem(other_job, EXECUTOR.peer_id, **args) or "")
    other_receipt = ack.model_copy(update={"receipt_cid": "bafkreiotherrcpt"})
    assert "acknowledges receipt" in (ack_problem(other_receipt, EXECUTOR.peer_id, **args) or "")


def test_retries_back_off_up_to_a_cap_then_stop() -> None:
    delays = [next_attempt_at(n, 0.0) for n in range(1, MAX_ATTEMPTS)]
    assert all(d is not None for d in delays)
    assert delays == sorted(delays) and delays[0] == 5.0
    assert max(d for d in delays if d is not None) == RETRY_CAP
    assert next_attempt_at(MAX_ATTEMPTS, 0.0) is None


# -------------------------------------------------------------------- export lines


def _line(**changes: Any) -> str:
    line = export_line(seal(REQUESTER, settlement()))
    line.update(changes)
    return json.dumps(line)


def test_an_export_line_verifies_offline() -> None:
    line = json.loads(_line())
    assert {*SETTLEMENT_FIELDS, "envelope_b64", "requester_public_key_b64"} <= set(line)
    assert base64.b64decode(line["requester_public_key_b64"]) == REQUESTER.public_key
    checks = verify_line(_line(), opener)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {c.name for c in checks} >= {"settlement signature", "signed by the requester"}


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"price": 99.0}, "price"),
        ({"provider": MALLORY.peer_id}, "provider"),
        ({"outcome": "verified"}, "outcome"),
        ({"job_id": "bafkreisomeotherjob"}, "job_id"),
        ({"requester": MALLORY.peer_id}, "signed by the requester"),
        (
            {"requester_public_key_b64": base64.b64encode(MALLORY.public_key).decode()},
            "requester public key",
        ),
    ],
)
def test_a_tampered_field_is_named(changes: dict[str, Any], failing: str) -> None:
    failed = [c.name for c in verify_line(_line(**changes), opener) if not c.ok]
    assert failing in failed


def test_a_tampered_envelope_fails_its_signature() -> None:
    envelope = seal(REQUESTER, settlement())
    outer = encoding.decode(envelope)
    payload = encoding.decode(outer["p"])
    payload["price"] = 99.0
    outer["p"] = encoding.encode(payload)
    forged = base64.b64encode(encoding.encode(outer)).decode()
    checks = verify_line(_line(envelope_b64=forged, price=99.0), opener)
    assert [(c.name, c.ok) for c in checks] == [("settlement signature", False)]
    resigned = base64.b64encode(seal(MALLORY, _mallorys())).decode()
    failed = [c.name for c in verify_line(_line(envelope_b64=resigned), opener) if not c.ok]
    assert "signed by the requester" in failed and "requester" in failed


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", json.dumps({"v": 2}), _line(envelope_b64="!!!")]
)
def test_garbage_lines_fail(text: str) -> None:
    checks = verify_line(text, opener)
    assert checks and not all(c.ok for c in checks)

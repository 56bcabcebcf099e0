"""Settlements, decided without I/O: what the requester signs, what an executor
accepts into its ledger, when an undelivered one is tried again, and how a line
of an earnings export is checked offline.

A settlement is the requester's signed word on what an executor earned for one
job. The executor records it only when every fact it names matches what the
executor itself knows of the job (it ran it, it signed that receipt, it was
accepted at that price): a hostile requester can neither pay less than it
accepted nor fill the ledger with jobs that never ran here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from protocol import encoding
from protocol.errors import MeshrunError
from protocol.messages import Receipt, Settlement, SettlementAck, WireModel
from protocol.receipts import Check

OUTCOMES = ("accepted", "verified", "unaudited", "disputed")
# A requester's clock may run ahead of ours by this much; further is a forgery or a bug.
CLOCK_SKEW = 300.0
# Delivery: the first retry after RETRY_BASE seconds, doubling up to RETRY_CAP, and
# after MAX_ATTEMPTS failed deliveries the settlement stays signed but is not resent.
RETRY_BASE = 5.0
RETRY_CAP = 3600.0
MAX_ATTEMPTS = 12
# A settlement envelope is well under 1 KiB; anything far bigger is not one.
MAX_SETTLEMENT_BYTES = 4096

EXPORT_VERSION = 1
SETTLEMENT_FIELDS = (
    "job_id",
    "requester",
    "provider",
    "receipt_cid",
    "result_cid",
    "price",
    "policy",
    "outcome",
    "settled_at",
)


# ---------------------------------------------------------------- the requester side


def settlement_for(
    *,
    me: str,
    executor: str,
    receipt: Receipt,
    receipt_cid: str,
    price: float,
    outcome: str,
    policy: str,
    now: float,
) -> Settlement:
    """The Settlement a requester signs for an executor's accepted receipt.

    A disputed result pays nothing whatever price was accepted, so the signed
    price can never contradict the outcome beside it.
    """
    if receipt.provider != executor:
        raise ValueError(f"the receipt is {receipt.provider}'s, not the executor {executor}'s")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown settlement outcome {outcome!r}")
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"cannot settle at price {price!r}")
    return Settlement(
        job_id=receipt.job_id,
        requester=me,
        provider=executor,
        receipt_cid=receipt_cid,
        result_cid=receipt.result_cid,
        price=0.0 if outcome == "disputed" else float(price),
        policy=policy,
        outcome=outcome,  # type: ignore[arg-type]
        settled_at=now,
    )


def ack_problem(
    ack: SettlementAck, signer: str, *, executor: str, job_id: str, receipt_cid: str
) -> str | None:
    """Why an acknowledgement does not end delivery of this settlement (None: it does)."""
    if signer != executor or ack.provider != executor:
        return f"acknowledged by {signer}, not the executor {executor}"
    if ack.job_id != job_id:
        return f"acknowledges job {ack.job_id}, not {job_id}"
    if ack.receipt_cid != receipt_cid:
        return f"acknowledges receipt {ack.receipt_cid}, not {receipt_cid}"
    return None


def next_attempt_at(attempts: int, now: float) -> float | None:
    """When to try delivering again after `attempts` failed deliveries (None: stop)."""
    if attempts >= MAX_ATTEMPTS:
        return None
    delay: float = RETRY_BASE * 2.0 ** max(0, attempts - 1)
    return now + min(RETRY_CAP, delay)


# ------------------------------------------------------------------ the executor side


@dataclass(frozen=True)
class RanJob:
    """What an executor knows of a job it ran, from its own records.

    `receipt_cid` is the CID of the receipt envelope it signed and sent;
    `price` the price in the Accept it ran the job under.
    """

    job_id: str
    requester: str
    executor: str | None
    completed: bool
    receipt_cid: str | None
    result_cid: str | None
    price: float | None
    policy: str
    accepted_at: float


def settlement_problem(
    settlement: Settlement,
    signer: str,
    *,
    me: str,
    job: RanJob | None,
    already_settled: bool,
    now: float,
) -> str | None:
    """Why an executor must not record this settlement (None: record it).

    `signer` is the PeerID whose key signed the envelope; `job` what this node
    knows of the job the settlement names (None: it never ran it here);
    `already_settled`: another settlement for that job is already recorded.
    """
    if settlement.provider != me:
        return f"the settlement is for {settlement.provider}, not this node"
    if job is None or job.job_id != settlement.job_id:
        return f"job {settlement.job_id} did not run here"
    if signer != job.requester or settlement.requester != job.requester:
        return f"signed by {signer}, not the job's requester {job.requester}"
    if job.executor != me or not job.completed:
        return f"job {job.job_id} did not complete here"
    if job.receipt_cid is None:
        return f"no receipt of job {job.job_id} is kept here to compare with"
    if settlement.receipt_cid != job.receipt_cid:
        return f"receipt {settlement.receipt_cid} is not the one sent ({job.receipt_cid})"
    if settlement.result_cid != job.result_cid:
        return f"result {settlement.result_cid} is not the one published ({job.result_cid})"
    if settlement.policy != job.policy:
        return f"policy {settlement.policy!r} is not the job's ({job.policy!r})"
    owed = 0.0 if settlement.outcome == "disputed" else job.price
    if owed is None:
        return f"no accepted price of job {job.job_id} is known here"
    if not math.isclose(settlement.price, owed, rel_tol=1e-9, abs_tol=1e-12):
        return f"price {settlement.price:g} is not the {settlement.outcome} price {owed:g}"
    if settlement.settled_at > now + CLOCK_SKEW:
        return f"settled_at {settlement.settled_at:.0f} is in the future"
    if settlement.settled_at < job.accepted_at - CLOCK_SKEW:
        return f"settled_at {settlement.settled_at:.0f} is before the job was accepted"
    if already_settled:
        return f"job {job.job_id} is already settled by another settlement"
    return None


# ----------------------------------------------------------------- the export, offline


class OpenedLike(Protocol):
    """What crypto.envelope.open_envelope returns, as far as a check needs it."""

    @property
    def message(self) -> WireModel: ...

    @property
    def signer(self) -> str: ...


# Opens a settlement envelope and checks its signature, raising MeshrunError when
# it cannot: `lambda data: open_envelope(data, Settlement)`. Passed in because
# signatures are crypto's, which sits above this package.
Opener = Callable[[bytes], OpenedLike]


def export_line(envelope: bytes) -> dict[str, Any]:
    """One line of an earnings export: a settlement envelope this node checked when it
    arrived, and what it says, readably.

    The decoded fields are there for people and spreadsheets; the envelope is
    the proof, and `verify_line` checks that both say the same.
    """
    outer = encoding.decode(envelope, MAX_SETTLEMENT_BYTES)
    settlement = Settlement.model_validate(encoding.decode(outer["p"], MAX_SETTLEMENT_BYTES))
    return {
        "v": EXPORT_VERSION,
        **{name: getattr(settlement, name) for name in SETTLEMENT_FIELDS},
        "requester_public_key_b64": base64.b64encode(_envelope_key(envelope)).decode(),
        "envelope_b64": base64.b64encode(envelope).decode(),
    }


def verify_line(text: str, open_settlement: Opener) -> list[Check]:
    """Check one export line with nothing but the requester's public key in its envelope.

    The signature is checked with the key in the envelope, that key must be the
    one the requester's PeerID embeds (Ed25519 PeerIDs are their key), and
    every decoded field of the line must equal the signed one.
    """
    try:
        line = json.loads(text)
    except ValueError as exc:
        return [Check("line is JSON", False, str(exc))]
    if not isinstance(line, dict):
        return [Check("line is JSON", False, f"a {type(line).__name__}, not an object")]
    if line.get("v") != EXPORT_VERSION:
        return [Check("export version", False, f"{line.get('v')!r}, expected {EXPORT_VERSION}")]
    try:
        envelope = base64.b64decode(str(line.get("envelope_b64", "")), validate=True)
        opened = open_settlement(envelope)
    except (binascii.Error, ValueError) as exc:
        return [Check("settlement signature", False, f"envelope is not base64: {exc}")]
    except MeshrunError as exc:
        return [Check("settlement signature", False, f"[{exc.code.value}] {exc.message}")]
    settlement = opened.message
    if not isinstance(settlement, Settlement):
        return [Check("settlement signature", False, f"a {settlement.KIND}, not a settlement")]
    checks = [
        Check("settlement signature", True, f"Ed25519 by {opened.signer}"),
        Check(
            "signed by the requester",
            opened.signer == line.get("requester") == settlement.requester,
            opened.signer,
        ),
        Check(
            "requester public key",
            line.get("requester_public_key_b64")
            == base64.b64encode(_envelope_key(envelope)).decode(),
            str(line.get("requester_public_key_b64")),
        ),
    ]
    for name in SETTLEMENT_FIELDS:
        signed = getattr(settlement, name)
        checks.append(Check(name, _same(line.get(name), signed), str(signed)))
    return checks


def _same(claimed: object, signed: object) -> bool:
    if isinstance(signed, float) and not isinstance(claimed, bool):
        return isinstance(claimed, (int, float)) and float(claimed) == signed
    return claimed == signed


def _envelope_key(envelope: bytes) -> bytes:
    outer: Mapping[str, object] = encoding.decode(envelope, MAX_SETTLEMENT_BYTES)
    key = outer.get("k") if isinstance(outer, dict) else None
    return key if isinstance(key, bytes) else b""


__all__ = [
    "MAX_ATTEMPTS",
    "MAX_SETTLEMENT_BYTES",
    "OUTCOMES",
    "SETTLEMENT_FIELDS",
    "Opener",
    "RanJob",
    "ack_problem",
    "export_line",
    "next_attempt_at",
    "settlement_for",
    "settlement_problem",
    "verify_line",
]

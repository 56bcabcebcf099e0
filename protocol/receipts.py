"""The one receipt check: named checks the requester, the CLI, REST and the demo
all run, so "verified" means the same thing wherever a user reads it.

A receipt is the executor's signed statement of what it ran. The checks here
prove who answered and that the bytes are the ones it named; they do not prove
the answer is right (that needs re-execution, a verification policy).

Hashing is I/O-free but not this module's job: callers pass the CID they
re-derived from the fetched bytes and each file's sha256, so this stays pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocol.messages import Receipt


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def receipt_checks(
    receipt: Receipt,
    *,
    signer: str,
    executor: str | None,
    job_id: str,
    model_cid: str,
    inputs_cid: str,
    spec_cid: str | None = None,
) -> list[Check]:
    """What a receipt must say before its result is worth fetching.

    `signer` is the PeerID whose key signed the envelope (the envelope layer has
    already checked the signature itself); `executor` is the bidder the
    requester accepted. `spec_cid` is checked when the caller has the spec.
    """
    checks = [
        Check("signer is the executor", executor is not None and signer == executor, signer),
        Check("receipt names this job", receipt.job_id == job_id, receipt.job_id),
        Check("model CID", receipt.model_cid == model_cid, receipt.model_cid),
        Check("inputs CID", receipt.inputs_cid == inputs_cid, receipt.inputs_cid),
    ]
    if spec_cid is not None:
        checks.append(Check("spec CID", receipt.spec_cid == spec_cid, receipt.spec_cid))
    return checks


def result_checks(
    receipt: Receipt,
    *,
    rebuilt_cid: str,
    file_digests: Mapping[str, str],
    recorded_cid: str | None = None,
) -> list[Check]:
    """The fetched result against the receipt: its CID re-derived, every output digest.

    `file_digests` maps each path in the fetched tree to its sha256 (hex);
    `recorded_cid` is the result CID the local job record holds, when there is one.
    """
    same = rebuilt_cid == receipt.result_cid and recorded_cid in (None, receipt.result_cid)
    checks = [Check("result re-hashes to its CID", same, rebuilt_cid)]
    for path, digest in sorted(receipt.output_digests.items()):
        ok = file_digests.get(path) == digest
        checks.append(Check(f"sha256 {path}", ok, digest[:16] + "…"))
    return checks


def failed(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def summary(checks: Iterable[Check]) -> str:
    bad = failed(checks)
    return ", ".join(f"{c.name} ({c.detail})" for c in bad) if bad else "all checks passed"

"""The one receipt check (protocol.receipts): named checks every verifier shares."""

from __future__ import annotations

from typing import Any

from protocol.messages import Receipt
from protocol.receipts import Check, failed, receipt_checks, result_checks, summary
from tests.protocol.test_messages import ALICE, BOB, sample_fields

RECEIPT = Receipt.model_validate(sample_fields("receipt", BOB.peer_id))


def checks(**overrides: Any) -> list[Check]:
    args: dict[str, Any] = {
        "signer": BOB.peer_id,
        "executor": BOB.peer_id,
        "job_id": RECEIPT.job_id,
        "model_cid": RECEIPT.model_cid,
        "inputs_cid": RECEIPT.inputs_cid,
        "spec_cid": RECEIPT.spec_cid,
    }
    return receipt_checks(RECEIPT, **{**args, **overrides})


def test_a_matching_receipt_passes_every_check() -> None:
    result = checks()
    assert [c.name for c in result] == [
        "signer is the executor",
        "receipt names this job",
        "model CID",
        "inputs CID",
        "spec CID",
    ]
    assert not failed(result) and summary(result) == "all checks passed"
    assert len(checks(spec_cid=None)) == 4


def test_each_disagreement_is_named() -> None:
    assert [c.name for c in failed(checks(signer=ALICE.peer_id))] == ["signer is the executor"]
    assert [c.name for c in failed(checks(executor=None))] == ["signer is the executor"]
    assert [c.name for c in failed(checks(job_id="bafkreiother"))] == ["receipt names this job"]
    assert [c.name for c in failed(checks(model_cid="bafkreiother"))] == ["model CID"]
    assert [c.name for c in failed(checks(inputs_cid="bafkreiother"))] == ["inputs CID"]
    assert "spec CID" in summary(checks(spec_cid="bafkreiother"))


def test_result_checks_rehash_and_digests() -> None:
    digests = dict(RECEIPT.output_digests)
    good = result_checks(RECEIPT, rebuilt_cid=RECEIPT.result_cid, file_digests=digests)
    assert not failed(good) and len(good) == 1 + len(digests)
    wrong_cid = result_checks(RECEIPT, rebuilt_cid="bafkreiother", file_digests=digests)
    assert [c.name for c in failed(wrong_cid)] == ["result re-hashes to its CID"]
    stale = result_checks(
        RECEIPT, rebuilt_cid=RECEIPT.result_cid, file_digests=digests, recorded_cid="bafkreix"
    )
    assert failed(stale)
    path = next(iter(digests))
    tampered = result_checks(
        RECEIPT, rebuilt_cid=RECEIPT.result_cid, file_digests={**digests, path: "00"}
    )
    assert [c.name for c in failed(tampered)] == [f"sha256 {path}"]
    missing = result_checks(RECEIPT, rebuilt_cid=RECEIPT.result_cid, file_digests={})
    assert len(failed(missing)) == len(digests)
    assert good[0].to_json() == {"check": good[0].name, "ok": True, "detail": good[0].detail}

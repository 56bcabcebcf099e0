"""Offline package checks (protocol.package) against real signatures and real CIDs.

Each hostile case changes one thing in an honest package and expects the check
that catches it to be the one that fails, by name.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from typing import Any

import pytest

from crypto.envelope import domain_tag, open_envelope, seal
from crypto.keys import Identity
from protocol import encoding
from protocol.messages import JobSpec, Receipt
from protocol.package import (
    CHECKSUMS_PATH,
    INDEX_PATH,
    SPEC_PATH,
    PackageError,
    Verdict,
    assemble,
    package_extras,
    read_zip,
    receipt_path,
    unsafe_reason,
    verify_package,
)
from storage.cid import cid_for_raw
from storage.digest import digest_tree
from tests.protocol.test_messages import ALICE, BOB, sample_fields

CAROL = Identity(bytes(range(2, 34)))
RESULT = {
    "output.json": b'{"job_id": "x", "outputs": []}',
    "outputs/y.npy": b"\x93NUMPY" + bytes(range(64)),
    "logs/stdout.log": b"ran\n",
    "logs/stderr.log": b"",
}


def encode_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cid_of(data: bytes) -> str:
    return str(cid_for_raw(data))


def spec_envelope(verification: str = "receipt", nonce: bytes = b"\x07" * 16) -> bytes:
    fields = {**sample_fields("jobspec", ALICE.peer_id), "verification": verification}
    return seal(ALICE, JobSpec.model_validate({**fields, "nonce": nonce}))


def receipt_envelope(
    spec: bytes, signer: Identity = BOB, result: dict[str, bytes] = RESULT, **overrides: Any
) -> bytes:
    opened = open_envelope(spec, JobSpec)
    assert isinstance(opened.message, JobSpec)
    result_cid, digests = digest_tree(result)
    fields = {
        **sample_fields("receipt", signer.peer_id),
        "job_id": cid_of(spec),
        "spec_cid": cid_of(opened.payload),
        "model_cid": opened.message.model_cid,
        "inputs_cid": opened.message.inputs_cid,
        "result_cid": result_cid,
        "output_digests": {"outputs/y.npy": digests["outputs/y.npy"]},
        **overrides,
    }
    return seal(signer, Receipt.model_validate(fields))


def package(
    spec: bytes | None = None,
    receipt: bytes | None = None,
    verification: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    spec = spec or spec_envelope()
    extras = package_extras(
        job_id=cid_of(spec),
        result_cid=digest_tree(RESULT)[0],
        spec_envelope=spec,
        executor=BOB.peer_id,
        receipt_envelope=receipt or receipt_envelope(spec),
        verification=verification,
    )
    return assemble(RESULT, extras)


def verify(files: dict[str, bytes]) -> Verdict:
    return verify_package(
        files, open_envelope=open_envelope, cid_of=cid_of, digest_tree=digest_tree
    )


def failed(verdict: Verdict) -> dict[str, str]:
    return {c.name: c.detail for c in verdict.checks if not c.ok}


def flip(data: bytes, at: int = -1) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


def summary(policy: str, decision: str, agreed: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "policy": policy,
        "tolerance": {"mode": "values"},
        "decision": decision,
        "audited": extra.pop("audited", None),
        "executors": extra.pop("executors", []),
        "agreed": agreed,
        "disputed": extra.pop("disputed", []),
        "max_abs_diff": 0.0,
        "max_rel_diff": 0.0,
    }


def test_an_honest_package_verifies() -> None:
    spec = spec_envelope()
    files = package(spec)
    assert {SPEC_PATH, INDEX_PATH, CHECKSUMS_PATH, receipt_path(BOB.peer_id)} <= set(files)
    verdict = verify(files)
    assert verdict.verified, failed(verdict)
    assert verdict.job_id == cid_of(spec)
    names = [c.name for c in verdict.checks]
    for expected in (
        "spec signature",
        "job id is the spec's CID",
        "result re-hashes to its CID",
        "sha256 outputs/y.npy",
        "files match output.sha256",
        "verification policy",
    ):
        assert expected in names
    assert any(n.endswith("signer is the executor") for n in names)
    assert any(n.endswith("spec CID") for n in names)
    assert verdict.to_json()["verified"] is True


def test_a_flipped_output_byte_fails_naming_the_file() -> None:
    files = package()
    files["outputs/y.npy"] = flip(files["outputs/y.npy"])
    bad = failed(verify(files))
    assert {"result re-hashes to its CID", "sha256 outputs/y.npy"} <= set(bad)
    assert "outputs/y.npy" in bad["files match output.sha256"]


def test_a_flipped_log_byte_is_named_by_the_checksums() -> None:
    files = package()
    files["logs/stdout.log"] = flip(files["logs/stdout.log"])
    bad = failed(verify(files))
    assert "result re-hashes to its CID" in bad
    assert bad["files match output.sha256"] == "changed: logs/stdout.log"


def test_a_missing_or_added_file_fails() -> None:
    files = package()
    del files["outputs/y.npy"]
    bad = failed(verify(files))
    assert (
        "sha256 outputs/y.npy" in bad
        and "missing: outputs/y.npy" in bad["files match output.sha256"]
    )
    files = package()
    files["outputs/extra.npy"] = b"x"
    bad = failed(verify(files))
    assert "result re-hashes to its CID" in bad
    assert "not listed: outputs/extra.npy" in bad["files match output.sha256"]


def test_a_receipt_signed_by_someone_else_fails() -> None:
    spec = spec_envelope()
    # Carol signs her own receipt for the same result and files it as Bob's.
    carol = receipt_envelope(spec, signer=CAROL)
    bad = failed(verify(package(spec, receipt=carol)))
    assert [n for n in bad if n.endswith("signer is the executor")]

    # Carol signs a receipt that claims to be Bob's: the envelope itself fails.
    honest = encoding.decode(receipt_envelope(spec))
    assert isinstance(honest, dict)
    forged = encoding.encode(
        {
            **honest,
            "k": CAROL.public_key,
            "s": CAROL.sign(domain_tag("receipt") + honest["p"]),
        }
    )
    bad = failed(verify(package(spec, receipt=forged)))
    signature = next(detail for name, detail in bad.items() if name.endswith(": signature"))
    assert "signed by" in signature

    files = package(spec)
    files[receipt_path(BOB.peer_id)] = flip(files[receipt_path(BOB.peer_id)], at=-3)
    assert any(n.endswith(": signature") for n in failed(verify(files)))


def test_a_receipt_for_another_job_fails() -> None:
    spec = spec_envelope()
    other = spec_envelope(nonce=b"\x08" * 16)
    stray = receipt_envelope(other)
    bad = failed(verify(package(spec, receipt=stray)))
    assert any(n.endswith("receipt names this job") for n in bad)
    assert any(n.endswith("spec CID") for n in bad)


def test_a_swapped_spec_fails() -> None:
    spec = spec_envelope()
    files = package(spec)
    files[SPEC_PATH] = spec_envelope(nonce=b"\x08" * 16)
    bad = failed(verify(files))
    assert "job id is the spec's CID" in bad
    assert any(n.endswith("receipt names this job") for n in bad)

    files[SPEC_PATH] = flip(spec, at=-5)
    assert "spec signature" in failed(verify(files))
    del files[SPEC_PATH]
    assert failed(verify(files)) == {"spec signature": f"{SPEC_PATH} is missing"}
    files[SPEC_PATH] = receipt_envelope(spec)
    assert "expected a jobspec" in failed(verify(files))["spec signature"]


def test_an_empty_or_receiptless_package_is_not_verified() -> None:
    assert not verify({}).verified
    files = {p: d for p, d in package().items() if not p.startswith("meshrun/receipts/")}
    assert "receipts" in failed(verify(files))


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "a/../../evil",
        "/etc/passwd",
        "C:/win.ini",
        "a\\..\\b",
        "a//b",
        "./a",
        "",
        "a\x00",
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    assert unsafe_reason(name) is not None
    files = {**package(), name: b"x"}
    assert "package paths are safe" in failed(verify(files))


def test_safe_names_pass() -> None:
    for name in ("output.json", "outputs/y.npy", "meshrun/receipts/x.cbor", "a..b/c"):
        assert unsafe_reason(name) is None


def zipped(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def test_a_zipped_package_reads_back_and_verifies() -> None:
    files = package()
    data = zipped(sorted(files.items()))
    assert read_zip(data) == files
    assert verify(read_zip(io.BytesIO(data))).verified


@pytest.mark.parametrize("name", ["../evil.npy", "/abs/evil", "outputs/../../evil"])
def test_zip_slip_names_refuse_the_whole_zip(name: str) -> None:
    data = zipped([*sorted(package().items()), (name, b"payload")])
    with pytest.raises(PackageError, match="refusing"):
        read_zip(data)


def test_zip_symlinks_duplicates_and_bombs_are_refused() -> None:
    link = zipfile.ZipInfo("outputs/link")
    link.external_attr = (0o120777 << 16) | 0
    with pytest.raises(PackageError, match="symlink"):
        read_zip(zipped([(link, b"/etc/passwd")]))
    with pytest.warns(UserWarning, match="Duplicate"):
        twice = zipped([("a", b"1"), ("a", b"2")])
    with pytest.raises(PackageError, match="twice"):
        read_zip(twice)
    with pytest.raises(PackageError, match="declares more than"):
        read_zip(zipped([("a", b"x" * 100)]), max_bytes=10)
    with pytest.raises(PackageError, match="not a readable zip"):
        read_zip(b"not a zip")


def test_redundant_agreement_needs_signed_receipts() -> None:
    spec = spec_envelope("redundant:2")
    bob, carol = receipt_envelope(spec), receipt_envelope(spec, signer=CAROL)
    executors = [
        {"peer": peer, "attempt": n, "result_cid": None, "receipt_envelope_b64": b64,
         "outcome": outcome}
        for n, (peer, b64, outcome) in enumerate(
            [
                (BOB.peer_id, encode_b64(bob), "agreed"),
                (CAROL.peer_id, encode_b64(carol), "agreed"),
                (ALICE.peer_id, encode_b64(b"forged"), "failed"),
            ]
        )
    ]  # fmt: skip
    agreed = summary("redundant:2", "agreed", [BOB.peer_id, CAROL.peer_id], executors=executors)
    files = package(spec, receipt=bob, verification=agreed)
    assert receipt_path(CAROL.peer_id) in files
    assert receipt_path(ALICE.peer_id) not in files  # a failed attempt's receipt is left out
    index = json.loads(files[INDEX_PATH])
    assert index["result_receipt"] == receipt_path(BOB.peer_id)
    assert "receipt_envelope_b64" not in index["verification"]["executors"][0]
    verdict = verify(files)
    assert verdict.verified, failed(verdict)
    assert "agreed by 2" in next(
        c.detail for c in verdict.checks if c.name == "verification policy"
    )

    alone = {p: d for p, d in files.items() if p != receipt_path(CAROL.peer_id)}
    assert (
        "1 valid agreeing receipt(s) of the 2 needed"
        in failed(verify(alone))["verification policy"]
    )

    files[receipt_path(CAROL.peer_id)] = receipt_envelope(spec_envelope(nonce=b"\x09" * 16))
    assert "verification policy" in failed(verify(files))


def test_the_summary_must_match_the_signed_policy() -> None:
    spec = spec_envelope("redundant:2")
    assert "no summary" in failed(verify(package(spec)))["verification policy"]
    relabeled = summary("receipt", "accepted", [])
    assert (
        "signed spec"
        in failed(verify(package(spec, verification=relabeled)))["verification policy"]
    )
    pending = summary("redundant:2", "mismatch", [])
    assert failed(verify(package(spec, verification=pending)))["verification policy"]

    sampled = spec_envelope("sample:0.10")
    unaudited = summary("sample:0.1", "unaudited", [], audited=False)
    assert verify(package(sampled, verification=unaudited)).verified


def test_package_building_refuses_what_it_cannot_write_safely() -> None:
    spec = spec_envelope()
    with pytest.raises(PackageError, match="PeerID"):
        package_extras(
            job_id="x", result_cid="y", spec_envelope=spec, executor="../../x",
            receipt_envelope=b"", verification=None,
        )  # fmt: skip
    with pytest.raises(PackageError, match="reserved"):
        assemble({**RESULT, "meshrun/spec.cbor": b"mine"}, {})
    with pytest.raises(PackageError, match="reserved"):
        assemble({**RESULT, CHECKSUMS_PATH: b""}, {})


def test_the_requester_machines_summary_shape_verifies() -> None:
    """As protocol/lifecycle.py writes it: outcome "verified", no `decision`, the
    policy as Policy prints it ("sample:0.5" for a spec's "sample:0.50")."""
    spec = spec_envelope("sample:0.50")
    bob, carol = receipt_envelope(spec), receipt_envelope(spec, signer=CAROL)
    runs = [
        {"peer": BOB.peer_id, "attempt": 1, "purpose": "run", "price": 1.0,
         "result_cid": None, "receipt_envelope_b64": encode_b64(bob), "outcome": "verified"},
        {"peer": CAROL.peer_id, "attempt": 2, "purpose": "audit", "price": 1.0,
         "result_cid": None, "receipt_envelope_b64": encode_b64(carol), "outcome": "verified"},
    ]  # fmt: skip
    machine = {
        "policy": "sample:0.5",
        "tolerance": {"mode": "values", "atol": None, "rtol": None, "k": 5},
        "audited": True,
        "quorum": 2,
        "executors": runs,
        "agreed": [BOB.peer_id, CAROL.peer_id],
        "disputed": [],
        "groups": [[BOB.peer_id, CAROL.peer_id]],
        "max_abs_diff": 0.0,
        "max_rel_diff": 0.0,
    }
    files = package(spec, receipt=bob, verification=machine)
    assert receipt_path(CAROL.peer_id) in files
    verdict = verify(files)
    assert verdict.verified, failed(verdict)

    # An edited summary cannot lower the bar: audited false, quorum 1, one receipt.
    edited = {**machine, "audited": False, "quorum": 1}
    alone = package(spec, receipt=bob, verification={**edited, "executors": runs[:1]})
    assert "of the 2 needed" in failed(verify(alone))["verification policy"]

"""A downloaded result package that proves itself with no node and no network.

`meshrun client download` writes, beside the result files and output.sha256:

  meshrun/spec.cbor             the requester's signed spec (its CID is the job id)
  meshrun/receipts/<peer>.cbor  each executor's signed receipt the job kept
  meshrun/verification.json     the requester's verification summary, and which
                                receipt the result files belong to

`meshrun client verify DIR|ZIP` runs `verify_package` on them. What counts is
signed: the requester signed the spec, each executor its receipt, and a receipt
names the job, the spec and the result's CID. verification.json is an unsigned
index; its claims are checked against the envelopes, never taken on trust. What
the package cannot prove is which bidder the requester accepted (no Accept is
in it): it proves that the peer named by a receipt signed that receipt.

Opening envelopes and hashing are injected so protocol imports neither crypto
nor storage and everything here stays pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from protocol.errors import MeshrunError
from protocol.messages import JobSpec, Receipt, WireModel
from protocol.receipts import Check, receipt_checks, result_checks
from protocol.verification import Kind, Policy

META_DIR = "meshrun/"
SPEC_PATH = "meshrun/spec.cbor"
RECEIPTS_DIR = "meshrun/receipts/"
INDEX_PATH = "meshrun/verification.json"
CHECKSUMS_PATH = "output.sha256"
PACKAGE_FORMAT = 1
# Results are at most 1 GiB by default (--max-result-bytes); twice that leaves room
# for a node configured higher while still refusing a zip that claims far more.
MAX_PACKAGE_BYTES = 2 * 1024**3
MAX_PATH_CHARS = 1024

_PEER = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,64}$")
# Outcomes whose receipts are signed statements about this job worth keeping;
# a lost or failed attempt's receipt may be one the requester rejected as forged.
_KEPT_OUTCOMES = frozenset({"agreed", "verified", "disputed", "accepted", "unaudited"})
_UNSETTLED = frozenset({"pending", "mismatch"})


class PackageError(ValueError):
    """A package that cannot be read safely (unsafe path, bad zip, too large)."""


class Opened(Protocol):
    """What crypto.envelope.open_envelope returns, as far as these checks need it."""

    @property
    def message(self) -> WireModel: ...

    @property
    def signer(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


Opener = Callable[[bytes], Opened]
CidOf = Callable[[bytes], str]
TreeDigest = Callable[[Mapping[str, bytes]], tuple[str, dict[str, str]]]


# ---------------------------------------------------------------------- paths


def unsafe_reason(path: str) -> str | None:
    """Why a name may not appear in a package, or None when it may.

    Names come from a file someone handed the user: one that climbs out of the
    package (`..`, absolute, a drive) is refused before anything reads it.
    """
    if not path:
        return "empty name"
    if len(path) > MAX_PATH_CHARS:
        return "name too long"
    if "\x00" in path or "\\" in path:
        return "NUL or backslash in the name"
    if path.startswith("/"):
        return "absolute path"
    if len(path) > 1 and path[1] == ":":
        return "drive letter"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "leaves the package or has empty segments"
    return None


def is_meta(path: str) -> bool:
    return path == CHECKSUMS_PATH or path.startswith(META_DIR)


def result_part(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files the receipt's result CID covers: everything but what download added."""
    return {path: data for path, data in files.items() if not is_meta(path)}


def receipt_path(peer: str) -> str:
    return f"{RECEIPTS_DIR}{peer}.cbor"


def checksums(files: Mapping[str, bytes]) -> str:
    """output.sha256 for `sha256sum -c`."""
    return "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in sorted(files.items()))


# ------------------------------------------------------------------- building


def package_extras(
    *,
    job_id: str,
    result_cid: str,
    spec_envelope: bytes,
    executor: str,
    receipt_envelope: bytes,
    verification: Mapping[str, Any] | None,
) -> dict[str, bytes]:
    """The meshrun/ files that make a downloaded result checkable offline.

    `executor` and `receipt_envelope` are the receipt whose result this is; other
    executors' receipts come from the verification summary. Peer IDs become file
    names, so one that is not a PeerID is refused rather than written.
    """
    if not _PEER.match(executor):
        raise PackageError(f"executor {executor!r} is not a PeerID")
    receipts: dict[str, bytes] = {}
    summary: dict[str, Any] | None = None
    if verification is not None:
        summary = dict(verification)
        listed = []
        for entry in verification.get("executors") or []:
            entry = dict(entry)
            envelope = entry.pop("receipt_envelope_b64", None)
            peer = str(entry.get("peer") or "")
            if envelope and entry.get("outcome") in _KEPT_OUTCOMES and _PEER.match(peer):
                try:
                    receipts.setdefault(peer, base64.b64decode(envelope, validate=True))
                except (binascii.Error, ValueError):
                    raise PackageError(f"receipt of {peer} is not base64") from None
                entry["receipt"] = receipt_path(peer)
            listed.append(entry)
        summary["executors"] = listed
    receipts[executor] = receipt_envelope
    index = {
        "format": PACKAGE_FORMAT,
        "job_id": job_id,
        "result_cid": result_cid,
        "result_receipt": receipt_path(executor),
        "verification": summary,
    }
    extras = {SPEC_PATH: spec_envelope, INDEX_PATH: _json_bytes(index)}
    extras.update({receipt_path(peer): data for peer, data in sorted(receipts.items())})
    return extras


def assemble(result: Mapping[str, bytes], extras: Mapping[str, bytes]) -> dict[str, bytes]:
    """Result files + output.sha256 + the meshrun/ files, refusing a result that
    holds a name download writes itself (it would be overwritten, then misread)."""
    clashes = sorted(p for p in result if is_meta(p))
    if clashes:
        raise PackageError(f"the result holds names reserved for the package: {clashes}")
    unsafe = sorted(p for p in result if unsafe_reason(p))
    if unsafe:
        raise PackageError(f"the result holds unsafe names: {unsafe}")
    return {**result, CHECKSUMS_PATH: checksums(result).encode(), **extras}


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# -------------------------------------------------------------------- reading


def read_zip(source: bytes | IO[bytes], *, max_bytes: int = MAX_PACKAGE_BYTES) -> dict[str, bytes]:
    """A zip's files, in memory: nothing is extracted, and a zip-slip name, a
    symlink, a duplicate or more than `max_bytes` declared refuses the whole zip."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    files: dict[str, bytes] = {}
    total = 0
    try:
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir():
                    reason = unsafe_reason(name.rstrip("/"))
                    if reason:
                        raise PackageError(f"refusing {name!r} in the zip: {reason}")
                    continue
                reason = unsafe_reason(name)
                if reason is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                    reason = "a symlink"
                if reason is None and name in files:
                    reason = "appears twice"
                if reason:
                    raise PackageError(f"refusing {name!r} in the zip: {reason}")
                total += info.file_size
                if total > max_bytes:
                    raise PackageError(f"the zip declares more than {max_bytes} bytes")
                files[name] = archive.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
        raise PackageError(f"not a readable zip: {exc}") from None
    except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
        raise PackageError(f"cannot read the zip: {exc}") from None
    return files


# ------------------------------------------------------------------ verifying


@dataclass
class Verdict:
    job_id: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "verified": self.verified,
            "checks": [c.to_json() for c in self.checks],
        }


def verify_package(
    files: Mapping[str, bytes],
    *,
    open_envelope: Opener,
    cid_of: CidOf,
    digest_tree: TreeDigest,
) -> Verdict:
    """Every check a package must pass to be called verified, each named.

    `open_envelope` checks a signature (crypto.envelope.open_envelope), `cid_of`
    is the raw-leaf CID of bytes (storage.cid.cid_for_raw), `digest_tree` the
    result tree's root CID and per-file sha256 (storage.digest.digest_tree).
    """
    verdict = Verdict()
    checks = verdict.checks
    unsafe = sorted(p for p in files if unsafe_reason(p))
    checks.append(Check("package paths are safe", not unsafe, ", ".join(unsafe) or "all"))
    if unsafe:
        return verdict

    spec_bytes = files.get(SPEC_PATH)
    if spec_bytes is None:
        checks.append(Check("spec signature", False, f"{SPEC_PATH} is missing"))
        return verdict
    spec_opened = _open(open_envelope, spec_bytes, JobSpec)
    if isinstance(spec_opened, str):
        checks.append(Check("spec signature", False, spec_opened))
        return verdict
    spec = spec_opened.message
    assert isinstance(spec, JobSpec)
    checks.append(Check("spec signature", True, f"Ed25519 by requester {spec_opened.signer}"))
    job_id = verdict.job_id = cid_of(spec_bytes)
    spec_cid = cid_of(spec_opened.payload)

    index, problem = _index(files)
    if problem:
        checks.append(Check("verification.json", False, problem))
    named = index.get("job_id")
    checks.append(Check("job id is the spec's CID", named in (None, job_id), job_id))

    receipts: dict[str, Receipt] = {}
    valid: set[str] = set()
    paths = sorted(p for p in files if p.startswith(RECEIPTS_DIR))
    if not paths:
        checks.append(Check("receipts", False, f"no receipt in {RECEIPTS_DIR}"))
        return verdict
    for path in paths:
        peer = path[len(RECEIPTS_DIR) :].removesuffix(".cbor")
        label = f"receipt {_short(peer)}"
        opened = _open(open_envelope, files[path], Receipt)
        if isinstance(opened, str):
            checks.append(Check(f"{label}: signature", False, opened))
            continue
        receipt = opened.message
        assert isinstance(receipt, Receipt)
        own = [
            Check("signature", True, f"Ed25519 by {opened.signer}"),
            Check("signer is the receipt's provider", opened.signer == receipt.provider, ""),
            *receipt_checks(
                receipt,
                signer=opened.signer,
                executor=peer,
                job_id=job_id,
                model_cid=spec.model_cid,
                inputs_cid=spec.inputs_cid,
                spec_cid=spec_cid,
            ),
        ]
        checks.extend(Check(f"{label}: {c.name}", c.ok, c.detail) for c in own)
        receipts[peer] = receipt
        if all(c.ok for c in own):
            valid.add(peer)

    chosen_path = index.get("result_receipt")
    if chosen_path is None and len(paths) == 1:
        chosen_path = paths[0]
    chosen_peer = str(chosen_path or "")[len(RECEIPTS_DIR) :].removesuffix(".cbor")
    chosen = receipts.get(chosen_peer) if str(chosen_path).startswith(RECEIPTS_DIR) else None
    if chosen is None:
        checks.append(Check("result receipt", False, f"no readable receipt {chosen_path!r}"))
    else:
        checks.append(Check("result receipt", True, str(chosen_path)))
        result = result_part(files)
        rebuilt, digests = digest_tree(result)
        recorded = index.get("result_cid")
        checks.extend(
            result_checks(
                chosen,
                rebuilt_cid=rebuilt,
                file_digests=digests,
                recorded_cid=recorded if isinstance(recorded, str) else None,
            )
        )
        if CHECKSUMS_PATH in files:
            checks.append(_checksum_check(files[CHECKSUMS_PATH], digests))

    checks.append(_policy_check(spec.verification, index.get("verification"), chosen_peer, valid))
    return verdict


def _open(opener: Opener, data: bytes, kind: type[WireModel]) -> Opened | str:
    try:
        opened = opener(data)
    except MeshrunError as exc:
        return exc.message
    if not isinstance(opened.message, kind):
        return f"expected a {kind.KIND}, found a {opened.message.KIND}"
    return opened


def _index(files: Mapping[str, bytes]) -> tuple[dict[str, Any], str | None]:
    raw = files.get(INDEX_PATH)
    if raw is None:
        return {}, None
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"not JSON: {exc}"
    if not isinstance(index, dict):
        return {}, "not a JSON object"
    return index, None


def _checksum_check(listing: bytes, digests: Mapping[str, str]) -> Check:
    """output.sha256 is unsigned, but naming the file that changed is what a user
    needs when the re-hash fails; the signed receipt stays the authority."""
    listed: dict[str, str] = {}
    for line in listing.decode(errors="replace").splitlines():
        digest, sep, path = line.partition("  ")
        if sep:
            listed[path] = digest
    changed = sorted(p for p in listed if p in digests and digests[p] != listed[p])
    missing = sorted(p for p in listed if p not in digests)
    unlisted = sorted(p for p in digests if p not in listed)
    problems = [
        f"{what}: {', '.join(paths)}"
        for what, paths in (("changed", changed), ("missing", missing), ("not listed", unlisted))
        if paths
    ]
    return Check(
        "files match output.sha256", not problems, "; ".join(problems) or f"{len(listed)} files"
    )


def _policy_check(policy_text: str, summary: object, chosen: str, valid: set[str]) -> Check:
    """The signed spec says which policy the job ran under; the unsigned summary says
    how it was settled, and an agreement counts only as far as signed receipts back it.

    Only the spec's policy decides how many receipts must agree: the summary's own
    `quorum` or `decision` could have been edited to ask for fewer.
    """
    policy = Policy.parse(policy_text)
    name = "verification policy"
    if not isinstance(summary, dict):
        ok = not policy.multi
        return Check(name, ok, policy_text if ok else f"{policy_text} but no summary")
    claimed = summary.get("policy")
    try:
        same = isinstance(claimed, str) and Policy.parse(claimed) == policy
    except MeshrunError:
        same = False
    if not same:
        return Check(name, False, f"summary says {claimed!r}, the signed spec {policy_text}")
    decision = summary.get("decision")
    if decision in _UNSETTLED:
        return Check(name, False, f"{policy_text}: {decision}")
    agreed = {str(p) for p in summary.get("agreed") or []}
    if policy.multi and (policy.kind is Kind.REDUNDANT or agreed or decision == "agreed"):
        backed = agreed & valid
        quorum = policy.quorum(audited=True)  # a claimed agreement, whatever `audited` says
        if chosen not in backed or len(backed) < quorum:
            return Check(
                name,
                False,
                f"{policy_text}: {len(backed)} valid agreeing receipt(s) of the {quorum} "
                f"needed (the result's among them: {chosen in backed})",
            )
        return Check(name, True, f"{policy_text}: agreed by {len(backed)} signed receipts")
    if policy.kind is Kind.SAMPLE:
        return Check(name, True, f"{policy_text}: not audited this time")
    return Check(name, True, policy_text)


def _short(peer: str) -> str:
    return f"…{peer[-8:]}" if len(peer) > 12 else peer

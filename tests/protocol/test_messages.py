"""Wire models (protocol.messages): strict, closed, and every one encodable as canonical CBOR.

The sample builders and strategies here are shared with the envelope and market tests.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from crypto.keys import Identity
from protocol import encoding
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    RESUME_PROTOCOL,
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Provide,
    Receipt,
    Requirements,
    Resume,
    Settlement,
    SettlementAck,
    Tolerance,
    WireModel,
)

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
JOB_ID = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
MODEL_CID = "bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
INPUTS_CID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


def sample_fields(kind: str, signer: str, other: str | None = None) -> dict[str, Any]:
    """Valid wire fields for one message of `kind`, signed (by field) by `signer`."""
    other = other or BOB.peer_id
    if kind == "jobspec":
        return {
            "version": PROTOCOL_VERSION,
            "model_cid": MODEL_CID,
            "inputs_cid": INPUTS_CID,
            "requester": signer,
            "requester_addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "nonce": b"\x07" * 16,
            "created_at": 1_700_000_000.0,
            "expires_at": 1_700_000_600.0,
            "timeout_seconds": 60.0,
            "max_price": 1.5,
            "priority": "high",
            "requirements": {
                "provider": "cuda",
                "gpu_type": "H100",
                "gpu_count": 1,
                "min_vram_gb": 16.0,
                "max_model_bytes": 10**9,
                "min_memory_gb": 2.0,
            },
            "verification": "redundant:2",
            "tolerance": {"mode": "values", "atol": 1e-4, "rtol": None, "k": 5},
            "model_bytes": 1234,
            "inputs_bytes": 56,
            "params": {"batch_chunk": 4},
            "output_names": ["logits"],
        }
    if kind == "bid":
        return {
            "job_id": JOB_ID,
            "provider": signer,
            "price": 0.25,
            "eta_seconds": 1.5,
            "execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "device": "NVIDIA H100 80GB HBM3",
            "created_at": 1_700_000_001.0,
            "max_job_memory_bytes": 4 * 1024**3,
        }
    if kind == "nobid":
        return {
            "job_id": JOB_ID,
            "provider": signer,
            "reason": "no_gpu",
            "message": "this node has no CUDA device",
        }
    if kind == "accept":
        return {
            "job_id": JOB_ID,
            "requester": signer,
            "provider": other,
            "price": 0.25,
            "accepted_at": 1_700_000_002.0,
        }
    if kind == "progress":
        return {
            "job_id": JOB_ID,
            "provider": signer,
            "substate": "processing",
            "progress": 42.5,
            "at": 1_700_000_003.0,
        }
    if kind == "receipt":
        return {
            "job_id": JOB_ID,
            "spec_cid": JOB_ID,
            "model_cid": MODEL_CID,
            "inputs_cid": INPUTS_CID,
            "result_cid": JOB_ID,
            "result_bytes": 4096,
            "provider": signer,
            "execution_provider": "CUDAExecutionProvider",
            "device": "NVIDIA H100",
            "output_digests": {"logits": "ab" * 32},
            "timings_ms": {"load": 12.0, "run": 3.5},
            "resources": {"cpu_seconds": 0.5},
            "started_at": 1_700_000_004.0,
            "finished_at": 1_700_000_005.0,
        }
    if kind == "failure":
        return {
            "job_id": JOB_ID,
            "provider": signer,
            "code": "EXECUTION_FAILED",
            "message": "out of memory",
            "retryable": True,
            "resources": {"cpu_seconds": 2.0},
            "partial_result_cid": JOB_ID,
        }
    if kind == "cancel":
        return {"job_id": JOB_ID, "requester": signer, "reason": "user asked"}
    if kind == "resume":
        return {
            "job_id": JOB_ID,
            "requester": signer,
            "provider": other,
            "accepted_at": 1_700_000_002.0,
            "created_at": 1_700_000_010.0,
        }
    if kind == "provide":
        return {
            "provider": signer,
            "addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "cids": [JOB_ID, INPUTS_CID],
            "at": 1_700_000_006.0,
        }
    if kind == "settlement":
        return {
            "job_id": JOB_ID,
            "requester": signer,
            "provider": other,
            "receipt_cid": INPUTS_CID,
            "result_cid": JOB_ID,
            "price": 0.25,
            "policy": "sample:0.1",
            "outcome": "verified",
            "settled_at": 1_700_000_007.0,
        }
    if kind == "settlement_ack":
        return {
            "job_id": JOB_ID,
            "provider": signer,
            "receipt_cid": INPUTS_CID,
            "recorded": True,
            "reason": "",
        }
    raise AssertionError(f"no sample for {kind}")


def sample(kind: str, signer: Identity = ALICE) -> WireModel:
    return MESSAGE_TYPES[kind].model_validate(sample_fields(kind, signer.peer_id))


# ---- strategies -----------------------------------------------------------------------------

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
cids = st.text(alphabet=_ALNUM, min_size=8, max_size=128)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
nonneg = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=40)
peer_ids = st.binary(min_size=32, max_size=32).map(lambda s: Identity(s).peer_id)


def messages(kind: str, signer: str) -> st.SearchStrategy[WireModel]:
    """Arbitrary valid messages of one kind whose signer field is `signer`."""
    if kind == "jobspec":
        requirements = st.builds(
            Requirements,
            provider=st.sampled_from(["any", "cpu", "cuda", "tensorrt"]),
            gpu_type=st.none() | st.text(max_size=64),
            gpu_count=st.integers(0, 64),
            min_vram_gb=nonneg,
            max_model_bytes=st.none() | st.integers(0, 2**40),
            min_memory_gb=nonneg,
        )
        return st.builds(
            JobSpec,
            model_cid=cids,
            inputs_cid=cids,
            requester=st.just(signer),
            requester_addrs=st.lists(short_text, max_size=16),
            nonce=st.binary(min_size=16, max_size=32),
            created_at=times,
            expires_at=times,
            timeout_seconds=st.floats(min_value=0.001, max_value=7 * 24 * 3600),
            max_price=st.none() | nonneg,
            priority=st.sampled_from(["low", "normal", "high", "urgent"]),
            requirements=requirements,
            verification=st.sampled_from(
                ["none", "receipt", "redundant:2", "redundant:9", "sample:0.1", "sample:1"]
            ),
            tolerance=st.builds(
                Tolerance,
                mode=st.sampled_from(["values", "argmax", "topk"]),
                atol=st.none() | st.floats(min_value=0, max_value=1e6),
                rtol=st.none() | st.floats(min_value=0, max_value=1e6),
                k=st.integers(1, 1000),
            ),
            model_bytes=st.integers(0, 2**40),
            inputs_bytes=st.integers(0, 2**40),
        )
    if kind == "bid":
        return st.builds(
            Bid,
            job_id=cids,
            provider=st.just(signer),
            price=nonneg,
            eta_seconds=nonneg,
            execution_providers=st.lists(short_text, max_size=8),
            device=st.text(max_size=256),
            created_at=times,
            max_job_memory_bytes=st.none() | st.integers(0, 2**40),
        )
    if kind == "nobid":
        return st.builds(
            NoBid,
            job_id=cids,
            provider=st.just(signer),
            reason=st.text(max_size=64),
            message=st.text(max_size=1024),
        )
    if kind == "accept":
        return st.builds(
            Accept,
            job_id=cids,
            requester=st.just(signer),
            provider=peer_ids,
            price=nonneg,
            accepted_at=times,
        )
    if kind == "progress":
        return st.builds(
            Progress,
            job_id=cids,
            provider=st.just(signer),
            substate=st.sampled_from(["warming_up", "processing", "finalizing", "uploading"]),
            progress=st.floats(min_value=0, max_value=100),
            at=times,
        )
    if kind == "receipt":
        return st.builds(
            Receipt,
            job_id=cids,
            spec_cid=cids,
            model_cid=cids,
            inputs_cid=cids,
            result_cid=cids,
            result_bytes=st.integers(0, 2**40),
            provider=st.just(signer),
            execution_provider=st.text(max_size=64),
            device=st.text(max_size=256),
            output_digests=st.dictionaries(short_text, short_text, max_size=8),
            timings_ms=st.dictionaries(short_text, nonneg, max_size=8),
            started_at=times,
            finished_at=times,
        )
    if kind == "failure":
        return st.builds(
            Failure,
            job_id=cids,
            provider=st.just(signer),
            code=st.text(max_size=64),
            message=st.text(max_size=200),
            retryable=st.booleans(),
        )
    if kind == "cancel":
        return st.builds(
            Cancel, job_id=cids, requester=st.just(signer), reason=st.text(max_size=200)
        )
    if kind == "resume":
        return st.builds(
            Resume,
            job_id=cids,
            requester=st.just(signer),
            provider=peer_ids,
            accepted_at=times,
            created_at=times,
        )
    if kind == "provide":
        return st.builds(
            Provide,
            provider=st.just(signer),
            addrs=st.lists(short_text, max_size=16),
            cids=st.lists(cids, min_size=1, max_size=64),
            at=times,
        )
    if kind == "settlement":
        return st.builds(
            Settlement,
            job_id=cids,
            requester=st.just(signer),
            provider=peer_ids,
            receipt_cid=cids,
            result_cid=cids,
            price=nonneg,
            policy=st.sampled_from(["receipt", "redundant:3", "sample:0.25"]),
            outcome=st.sampled_from(["accepted", "verified", "unaudited", "disputed"]),
            settled_at=times,
        )
    if kind == "settlement_ack":
        return st.builds(
            SettlementAck,
            job_id=cids,
            provider=st.just(signer),
            receipt_cid=cids,
            recorded=st.booleans(),
            reason=st.text(max_size=256),
        )
    raise AssertionError(kind)


def any_message(signer: str) -> st.SearchStrategy[WireModel]:
    return st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(lambda kind: messages(kind, signer))


# ---- the registry and constants ------------------------------------------------------------


def test_message_types_registry() -> None:
    assert set(MESSAGE_TYPES) == {
        "jobspec",
        "bid",
        "nobid",
        "accept",
        "progress",
        "receipt",
        "failure",
        "cancel",
        "resume",
        "provide",
        "settlement",
        "settlement_ack",
    }
    for kind, cls in MESSAGE_TYPES.items():
        assert kind == cls.KIND
        assert issubclass(cls, WireModel)
        assert cls.SIGNER_FIELD in cls.model_fields
        assert cls.model_config.get("extra") == "forbid"
        assert cls.model_config.get("strict") is True
        assert cls.model_config.get("frozen") is True


def test_versioned_ids() -> None:
    assert PROTOCOL_VERSION == 1
    assert JOBS_TOPIC == "/meshrun/jobs/1"
    assert BID_PROTOCOL == "/meshrun/bid/1.0.0"
    assert JOB_PROTOCOL == "/meshrun/job/1.0.0"
    assert RESUME_PROTOCOL == "/meshrun/resume/1.0.0"


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_sample_is_valid_and_names_its_signer(kind: str) -> None:
    msg = sample(kind)
    assert msg.signer() == ALICE.peer_id
    assert getattr(msg, msg.SIGNER_FIELD) == ALICE.peer_id


def test_accept_signer_is_requester_not_provider() -> None:
    msg = sample("accept")
    assert isinstance(msg, Accept)
    assert msg.signer() == msg.requester == ALICE.peer_id != msg.provider


def test_jobspec_defaults() -> None:
    fields = sample_fields("jobspec", ALICE.peer_id)
    for optional in ("version", "max_price", "priority", "requirements", "verification"):
        del fields[optional]
    spec = JobSpec.model_validate(fields)
    assert spec.version == PROTOCOL_VERSION
    assert spec.max_price is None and spec.priority == "normal"
    assert spec.verification == "receipt"
    assert spec.requirements == Requirements()
    assert spec.requirements.provider == "any" and spec.requirements.gpu_count == 0


# ---- wire form ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_to_wire_round_trips_through_canonical_cbor(kind: str) -> None:
    msg = sample(kind)
    wire = msg.to_wire()
    assert wire == sample_fields(kind, ALICE.peer_id)
    data = encoding.encode(wire)
    assert type(msg).model_validate(encoding.decode(data)) == msg


@given(st.data())
def test_arbitrary_messages_round_trip(data: st.DataObject) -> None:
    msg = data.draw(any_message(ALICE.peer_id))
    raw = encoding.encode(msg.to_wire())
    back = type(msg).model_validate(encoding.decode(raw))
    assert back == msg
    assert encoding.encode(back.to_wire()) == raw


# ---- strictness -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_unknown_fields_rejected(kind: str) -> None:
    fields = sample_fields(kind, ALICE.peer_id)
    fields["surprise"] = 1
    with pytest.raises(ValidationError):
        MESSAGE_TYPES[kind].model_validate(fields)


def test_unknown_nested_requirement_rejected() -> None:
    fields = sample_fields("jobspec", ALICE.peer_id)
    fields["requirements"] = {**fields["requirements"], "tpu": True}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(fields)


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_missing_required_field_rejected(kind: str) -> None:
    cls = MESSAGE_TYPES[kind]
    fields = sample_fields(kind, ALICE.peer_id)
    required = [name for name, f in cls.model_fields.items() if f.is_required()]
    assert required
    for name in required:
        partial = {k: v for k, v in fields.items() if k != name}
        with pytest.raises(ValidationError):
            cls.model_validate(partial)


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_messages_are_frozen(kind: str) -> None:
    msg = sample(kind)
    with pytest.raises(ValidationError):
        msg.job_id = "x"  # type: ignore[attr-defined,misc]
    assert msg == sample(kind)


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("jobspec", "model_bytes", "12"),  # no str → int coercion
        ("jobspec", "model_bytes", 12.0),  # no float → int coercion
        ("jobspec", "model_bytes", True),  # bool is not an int here
        ("jobspec", "version", True),
        ("jobspec", "nonce", "0123456789abcdef"),  # str is not bytes
        ("jobspec", "requester_addrs", "/ip4/1.2.3.4/tcp/1"),
        ("jobspec", "created_at", "1700000000"),
        ("jobspec", "requirements", "cuda"),
        ("bid", "price", "0.5"),
        ("bid", "execution_providers", ("cpu",)),
        ("failure", "retryable", 1),
        ("nobid", "reason", b"busy"),
    ],
)
def test_wrong_types_are_not_coerced(kind: str, field: str, value: object) -> None:
    fields = sample_fields(kind, ALICE.peer_id)
    fields[field] = value
    with pytest.raises(ValidationError):
        MESSAGE_TYPES[kind].model_validate(fields)


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("jobspec", "model_cid", "short"),
        ("jobspec", "model_cid", "bafy-with-dash"),
        ("jobspec", "model_cid", "a" * 129),
        ("jobspec", "requester", "12D3KooW"),  # too short
        ("jobspec", "requester", "0" * 52),  # 0 is not base58
        ("jobspec", "requester", "l" * 52),  # nor is l
        ("jobspec", "requester_addrs", ["/x"] * 17),
        ("jobspec", "nonce", b"\x00" * 15),
        ("jobspec", "nonce", b"\x00" * 33),
        ("jobspec", "timeout_seconds", 0.0),
        ("jobspec", "timeout_seconds", -1.0),
        ("jobspec", "timeout_seconds", 7 * 24 * 3600 + 1.0),
        ("jobspec", "max_price", -0.01),
        ("jobspec", "priority", "asap"),
        ("jobspec", "verification", "trust-me"),
        ("jobspec", "model_bytes", -1),
        ("jobspec", "inputs_bytes", -1),
        ("bid", "price", -1.0),
        ("bid", "price", float("nan")),
        ("bid", "eta_seconds", -0.5),
        ("bid", "execution_providers", ["x"] * 9),
        ("bid", "device", "d" * 257),
        ("nobid", "reason", "r" * 65),
        ("nobid", "message", "m" * 1025),
        ("accept", "provider", "not a peer id at all, too short"),
        ("progress", "progress", 100.5),
        ("progress", "progress", -1.0),
        ("progress", "substate", "sleeping"),
        ("receipt", "output_digests", {str(i): "x" for i in range(257)}),
        ("receipt", "timings_ms", {"run": "fast"}),
        ("failure", "message", "m" * 4097),
    ],
)
def test_field_constraints(kind: str, field: str, value: object) -> None:
    fields = sample_fields(kind, ALICE.peer_id)
    fields[field] = value
    with pytest.raises(ValidationError):
        MESSAGE_TYPES[kind].model_validate(fields)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "rocm"),
        ("gpu_count", -1),
        ("gpu_count", 65),
        ("min_vram_gb", -1.0),
        ("max_model_bytes", -1),
        ("gpu_type", "g" * 65),
    ],
)
def test_requirement_constraints(field: str, value: object) -> None:
    fields = sample_fields("jobspec", ALICE.peer_id)
    fields["requirements"] = {**fields["requirements"], field: value}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(fields)

"""Signed envelopes (crypto.envelope): round trips, forgery, domain mixing and hostile input."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crypto.envelope import ENVELOPE_VERSION, Opened, domain_tag, open_envelope, seal
from crypto.keys import Identity
from protocol import encoding
from protocol.errors import ErrorCode, MeshrunError
from protocol.messages import MESSAGE_TYPES, Bid, JobSpec
from tests.protocol.test_messages import (
    ALICE,
    BOB,
    any_message,
    sample,
    sample_fields,
)

KINDS = sorted(MESSAGE_TYPES)
FIELDS = ("v", "t", "p", "k", "s")
REJECTED = {ErrorCode.SIGNATURE_INVALID, ErrorCode.MALFORMED_MESSAGE}


def envelope(**fields: Any) -> bytes:
    """An envelope built by hand (canonical CBOR), for the cases `seal` would never make."""
    return encoding.encode(fields)


def signed(identity: Identity, kind: str, payload: bytes, **overrides: Any) -> bytes:
    """A correctly signed envelope around arbitrary payload bytes, bypassing `seal`'s checks."""
    fields: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "t": kind,
        "p": payload,
        "k": identity.public_key,
        "s": identity.sign(domain_tag(kind) + payload),
    }
    fields.update(overrides)
    return envelope(**fields)


def outer(data: bytes) -> dict[str, Any]:
    value = encoding.decode(data)
    assert isinstance(value, dict)
    return value


def rejected(data: bytes, code: ErrorCode | set[ErrorCode], **kwargs: Any) -> MeshrunError:
    with pytest.raises(MeshrunError) as info:
        open_envelope(data, **kwargs)
    codes = code if isinstance(code, set) else {code}
    assert info.value.code in codes, info.value
    return info.value


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_seal_open_round_trip_every_type(kind: str) -> None:
    msg = sample(kind)
    data = seal(ALICE, msg)
    opened = open_envelope(data)
    assert isinstance(opened, Opened)
    assert opened.message == msg
    assert type(opened.message) is MESSAGE_TYPES[kind]
    assert opened.signer == ALICE.peer_id
    assert opened.payload == encoding.encode(msg.to_wire())
    assert open_envelope(data, type(msg)).message == msg
    wrapper = outer(data)
    assert set(wrapper) == set(FIELDS)
    assert wrapper["v"] == ENVELOPE_VERSION and wrapper["t"] == kind
    assert wrapper["k"] == ALICE.public_key
    assert seal(ALICE, msg) == data  # Ed25519 and canonical CBOR are both deterministic


@settings(max_examples=60)
@given(st.data())
def test_seal_open_round_trip_arbitrary(data: st.DataObject) -> None:
    seed = data.draw(st.binary(min_size=32, max_size=32))
    identity = Identity(seed)
    msg = data.draw(any_message(identity.peer_id))
    opened = open_envelope(seal(identity, msg), type(msg))
    assert opened.message == msg and opened.signer == identity.peer_id


def test_domain_tags() -> None:
    assert domain_tag("jobspec") == b"meshrun/jobspec/1\x00"
    tags = [domain_tag(kind) for kind in KINDS]
    assert len(set(tags)) == len(tags)
    for a, b in itertools.permutations(tags, 2):
        assert not b.startswith(a)  # NUL-terminated: no tag is a prefix of another


# ---- forgery --------------------------------------------------------------------------------


@settings(max_examples=150)
@given(
    st.sampled_from(KINDS),
    st.sampled_from(["p", "s"]),
    st.integers(min_value=0),
    st.integers(min_value=1, max_value=255),
)
def test_flipped_payload_or_signature_byte_rejected(
    kind: str, field: str, position: int, xor: int
) -> None:
    fields = outer(seal(ALICE, sample(kind)))
    target = bytearray(fields[field])
    target[position % len(target)] ^= xor
    fields[field] = bytes(target)
    rejected(envelope(**fields), REJECTED)


@settings(max_examples=200)
@given(st.sampled_from(KINDS), st.integers(min_value=0), st.integers(min_value=1, max_value=255))
@example("bid", 0, 1)
def test_flipped_envelope_byte_never_opens(kind: str, position: int, xor: int) -> None:
    data = bytearray(seal(ALICE, sample(kind)))
    data[position % len(data)] ^= xor
    with pytest.raises(MeshrunError):
        open_envelope(bytes(data))


@given(st.sampled_from(KINDS), st.data())
def test_truncated_or_extended_envelope_never_opens(kind: str, data: st.DataObject) -> None:
    raw = seal(ALICE, sample(kind))
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MeshrunError):
        open_envelope(raw[:cut])
    with pytest.raises(MeshrunError):
        open_envelope(raw + data.draw(st.binary(min_size=1, max_size=8)))


@pytest.mark.parametrize("kind", KINDS)
def test_signature_from_another_key_rejected(kind: str) -> None:
    fields = outer(seal(ALICE, sample(kind)))
    fields["s"] = BOB.sign(domain_tag(kind) + fields["p"])
    rejected(envelope(**fields), ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_public_key_rejected(kind: str) -> None:
    fields = outer(seal(ALICE, sample(kind)))
    fields["k"] = BOB.public_key
    rejected(envelope(**fields), ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize("key", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 32, b"\xff" * 32])
def test_bad_public_keys_rejected(key: bytes) -> None:
    fields = outer(seal(ALICE, sample("bid")))
    fields["k"] = key
    rejected(envelope(**fields), ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize("sig", [b"", b"\x00" * 63, b"\x00" * 64, b"\x00" * 65])
def test_bad_signatures_rejected(sig: bytes) -> None:
    fields = outer(seal(ALICE, sample("bid")))
    fields["s"] = sig
    rejected(envelope(**fields), ErrorCode.SIGNATURE_INVALID)


def test_malleated_signature_rejected() -> None:
    """S + L is the same signature to a lax verifier; a second valid encoding of the same
    signed spec would be a second job id, so it must not open."""
    group_order = 2**252 + 27742317777372353535851937790883648493
    fields = outer(seal(ALICE, sample("jobspec")))
    sig = fields["s"]
    s_plus_l = int.from_bytes(sig[32:], "little") + group_order
    fields["s"] = sig[:32] + s_plus_l.to_bytes(32, "little")
    rejected(envelope(**fields), ErrorCode.SIGNATURE_INVALID)


def test_signature_without_domain_tag_rejected() -> None:
    payload = encoding.encode(sample("bid").to_wire())
    data = signed(ALICE, "bid", payload, s=ALICE.sign(payload))
    rejected(data, ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize(("kind_a", "kind_b"), list(itertools.permutations(KINDS, 2)))
def test_domain_mixing_rejected(kind_a: str, kind_b: str) -> None:
    """A signature made for kind A over payload P is useless when the envelope says kind B."""
    payload = encoding.encode(sample(kind_a).to_wire())
    signature = ALICE.sign(domain_tag(kind_a) + payload)
    assert open_envelope(signed(ALICE, kind_a, payload)).message == sample(kind_a)
    rejected(signed(ALICE, kind_b, payload, s=signature), ErrorCode.SIGNATURE_INVALID)
    # Even a payload that is valid as kind B, signed under A's tag, does not open as B.
    payload_b = encoding.encode(sample(kind_b).to_wire())
    forged = signed(ALICE, kind_b, payload_b, s=ALICE.sign(domain_tag(kind_a) + payload_b))
    rejected(forged, ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize("kind", KINDS)
def test_signer_field_naming_another_peer_rejected(kind: str) -> None:
    """Bob signs (validly, with his own key) a message that claims Alice as its author."""
    payload = encoding.encode(sample_fields(kind, ALICE.peer_id, BOB.peer_id))
    err = rejected(signed(BOB, kind, payload), ErrorCode.SIGNATURE_INVALID)
    assert BOB.peer_id in err.message and ALICE.peer_id in err.message


def test_accept_signed_by_its_provider_rejected() -> None:
    """Accept is the requester's word: the provider it names cannot sign it."""
    payload = encoding.encode(sample_fields("accept", ALICE.peer_id, BOB.peer_id))
    rejected(signed(BOB, "accept", payload), ErrorCode.SIGNATURE_INVALID)


@pytest.mark.parametrize("kind", KINDS)
def test_seal_refuses_a_message_that_is_not_ours(kind: str) -> None:
    with pytest.raises(ValueError, match="not our own PeerID"):
        seal(BOB, sample(kind, ALICE))


# ---- versions, types and shape ---------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, -1, 2**64 - 1])
def test_unknown_version_rejected(version: int) -> None:
    data = signed(ALICE, "bid", encoding.encode(sample("bid").to_wire()), v=version)
    err = rejected(data, ErrorCode.UNSUPPORTED_VERSION)
    assert str(version) in err.message


@pytest.mark.parametrize("version", [True, 1.0, "1", b"\x01", None, [1]])
def test_version_must_be_the_integer_one(version: object) -> None:
    """Only the int 1 is version 1: `True == 1.0 == 1` in Python, but each is a different
    envelope byte string, hence a different job id for the same signed spec."""
    data = signed(ALICE, "jobspec", encoding.encode(sample("jobspec").to_wire()), v=version)
    rejected(data, {ErrorCode.UNSUPPORTED_VERSION, ErrorCode.MALFORMED_MESSAGE})


@pytest.mark.parametrize("kind", ["", "JobSpec", "jobspec2", "meshrun/bid", "unknown"])
def test_unknown_type_rejected(kind: str) -> None:
    rejected(signed(ALICE, kind, encoding.encode({})), ErrorCode.MALFORMED_MESSAGE)


@pytest.mark.parametrize(
    "overrides",
    [
        {"t": 1},
        {"t": b"bid"},
        {"t": None},
        {"p": "not bytes"},
        {"p": {"job_id": "x"}},
        {"k": "key"},
        {"k": None},
        {"s": [1, 2]},
        {"s": "sig"},
    ],
    ids=repr,
)
def test_wrong_envelope_field_types_rejected(overrides: dict[str, Any]) -> None:
    data = signed(ALICE, "bid", encoding.encode(sample("bid").to_wire()), **overrides)
    rejected(data, ErrorCode.MALFORMED_MESSAGE)


def test_extra_or_missing_envelope_fields_rejected() -> None:
    fields = outer(seal(ALICE, sample("bid")))
    rejected(envelope(**fields, x=1), ErrorCode.MALFORMED_MESSAGE)
    rejected(envelope(**fields, version=1), ErrorCode.MALFORMED_MESSAGE)
    for name in FIELDS:
        partial = {k: v for k, v in fields.items() if k != name}
        rejected(envelope(**partial), ErrorCode.MALFORMED_MESSAGE)


@pytest.mark.parametrize("value", [[], [1, "bid", b"", b"", b""], "envelope", 1, None, b"x", {}])
def test_non_envelope_values_rejected(value: Any) -> None:
    rejected(encoding.encode(value), ErrorCode.MALFORMED_MESSAGE)


def test_non_canonical_outer_rejected() -> None:
    import cbor2

    fields = outer(seal(ALICE, sample("bid")))
    backwards = dict(reversed(list(fields.items())))
    rejected(cbor2.dumps(backwards), ErrorCode.MALFORMED_MESSAGE)


def test_oversize_envelope_rejected() -> None:
    data = seal(ALICE, sample("receipt"))
    rejected(data, ErrorCode.MESSAGE_TOO_LARGE, max_bytes=len(data) - 1)
    assert open_envelope(data, max_bytes=len(data)).signer == ALICE.peer_id


# ---- payload validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_seconds", -5.0),
        ("timeout_seconds", 0.0),
        ("nonce", b"short"),
        ("model_cid", "no"),
        ("priority", "now!"),
        ("max_price", -1.0),
        ("surprise", 1),
        ("model_bytes", "12"),
    ],
)
def test_invalid_jobspec_is_invalid_spec(field: str, value: object) -> None:
    fields = sample_fields("jobspec", ALICE.peer_id)
    fields[field] = value
    err = rejected(signed(ALICE, "jobspec", encoding.encode(fields)), ErrorCode.INVALID_SPEC)
    assert field in err.message


def test_invalid_other_messages_are_malformed() -> None:
    fields = sample_fields("bid", ALICE.peer_id)
    fields["price"] = -1.0
    rejected(signed(ALICE, "bid", encoding.encode(fields)), ErrorCode.MALFORMED_MESSAGE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body", [[], "x", 1, None, {}])
def test_payload_that_is_not_a_map_rejected(kind: str, body: Any) -> None:
    code = ErrorCode.INVALID_SPEC if kind == "jobspec" else ErrorCode.MALFORMED_MESSAGE
    rejected(signed(ALICE, kind, encoding.encode(body)), code)


def test_payload_must_be_canonical_even_when_signed() -> None:
    import cbor2

    fields = sample_fields("bid", ALICE.peer_id)
    payload = cbor2.dumps(dict(reversed(list(fields.items()))))
    assert payload != encoding.encode(fields)
    rejected(signed(ALICE, "bid", payload), ErrorCode.MALFORMED_MESSAGE)


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\xa1\x01\x02", b"\xc6\x01"])
def test_signed_garbage_payload_rejected(payload: bytes) -> None:
    rejected(signed(ALICE, "bid", payload), ErrorCode.MALFORMED_MESSAGE)


def test_payload_over_max_bytes_rejected() -> None:
    fields = sample_fields("nobid", ALICE.peer_id)
    payload = encoding.encode(fields)
    data = signed(ALICE, "nobid", payload)
    assert open_envelope(data).message == sample("nobid")
    rejected(data, ErrorCode.MESSAGE_TOO_LARGE, max_bytes=len(data) - 1)


# ---- expected type --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), list(itertools.permutations(KINDS, 2)))
def test_expected_type_mismatch_rejected(kind: str, expected: str) -> None:
    data = seal(ALICE, sample(kind))
    err = rejected(data, ErrorCode.MALFORMED_MESSAGE, expected=MESSAGE_TYPES[expected])
    assert expected in err.message and kind in err.message


def test_expected_type_match_accepted() -> None:
    assert isinstance(open_envelope(seal(ALICE, sample("jobspec")), JobSpec).message, JobSpec)
    assert isinstance(open_envelope(seal(ALICE, sample("bid")), Bid).message, Bid)


# ---- hostile input --------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_meshrun_error(data: bytes) -> None:
    with pytest.raises(MeshrunError):
        open_envelope(data)


_ANY = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=80)
)


@settings(max_examples=200)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": _ANY | st.just(1),
            "t": _ANY | st.sampled_from(KINDS),
            "p": _ANY | st.builds(encoding.encode, st.dictionaries(st.text(max_size=8), _ANY)),
            "k": _ANY | st.binary(min_size=32, max_size=32),
            "s": _ANY | st.binary(min_size=64, max_size=64),
            "x": _ANY,
        },
    )
)
def test_arbitrary_envelope_shaped_maps_only_raise_meshrun_error(fields: dict[str, Any]) -> None:
    with pytest.raises(MeshrunError):
        open_envelope(encoding.encode(fields))


@settings(max_examples=100)
@given(st.sampled_from(KINDS), st.dictionaries(st.text(max_size=12), _ANY, max_size=8))
def test_correctly_signed_arbitrary_payloads_only_raise_meshrun_error(
    kind: str, body: dict[str, Any]
) -> None:
    """A genuine signer can still send rubbish; it must fail as a MeshrunError."""
    try:
        opened = open_envelope(signed(ALICE, kind, encoding.encode(body)))
    except MeshrunError:
        return
    assert opened.signer == ALICE.peer_id  # only possible if the body happened to be valid


def test_opening_the_same_bytes_again_is_a_lookup_with_the_same_answers() -> None:
    """The memo (a validator and then a handler open the same gossip) changes no verdict."""
    import crypto.envelope as module

    data = seal(ALICE, sample("bid"))
    first = open_envelope(data, Bid)
    assert open_envelope(data, Bid) is first
    assert open_envelope(bytes(bytearray(data))) is first  # equal bytes, another object
    with pytest.raises(MeshrunError) as err:
        open_envelope(data, JobSpec)  # remembered, and still the wrong type
    assert err.value.code is ErrorCode.MALFORMED_MESSAGE
    assert "expected a jobspec message, got bid" in err.value.message
    fields = outer(data)
    fields["s"] = bytes([fields["s"][0] ^ 1]) + fields["s"][1:]
    for _ in range(2):  # failures are never remembered
        with pytest.raises(MeshrunError) as err:
            open_envelope(envelope(**fields), Bid)
        assert err.value.code is ErrorCode.SIGNATURE_INVALID
    for i in range(module.MEMO_ENTRIES + 5):
        open_envelope(seal(ALICE, sample("bid").model_copy(update={"price": float(i)})))
    assert len(module._memo) == module.MEMO_ENTRIES
    assert (data, encoding.MAX_MESSAGE_BYTES) not in module._memo  # the oldest went first

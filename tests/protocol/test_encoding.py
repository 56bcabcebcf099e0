"""Canonical CBOR (protocol.encoding): round trips, determinism and every rejection path."""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol import encoding
from protocol.encoding import MAX_DEPTH, MAX_ITEMS, MAX_MESSAGE_BYTES, decode, encode
from protocol.errors import ErrorCode, MeshrunError

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = (
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Structural equality that also tells 1 from 1.0 from True and -0.0 from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def rejects(data: bytes, code: ErrorCode = ErrorCode.MALFORMED_MESSAGE) -> MeshrunError:
    with pytest.raises(MeshrunError) as info:
        decode(data)
    assert info.value.code == code, info.value
    return info.value


def nested_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# ---- round trips and determinism ----------------------------------------------------------


@given(VALUES)
def test_round_trip_is_exact(value: Any) -> None:
    data = encode(value)
    back = decode(data)
    assert same(back, value)
    assert encode(back) == data


@given(VALUES)
def test_encoding_is_cbor2_canonical(value: Any) -> None:
    assert encode(value) == cbor2.dumps(value, canonical=True)


@given(st.dictionaries(st.text(max_size=8), SCALARS, max_size=12), st.randoms())
def test_key_order_does_not_change_bytes(mapping: dict[str, Any], rnd: Any) -> None:
    items = list(mapping.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    reversed_ = dict(reversed(items))
    assert encode(mapping) == encode(shuffled) == encode(reversed_)


@settings(max_examples=50)
@given(VALUES, st.randoms())
def test_nested_key_order_does_not_change_bytes(value: Any, rnd: Any) -> None:
    def reorder(value: Any) -> Any:
        if isinstance(value, dict):
            items = [(k, reorder(v)) for k, v in value.items()]
            rnd.shuffle(items)
            return dict(items)
        if isinstance(value, list):
            return [reorder(v) for v in value]
        return value

    assert encode(reorder(value)) == encode(value)


def test_known_bytes() -> None:
    assert encode({"b": 1, "aa": 2, "a": 3}) == bytes.fromhex("a3616103616201626161" + "02")
    assert encode(1.0) == b"\xf9\x3c\x00"  # shortest float form
    assert encode(24) == b"\x18\x18"
    assert encode(True) == b"\xf5" and encode(1) == b"\x01"


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 0, -1, 2**63, 2**32])
def test_integer_range_edges_accepted(value: int) -> None:
    assert decode(encode(value)) == value


def test_max_depth_and_items_exactly_at_limit_accepted() -> None:
    deep = nested_list(MAX_DEPTH)
    assert decode(encode(deep)) == deep
    wide = list(range(MAX_ITEMS))
    assert decode(encode(wide)) == wide
    big_map = {f"k{i}": i for i in range(MAX_ITEMS)}
    assert decode(encode(big_map)) == big_map


def test_message_at_size_limit_accepted() -> None:
    head = len(encode(b"\x00" * MAX_MESSAGE_BYTES)) - MAX_MESSAGE_BYTES
    value = b"\x00" * (MAX_MESSAGE_BYTES - head)
    data = encode(value)
    assert len(data) == MAX_MESSAGE_BYTES
    assert decode(data) == value


# ---- rejections: encode side --------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        2**64,
        -(2**63) - 1,
        (1, 2),
        {1, 2},
        {1: "a"},
        {("a",): 1},
        {b"a": 1},
        object(),
        nested_list(MAX_DEPTH + 1),
        list(range(MAX_ITEMS + 1)),
        {str(i): 0 for i in range(MAX_ITEMS + 1)},
        {"a": [{"b": {2: 3}}]},
        bytearray(b"x"),
    ],
    ids=lambda v: type(v).__name__ + repr(v)[:24],
)
def test_encode_rejects_disallowed_values(value: Any) -> None:
    with pytest.raises(MeshrunError) as info:
        encode(value)
    assert info.value.code == ErrorCode.MALFORMED_MESSAGE


# ---- rejections: decode side --------------------------------------------------------------


def test_oversize_rejected_before_decoding() -> None:
    data = encode(b"\x00" * MAX_MESSAGE_BYTES)
    assert len(data) > MAX_MESSAGE_BYTES
    err = rejects(data, ErrorCode.MESSAGE_TOO_LARGE)
    assert str(MAX_MESSAGE_BYTES) in err.message
    # The check is on length alone: even garbage gets MESSAGE_TOO_LARGE, not a parse error.
    rejects(b"\xff" * (MAX_MESSAGE_BYTES + 1), ErrorCode.MESSAGE_TOO_LARGE)


def test_custom_max_bytes() -> None:
    data = encode("x" * 100)
    with pytest.raises(MeshrunError) as info:
        decode(data, max_bytes=50)
    assert info.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert decode(data, max_bytes=len(data)) == "x" * 100


@pytest.mark.parametrize(
    "hexdata",
    [
        "c6 01",  # unknown tag 6 (tag_hook)
        "c2 41 01",  # bignum 1
        "c1 1a 00 00 00 01",  # epoch datetime
        "c0 74 32 30 32 30 2d 30 31 2d 30 31 54 30 30 3a 30 30 3a 30 30 5a",  # datetime
        "d9 d9 f7 01",  # self-describe CBOR around 1
        "d8 1c 80",  # shareable []
        "d9 01 02 82 01 02",  # set {1, 2}
        "c4 82 21 19 6a b3",  # decimal fraction
        "d8 20 6a 68 74 74 70 3a 2f 2f 78 2e 79",  # URI
    ],
)
def test_tags_rejected(hexdata: str) -> None:
    rejects(bytes.fromhex(hexdata.replace(" ", "")))


@pytest.mark.parametrize(
    "hexdata",
    [
        "a1 01 02",  # {1: 2}
        "a1 41 61 01",  # {b"a": 1}
        "a1 81 01 02",  # {[1]: 2}
        "a1 f6 01",  # {None: 1}
        "a1 f5 01",  # {True: 1}
        "a1 f9 3c 00 01",  # {1.0: 1}
        "81 a1 01 02",  # nested
    ],
)
def test_non_string_keys_rejected(hexdata: str) -> None:
    err = rejects(bytes.fromhex(hexdata.replace(" ", "")))
    assert "keys" in err.message


def test_too_deep_rejected() -> None:
    data = cbor2.dumps(nested_list(MAX_DEPTH + 1))
    err = rejects(data)
    assert "deeper" in err.message
    # Far deeper than cbor2's own limit: still a clean MeshrunError, no RecursionError.
    rejects(b"\x81" * 200_000 + b"\x00")
    rejects(b"\xa1\x61\x61" * 50_000 + b"\x00")


def _walk_reference(value: Any, depth: int) -> None:
    """The walk as first written (an isinstance chain): the faster one must agree."""
    if depth > MAX_DEPTH:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "nesting deeper")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value <= 2**64 - 1:
            raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "integer out of 64-bit range")
        return
    if isinstance(value, list):
        for item in value:
            _walk_reference(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "map keys must be strings")
            _walk_reference(item, depth + 1)
        return
    raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "not allowed")


ANY_VALUES = st.recursive(
    SCALARS | st.integers() | st.sampled_from([ErrorCode.TIMEOUT, 1j, object()]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=3) | st.integers(0, 3), children, max_size=3)
        | st.builds(lambda x: [[[[[[x]]]]]], children)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(ANY_VALUES)
@example(nested_list(MAX_DEPTH))
@example(nested_list(MAX_DEPTH + 1))
@example([[[[[[[[[[[[[[[[{"k": "leaf"}]]]]]]]]]]]]]]]])
@example([[[[[[[[[[[[[[[[["leaf"]]]]]]]]]]]]]]]]])
def test_the_walk_accepts_exactly_what_the_isinstance_walk_did(value: Any) -> None:
    try:
        _walk_reference(value, 0)
        expected = None
    except MeshrunError as exc:
        expected = exc.message.split()[0]
    try:
        encoding._check(value, 0)
        got = None
    except MeshrunError as exc:
        got = exc.message.split()[0]
    assert (got is None) == (expected is None), (value, got, expected)


def test_too_many_items_rejected() -> None:
    err = rejects(cbor2.dumps([0] * (MAX_ITEMS + 1)))
    assert "list" in err.message
    err = rejects(cbor2.dumps({f"k{i}": 0 for i in range(MAX_ITEMS + 1)}, canonical=True))
    assert "map" in err.message


@pytest.mark.parametrize(
    "hexdata",
    [
        "9b 00 00 00 10 00 00 00 00",  # array claiming 2**36 items
        "bb 00 00 00 10 00 00 00 00",  # map claiming 2**36 pairs
        "5b 00 00 00 10 00 00 00 00",  # byte string claiming 64 GiB
        "7b ff ff ff ff ff ff ff ff",  # text string claiming 2**64-1 bytes
    ],
)
def test_huge_length_headers_fail_fast(hexdata: str) -> None:
    rejects(bytes.fromhex(hexdata.replace(" ", "")))


@pytest.mark.parametrize(
    "hexdata",
    [
        "3b ff ff ff ff ff ff ff ff",  # -2**64
        "3b 80 00 00 00 00 00 00 00",  # -2**63 - 1
    ],
)
def test_ints_outside_allowed_range_rejected(hexdata: str) -> None:
    err = rejects(bytes.fromhex(hexdata.replace(" ", "")))
    assert "range" in err.message


@pytest.mark.parametrize(
    "hexdata",
    [
        "a2 61 62 01 61 61 02",  # {"b": 1, "a": 2}: keys out of order
        "a2 62 61 61 01 61 62 02",  # {"aa": 1, "b": 2}: longer key first
        "a2 61 61 01 61 61 02",  # duplicate key
        "18 01",  # 1 in a one-byte-argument form
        "19 00 01",  # 1 in two bytes
        "1a 00 00 00 01",  # 1 in four bytes
        "1b 00 00 00 00 00 00 00 01",  # 1 in eight bytes
        "38 00",  # -1 in a longer form
        "59 00 01 61",  # b"a" with a two-byte length
        "78 01 61",  # "a" with a one-byte length
        "98 01 01",  # [1] with a one-byte length
        "b8 01 61 61 01",  # {"a": 1} with a one-byte length
        "9f 01 ff",  # indefinite-length array
        "bf 61 61 01 ff",  # indefinite-length map
        "7f 61 61 ff",  # indefinite-length text
        "5f 41 61 ff",  # indefinite-length bytes
        "fb 3f f0 00 00 00 00 00 00",  # 1.0 as a double
        "fa 3f 80 00 00",  # 1.0 as a single
        "fb 7f f8 00 00 00 00 00 00",  # NaN as a double
        "f9 7e 01",  # NaN with a payload
        "f8 14",  # false as a two-byte simple value (invalid per RFC 8949)
    ],
)
def test_non_canonical_encodings_rejected(hexdata: str) -> None:
    rejects(bytes.fromhex(hexdata.replace(" ", "")))


@given(st.dictionaries(st.text(min_size=1, max_size=6), INT64, min_size=2, max_size=8))
def test_non_canonically_ordered_map_rejected(mapping: dict[str, int]) -> None:
    canonical_order = sorted(mapping, key=lambda k: (len(k.encode()), k.encode()))
    backwards = dict((k, mapping[k]) for k in reversed(canonical_order))
    data = cbor2.dumps(backwards)  # cbor2 keeps insertion order when not canonical
    rejects(data)
    assert decode(encode(backwards)) == mapping


@given(INT64)
def test_ints_in_longer_forms_rejected(value: int) -> None:
    canonical = encode(value)
    major = 0x00 if value >= 0 else 0x20
    argument = value if value >= 0 else -1 - value
    forms = [
        (0x18, ">B", 2**8),
        (0x19, ">H", 2**16),
        (0x1A, ">I", 2**32),
        (0x1B, ">Q", 2**64),
    ]
    for info, fmt, limit in forms:
        if argument < limit:
            longer = bytes([major | info]) + struct.pack(fmt, argument)
            if longer != canonical:
                rejects(longer)


@pytest.mark.parametrize(
    "hexdata",
    ["f7", "f0", "f8 ff", "f8 20"],  # undefined, simple(16), simple(255), simple(32)
)
def test_disallowed_simple_values_rejected(hexdata: str) -> None:
    rejects(bytes.fromhex(hexdata.replace(" ", "")))


@pytest.mark.parametrize(
    "hexdata",
    [
        "",
        "ff",  # lone break
        "1c",  # reserved additional info
        "61",  # truncated text
        "62 c3 28",  # invalid UTF-8
        "63 ed a0 80",  # UTF-8-encoded surrogate
        "01 01",  # trailing data
        "82 01",  # truncated array
        "a1 61 61",  # map missing a value
    ],
)
def test_malformed_cbor_rejected(hexdata: str) -> None:
    rejects(bytes.fromhex(hexdata.replace(" ", "")))


@settings(max_examples=500)
@given(st.binary(max_size=64))
@example(b"\x81" * 1000)
@example(b"\xd9\xd9\xf7")
def test_garbage_only_raises_meshrun_error(data: bytes) -> None:
    try:
        value = decode(data)
    except MeshrunError as exc:
        assert exc.code == ErrorCode.MALFORMED_MESSAGE
    else:
        assert encode(value) == data  # anything accepted is canonical


@given(VALUES, st.data())
def test_mutated_encodings_only_raise_meshrun_error(value: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(value))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            back = decode(candidate)
        except MeshrunError:
            continue
        assert encode(back) == candidate


def test_module_limits_are_sane() -> None:
    assert encoding.MAX_MESSAGE_BYTES == 256 * 1024
    assert MAX_DEPTH >= 8 and MAX_ITEMS >= 1024

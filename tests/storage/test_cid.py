from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.cid import (
    DAG_PB,
    RAW,
    SHA2_256,
    Cid,
    InvalidCid,
    VarintError,
    cid_for_raw,
    decode_uvarint,
    encode_uvarint,
    sha256_multihash,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "cid_vectors.json").read_text())["vectors"]
HELLO_RAW = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"  # b"hello" (well known)


def test_known_raw_cid_of_hello() -> None:
    cid = cid_for_raw(b"hello")
    assert str(cid) == HELLO_RAW
    assert cid.version == 1 and cid.codec == RAW and cid.hash_code == SHA2_256
    assert cid.digest == hashlib.sha256(b"hello").digest()


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_cids_round_trip(vec: dict[str, str]) -> None:
    for field in ("cidv0", "cidv1_raw_leaves", "cidv1_default_leaves"):
        text = vec[field]
        cid = Cid.decode(text)
        assert cid.encode() == text
        assert Cid.from_bytes(cid.to_bytes()) == cid
        assert Cid.decode(cid.encode("base58btc")) == cid
    v0 = Cid.decode(vec["cidv0"])
    assert v0.version == 0 and v0.codec == DAG_PB
    assert v0.to_bytes() == v0.multihash and len(v0.to_bytes()) == 34
    assert v0.to_v1().version == 1 and v0.to_v1().encode().startswith("bafybei")


def test_v1_base58_form_matches_js_ipfs_style() -> None:
    cid = Cid.decode(HELLO_RAW)
    z = cid.encode("base58btc")
    assert z.startswith("zb2")
    assert Cid.decode(z) == cid
    assert Cid.decode(HELLO_RAW.upper()) == cid


def test_verify() -> None:
    cid = cid_for_raw(b"abc")
    assert cid.verify(b"abc")
    assert not cid.verify(b"abd")
    blake = Cid(1, RAW, bytes([0xA0, 0xE4, 0x02, 0x20]) + bytes(32))
    with pytest.raises(InvalidCid, match="unsupported hash"):
        blake.verify(b"abc")
    truncated = Cid(1, RAW, bytes([SHA2_256, 4]) + hashlib.sha256(b"abc").digest()[:4])
    with pytest.raises(InvalidCid, match="truncated"):
        truncated.verify(b"abc")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "Qm123",  # v0 prefix, wrong length
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ0",  # '0' not in base58
        "mAXASIA",  # base64 multibase: not supported
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4ye",  # truncated
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yer",  # non-canonical tail
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeqaa",  # trailing bytes
        "b1234",
        "z" + "1" * 10,
        "zQmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",  # v0 bytes behind a multibase prefix
    ],
)
def test_decode_rejects(text: str) -> None:
    with pytest.raises(InvalidCid):
        Cid.decode(text)


def test_invalid_cid_is_value_error() -> None:
    with pytest.raises(ValueError, match="expected base32"):
        Cid.decode("xyz")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02\x55" + sha256_multihash(b""),  # version 2
        b"\x01\x55\x12\x20" + bytes(31),  # short digest
        b"\x01\x55\x12\x20" + bytes(33),  # long digest
        b"\x01\xd5",  # truncated varint
        b"\x01\x80\x00\x12\x20" + bytes(32),  # non-minimal codec varint
    ],
)
def test_from_bytes_rejects(raw: bytes) -> None:
    with pytest.raises(InvalidCid):
        Cid.from_bytes(raw)


def test_constructor_validates() -> None:
    with pytest.raises(InvalidCid):
        Cid(2, RAW, sha256_multihash(b""))
    with pytest.raises(InvalidCid):
        Cid(0, RAW, sha256_multihash(b""))
    with pytest.raises(InvalidCid):
        Cid(1, RAW, b"\x12\x20")
    with pytest.raises(InvalidCid, match="CIDv0"):
        Cid(0, DAG_PB, sha256_multihash(b"")).encode("base32")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(n: int) -> None:
    enc = encode_uvarint(n)
    assert decode_uvarint(enc + b"tail") == (n, len(enc))


def test_varint_rejects() -> None:
    for bad in (b"", b"\x80", b"\x80\x00", b"\xff" * 10):
        with pytest.raises(VarintError):
            decode_uvarint(bad)


@given(
    st.sampled_from([0, 1]),
    st.sampled_from([RAW, DAG_PB, 0x71, 0x0129, 300000]),
    st.binary(min_size=32, max_size=32),
)
def test_cid_round_trip(version: int, codec: int, digest: bytes) -> None:
    if version == 0:
        codec = DAG_PB
    cid = Cid(version, codec, bytes([SHA2_256, 32]) + digest)
    assert Cid.decode(str(cid)) == cid
    assert Cid.from_bytes(cid.to_bytes()) == cid
    if version == 1:
        assert str(cid).startswith("b")
        assert Cid.decode(cid.encode("base58btc")) == cid
    assert repr(cid) == f"Cid({str(cid)!r})"
    assert cid.to_v1().to_v1() == cid.to_v1()

"""Node identity (crypto.keys): PeerIDs pinned against py-libp2p, base58, key files, signatures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from crypto.keys import (
    KEY_FILE_NAME,
    Identity,
    b58decode,
    b58encode,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)

seeds = st.binary(min_size=32, max_size=32)


def libp2p_peer_id(seed: bytes) -> str:
    try:
        key = Ed25519PrivateKey.new(seed)
    except ValueError:  # py-libp2p refuses the (astronomically rare) small-order keys
        assume(False)
        raise
    return str(ID.from_pubkey(key.get_public_key()).to_base58())


# ---- PeerIDs --------------------------------------------------------------------------------


@settings(max_examples=200)
@given(seeds)
@example(bytes(32))
@example(b"\xff" * 32)
@example(bytes(range(32)))
def test_peer_id_matches_libp2p(seed: bytes) -> None:
    identity = Identity(seed)
    assert identity.peer_id == libp2p_peer_id(seed)
    assert identity.peer_id.startswith("12D3KooW")
    assert len(identity.peer_id) == 52


def test_known_peer_id() -> None:
    assert Identity(bytes(range(32))).peer_id == (
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    )


def test_libp2p_key_pair_matches_ours() -> None:
    seed = b"\x42" * 32
    key = Ed25519PrivateKey.new(seed)
    ours = Identity(seed)
    assert key.get_public_key().to_bytes() == ours.public_key
    message = b"meshrun"
    assert verify_signature(ours.public_key, message, key.sign(message))
    assert key.get_public_key().verify(message, ours.sign(message))


@given(seeds)
def test_public_key_round_trips_through_peer_id(seed: bytes) -> None:
    identity = Identity(seed)
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_peer_id_needs_a_32_byte_key(size: int) -> None:
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\x01" * size)


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "1",
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",  # sha2-256 (RSA-era) PeerID
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeS",  # one character short
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSBB",  # one too many
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeS0",  # 0 is not base58
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSl",  # nor is l
    ],
)
def test_public_key_from_bad_peer_id(peer_id: str) -> None:
    with pytest.raises(ValueError):
        public_key_from_peer_id(peer_id)


def test_public_key_from_peer_id_of_another_key_type() -> None:
    # A secp256k1-shaped identity multihash (KeyType 2) is not an Ed25519 PeerID.
    raw = b"\x00\x25" + b"\x08\x02\x12\x21" + b"\x02" + b"\x11" * 32
    with pytest.raises(ValueError, match="Ed25519"):
        public_key_from_peer_id(b58encode(raw))


# ---- base58 ---------------------------------------------------------------------------------


@given(st.binary(max_size=64))
@example(b"")
@example(b"\x00")
@example(b"\x00\x00\x00\x01")
@example(b"\x00\x00\xff")
def test_b58_round_trip(data: bytes) -> None:
    text = b58encode(data)
    assert b58decode(text) == data
    zeros = len(data) - len(data.lstrip(b"\x00"))
    assert text[:zeros] == "1" * zeros
    assert set(text) <= set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


@given(st.integers(0, 8), st.binary(min_size=1, max_size=32))
def test_b58_keeps_leading_zeros(zeros: int, body: bytes) -> None:
    data = b"\x00" * zeros + body
    assert b58decode(b58encode(data)) == data


@given(st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", max_size=60))
def test_b58_text_round_trip(text: str) -> None:
    assert b58encode(b58decode(text)) == text


def test_b58_known_vectors() -> None:
    # Bitcoin's base58 test vectors.
    assert b58encode(b"") == ""
    assert b58encode(b"\x61") == "2g"
    assert b58encode(b"\x62\x62\x62") == "a3gV"
    assert b58encode(b"Hello World!") == "2NEpo7TZRRrLZSi2U"
    assert b58encode(bytes.fromhex("00000000000000000000")) == "1111111111"
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    raw = "000111d38e5fc9071ffcd20b4a763cc9ae4f252bb4e48fd66a835e252ada93ff480d6dd43dc62a641155a5"
    assert b58encode(bytes.fromhex(raw)) == alphabet


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "+", " 1", "é"])
def test_b58_rejects_characters_outside_the_alphabet(bad: str) -> None:
    with pytest.raises(ValueError):
        b58decode(bad)


# ---- signatures -----------------------------------------------------------------------------


@given(seeds, st.binary(max_size=200))
def test_sign_verify_round_trip(seed: bytes, message: bytes) -> None:
    identity = Identity(seed)
    signature = identity.sign(message)
    assert len(signature) == 64
    assert verify_signature(identity.public_key, message, signature)
    assert identity.sign(message) == signature  # deterministic


@given(seeds, seeds, st.binary(max_size=64))
def test_verify_false_on_wrong_key(seed_a: bytes, seed_b: bytes, message: bytes) -> None:
    assume(seed_a != seed_b)
    a, b = Identity(seed_a), Identity(seed_b)
    assert not verify_signature(b.public_key, message, a.sign(message))


@given(seeds, st.binary(max_size=64), st.integers(min_value=0), st.integers(1, 255))
def test_verify_false_on_tampered_message_or_signature(
    seed: bytes, message: bytes, position: int, xor: int
) -> None:
    identity = Identity(seed)
    signature = bytearray(identity.sign(message))
    signature[position % 64] ^= xor
    assert not verify_signature(identity.public_key, message, bytes(signature))
    if message:
        tampered = bytearray(message)
        tampered[position % len(message)] ^= xor
        assert not verify_signature(identity.public_key, bytes(tampered), identity.sign(message))


@pytest.mark.parametrize("size", [0, 1, 63, 65, 128])
def test_verify_false_on_wrong_length_signature(size: int) -> None:
    identity = Identity(b"\x05" * 32)
    good = identity.sign(b"m")
    signature = (good * 2)[:size]
    assert not verify_signature(identity.public_key, b"m", signature)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_verify_false_on_wrong_length_key(size: int) -> None:
    identity = Identity(b"\x05" * 32)
    assert not verify_signature(
        identity.public_key[:size].ljust(size, b"\0"), b"m", identity.sign(b"m")
    )


def test_verify_false_on_garbage_key() -> None:
    identity = Identity(b"\x05" * 32)
    for key in (b"\x00" * 32, b"\xff" * 32, b"\x01" + b"\x00" * 31):
        assert not verify_signature(key, b"m", identity.sign(b"m"))


# ---- identities and key files ---------------------------------------------------------------


def test_generate_gives_distinct_valid_identities() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert len(a.seed) == 32 and a.seed != b.seed and a.peer_id != b.peer_id
    assert verify_signature(a.public_key, b"x", a.sign(b"x"))


def test_repr_does_not_leak_the_seed() -> None:
    identity = Identity(b"\xab" * 32)
    text = repr(identity) + str(identity)
    assert "\\xab" not in text and "ab" * 4 not in text


def test_load_or_create_persists(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "node"
    first = Identity.load_or_create(data_dir)
    path = data_dir / KEY_FILE_NAME
    assert path.read_bytes() == first.seed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = Identity.load_or_create(data_dir)
    assert second.peer_id == first.peer_id and second == first
    assert sorted(p.name for p in data_dir.iterdir()) == [KEY_FILE_NAME]  # no temp file left


def test_load_or_create_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.load_or_create(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600


def test_load_existing_key_file(tmp_path: Path) -> None:
    seed = bytes(range(32))
    (tmp_path / KEY_FILE_NAME).write_bytes(seed)
    assert Identity.load_or_create(tmp_path) == Identity(seed)


@pytest.mark.parametrize("content", [b"", b"\x01" * 31, b"\x01" * 33, b"ab" * 32])
def test_corrupt_key_file_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(content)
    with pytest.raises(ValueError, match="32-byte Ed25519 seed") as info:
        Identity.load_or_create(tmp_path)
    assert str(path) in str(info.value) and str(len(content)) in str(info.value)
    assert path.read_bytes() == content  # a corrupt key is reported, never overwritten

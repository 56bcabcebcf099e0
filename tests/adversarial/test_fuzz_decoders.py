"""Fuzzing every decoder that reads a peer's bytes: each raises only its own error type.

A decoder that lets an IndexError, a RecursionError or an OverflowError
escape turns a malformed message into a crashed handler (or worse, a crashed
node). Each property below feeds arbitrary bytes and, more to the point,
valid inputs mutated byte by byte (flips, insertions, deletions,
truncations, splices), and asserts the decoder either gives a value or
raises its own error:

| decoder | own error |
|---|---|
| `crypto.envelope.open_envelope` (envelopes, every message type) | `MeshrunError` |
| `protocol.encoding.decode` (canonical CBOR) | `MeshrunError` |
| each message model over a decoded payload | pydantic `ValidationError` |
| `storage.car.CarReader` / `import_car` (CARv1) | `StorageError` |
| `node.executor.tensors.inspect_tensors` / `decode_tensors` (.npz) | `ValueError` |
| `node.content.blocks.decode_wants` / `decode_reply` (block exchange) | `MeshrunError` |

UnixFS/dag-pb blocks are fuzzed in tests/storage/test_fuzz_dag.py.
Example counts are bounded (the suite runs on 2 shared cores); the profile
in tests/conftest.py removes only the timing checks.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crypto.envelope import domain_tag, open_envelope, seal
from node.content.blocks import decode_reply, decode_wants, encode_reply, encode_wants
from node.executor.tensors import decode_tensors, encode_tensors, inspect_tensors
from protocol import encoding
from protocol.errors import MeshrunError
from protocol.messages import MESSAGE_TYPES
from storage.blockstore import MemoryBlockstore
from storage.car import CarReader, import_car, write_car
from storage.cid import Cid
from storage.errors import StorageError
from tests.protocol.test_messages import ALICE, sample, sample_fields

KINDS = sorted(MESSAGE_TYPES)

# ---- mutations ------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with 1-4 random edits: flip, set, insert, delete, truncate, duplicate."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x17, 0x18, 0x1B, 0x7F, 0x80, 0xBF, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "dup" and data:
            end = min(len(data), at + draw(st.integers(1, 64)))
            data[at:at] = data[at:end]
    return bytes(data)


def _envelope(kind: str) -> bytes:
    return seal(ALICE, sample(kind))


ENVELOPES = {kind: _envelope(kind) for kind in KINDS}

# CBOR values of every type the encoder allows, plus some it refuses.
_CBOR_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=24)
    | st.binary(max_size=48)
)
_CBOR = st.recursive(
    _CBOR_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# ---- envelopes ------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_open_as_nothing_but_meshrun_error(data: bytes) -> None:
    with pytest.raises(MeshrunError):
        open_envelope(data)


@settings(max_examples=300)
@given(st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), mutated(ENVELOPES[k]))))
def test_mutated_envelopes_of_every_type_raise_only_meshrun_error(case: tuple[str, bytes]) -> None:
    kind, data = case
    try:
        opened = open_envelope(data)
    except MeshrunError:
        return
    # The only way through is bytes that still carry ALICE's signature over this message.
    assert data == ENVELOPES[kind]
    assert opened.message == sample(kind)


@settings(max_examples=200)
@given(st.sampled_from(KINDS), st.sampled_from(KINDS), st.data())
def test_spliced_envelopes_raise_only_meshrun_error(a: str, b: str, data: st.DataObject) -> None:
    first, second = ENVELOPES[a], ENVELOPES[b]
    cut_a = data.draw(st.integers(0, len(first)))
    cut_b = data.draw(st.integers(0, len(second)))
    spliced = first[:cut_a] + second[cut_b:]
    try:
        open_envelope(spliced)
    except MeshrunError:
        return
    assert spliced in (first, second)


# ---- messages: canonical CBOR payloads and the models over them --------------------------------


def _decode_message(kind: str, payload: bytes) -> Any:
    """The payload decoder open_envelope runs, without the signature around it."""
    return MESSAGE_TYPES[kind].model_validate(encoding.decode(payload))


@settings(max_examples=300)
@given(st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), mutated(_payload(k)))))
def test_mutated_payloads_of_every_type_raise_only_their_decoders_errors(
    case: tuple[str, bytes],
) -> None:
    kind, payload = case
    try:
        message = _decode_message(kind, payload)
    except (MeshrunError, ValidationError):
        return
    assert isinstance(message, MESSAGE_TYPES[kind])
    again = encoding.encode(message.to_wire())  # what it says, it says canonically
    assert _decode_message(kind, again) == message


def _payload(kind: str) -> bytes:
    return encoding.encode(sample(kind).to_wire())


@st.composite
def _field_mutations(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid message of some kind with fields replaced, dropped or added."""
    kind = draw(st.sampled_from(KINDS))
    fields: dict[str, Any] = sample_fields(kind, ALICE.peer_id)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        name = draw(st.sampled_from(sorted(fields))) if fields else "x"
        if op == "replace":
            fields[name] = draw(_CBOR)
        elif op == "drop":
            fields.pop(name, None)
        else:
            fields[draw(st.text(min_size=1, max_size=12))] = draw(_CBOR)
    return kind, fields


@settings(max_examples=300)
@given(_field_mutations())
def test_correctly_signed_mutated_fields_of_every_type_raise_only_meshrun_error(
    case: tuple[str, dict[str, Any]],
) -> None:
    """The signer is genuine, the content is rubbish: still one error type."""
    kind, fields = case
    try:
        payload = encoding.encode(fields)
    except MeshrunError:
        return  # the encoder itself refuses what the wire cannot carry (ints over 64 bits)
    envelope = encoding.encode(
        {
            "v": 1,
            "t": kind,
            "p": payload,
            "k": ALICE.public_key,
            "s": ALICE.sign(domain_tag(kind) + payload),
        }
    )
    try:
        opened = open_envelope(envelope)
    except MeshrunError:
        return
    # Only a payload the model accepts (rubbish in unknown or optional places is refused,
    # defaults may be left out) opens, and then as the signer's own message.
    assert opened.signer == ALICE.peer_id == opened.message.signer()
    assert isinstance(opened.message, MESSAGE_TYPES[kind])


@settings(max_examples=300)
@given(st.binary(max_size=400) | _CBOR.map(lambda v: _raw_cbor(v)))
def test_canonical_cbor_decoder_raises_only_meshrun_error(data: bytes) -> None:
    try:
        value = encoding.decode(data)
    except MeshrunError:
        return
    assert encoding.encode(value) == data


def _raw_cbor(value: Any) -> bytes:
    import cbor2

    return bytes(cbor2.dumps(value))


# ---- CAR --------------------------------------------------------------------------------------


def _car() -> bytes:
    store = MemoryBlockstore()
    tree = store.add_tree(
        {"output.json": b'{"ok": true}', "outputs/y.npy": b"\x93NUMPY" + bytes(range(200))}
    )
    out = io.BytesIO()
    write_car(store.get, [tree], out)
    return out.getvalue()


CAR = _car()


def _read_car(data: bytes) -> list[tuple[Cid, bytes]]:
    return list(CarReader(io.BytesIO(data)))


@settings(max_examples=300)
@given(st.binary(max_size=600) | mutated(CAR))
def test_car_reader_raises_only_storage_errors(data: bytes) -> None:
    try:
        blocks = _read_car(data)
    except StorageError:
        return
    for cid, block in blocks:  # whatever it yields was verified against its CID
        assert cid.verify(block)


@settings(max_examples=150)
@given(mutated(CAR), st.integers(0, 4096))
def test_car_import_raises_only_storage_errors(data: bytes, limit: int) -> None:
    store = MemoryBlockstore()
    try:
        result = import_car(store, io.BytesIO(data), max_bytes=limit)
    except StorageError:
        return
    assert result.bytes <= limit


# ---- .npz tensor bundles ---------------------------------------------------------------------


NPZ = encode_tensors(
    {
        "x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "ids": np.arange(5, dtype=np.int64),
        "flag": np.array(True),
    }
)


def _npz_with_header(header: bytes, body: bytes = b"") -> bytes:
    """One member whose .npy header (after the magic) is whatever a peer wrote."""
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", raw)
    return out.getvalue()


_HEADER_PARTS = st.sampled_from(
    [
        "{",
        "}",
        "'descr': ",
        "'fortran_order': ",
        "'shape': ",
        "'<f4'",
        "'|O'",
        "'<U99999999'",
        "'V0'",
        "[('a', '<f4')]",
        "True",
        "False",
        "(",
        ")",
        ", ",
        "-1",
        "0",
        "3",
        "99999999999999999999",
        "2**62",
        "__import__('os')",
        "1e309",
        "'",
        "\n",
        " ",
    ]
)


def _zip_with_an_unnamed_member() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(zipfile.ZipInfo(""), b"\x93NUMPY")
    return out.getvalue()


@settings(max_examples=300)
@given(st.binary(max_size=600) | mutated(NPZ))
@example(_zip_with_an_unnamed_member())  # zipfile: IndexError in ZipInfo.is_dir()
def test_npz_reader_raises_only_value_error(data: bytes) -> None:
    for read in (inspect_tensors, decode_tensors):
        try:
            read(data, max_bytes=1 << 20)
        except ValueError:
            continue


@settings(max_examples=300)
@given(st.lists(_HEADER_PARTS, max_size=16).map("".join), st.binary(max_size=64))
@example("{", b"")  # numpy's header parser: tokenize.TokenError
@example("{{}}", b"")  # numpy's header parser: TypeError (unhashable dict)
def test_npy_headers_written_by_a_peer_raise_only_value_error(header: str, body: bytes) -> None:
    data = _npz_with_header(header.encode("latin-1", "replace"), body)
    for read in (inspect_tensors, decode_tensors):
        try:
            tensors = read(data, max_bytes=1 << 20)
        except ValueError:
            continue
        assert isinstance(tensors, dict)


# ---- block exchange frames --------------------------------------------------------------------


_WANTS = encode_wants([Cid.decode(str(MemoryBlockstore().add_bytes(b"some block")))])
_REPLY = b"".join(encode_reply(Cid.decode(str(MemoryBlockstore().add_bytes(b"b"))), b"b"))


@settings(max_examples=300)
@given(st.binary(max_size=200) | mutated(_WANTS) | mutated(_REPLY))
def test_block_exchange_frames_raise_only_meshrun_error(data: bytes) -> None:
    for decode in (decode_wants, decode_reply):
        try:
            decode(data)
        except MeshrunError:
            continue

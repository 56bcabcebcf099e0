"""Canonical CBOR for everything that is signed or hashed, with limits checked
before and after decoding.

Signatures and job ids are computed over bytes, so two nodes must turn the same
message into the same bytes: RFC 8949 core deterministic encoding (cbor2's
``canonical=True``: shortest forms, sorted map keys). Decoding untrusted bytes is
where a peer can hurt us, so size is checked before cbor2 sees them and the
decoded value is walked for allowed types, depth and lengths after.
"""

from __future__ import annotations

from typing import Any

import cbor2

from protocol.errors import ErrorCode, MeshrunError

MAX_MESSAGE_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_ITEMS = 4096
_MAX_INT = 2**64 - 1
_MIN_INT = -(2**63)

CborValue = Any


def encode(value: CborValue) -> bytes:
    """Deterministic bytes for a value made of dict/list/str/bytes/int/float/bool/None."""
    _check(value, 0)
    return cbor2.dumps(value, canonical=True)


def _reject_tag(_decoder: object, tag: object) -> object:
    raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "CBOR tags are not allowed")


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> CborValue:
    """Decode untrusted bytes, raising MeshrunError (never anything else) when they are bad."""
    if len(data) > max_bytes:
        raise MeshrunError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message of {len(data)} bytes exceeds the limit of {max_bytes}",
        )
    try:
        value = cbor2.loads(data, tag_hook=_reject_tag)
    except MeshrunError:
        raise
    except Exception as exc:  # cbor2 raises many types on garbage; all mean the same here
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"not valid CBOR: {exc}") from exc
    _check(value, 0)
    if cbor2.dumps(value, canonical=True) != data:  # encode() would walk it again
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "CBOR is not in canonical form")
    return value


# Exact types cbor2 decodes to, tested by identity first: every envelope a node
# opens is walked here, and an isinstance chain per item was a third of opening one.
_LEAVES = frozenset({type(None), bool, str, bytes, float})


_KINDS = _LEAVES | {int, list, dict}


def _kind(value: CborValue) -> type:
    """The allowed type a subclass (an IntEnum a model dumps, say) counts as, or refused."""
    for base in (bool, str, bytes, float, int, list, dict):
        if isinstance(value, base):
            return base
    raise MeshrunError(
        ErrorCode.MALFORMED_MESSAGE, f"type {type(value).__name__} is not allowed on the wire"
    )


def _check(value: CborValue, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"nesting deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind not in _KINDS:
        kind = _kind(value)
    if kind in _LEAVES:
        return
    if kind is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "integer out of 64-bit range")
        return
    # An item of a container at the deepest level would itself be too deep.
    deepest = depth >= MAX_DEPTH
    if kind is dict:
        if len(value) > MAX_ITEMS:
            raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"map larger than {MAX_ITEMS}")
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "map keys must be strings")
            if deepest or type(item) not in _LEAVES:
                _check(item, depth + 1)
        return
    if len(value) > MAX_ITEMS:  # a list: _kind allows nothing else
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"list longer than {MAX_ITEMS}")
    for item in value:
        if deepest or type(item) not in _LEAVES:
            _check(item, depth + 1)

"""Content identifiers (CIDs) as a small typed value.

The installed py-cid / py-multibase / py-multihash packages are untyped and
pull in a lot of machinery for the two encodings we actually need, so the
varint, base32 (via the stdlib) and base58btc codecs live here: they are a
few dozen lines and keep `mypy --strict` meaningful for every caller.

Only the CIDs meshrun produces or must interoperate with are in scope:
CIDv0 (base58btc "Qm...", dag-pb + sha2-256) and CIDv1 in base32 ("b...",
what Kubo prints) or base58btc ("z...", what js-ipfs prints by default).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Literal

from protocol.base58 import b58decode, b58encode
from storage.errors import InvalidCid

__all__ = [
    "DAG_PB",
    "IDENTITY",
    "RAW",
    "SHA2_256",
    "Cid",
    "InvalidCid",
    "VarintError",
    "cid_for_raw",
    "decode_uvarint",
    "encode_uvarint",
    "sha256_multihash",
]

RAW = 0x55
DAG_PB = 0x70
SHA2_256 = 0x12
IDENTITY = 0x00

_SHA256_LEN = 32
# The multiformats unsigned-varint spec caps varints at 9 bytes (63 bits).
_MAX_VARINT_BYTES = 9


class VarintError(ValueError):
    """A truncated, overlong or non-minimal unsigned varint."""


def encode_uvarint(value: int) -> bytes:
    """LEB128 as used by both multiformats and protobuf (they agree for uint64)."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(
    buf: bytes | memoryview, pos: int = 0, max_bytes: int = _MAX_VARINT_BYTES
) -> tuple[int, int]:
    """Return (value, position after it).

    Non-minimal encodings are rejected: two byte strings naming one CID would
    defeat comparing CIDs as bytes.
    """
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise VarintError("truncated varint")
        if pos - start >= max_bytes:
            raise VarintError(f"varint longer than {max_bytes} bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and pos - start > 1:
                raise VarintError("non-minimal varint")
            return value, pos


def _b58encode(data: bytes) -> str:
    return b58encode(data)


def _b58decode(text: str) -> bytes:
    try:
        return b58decode(text)
    except ValueError as exc:
        raise InvalidCid(f"invalid base58btc: {exc}") from None


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        data = base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise InvalidCid(f"invalid base32: {exc}") from None
    # The stdlib ignores non-zero trailing bits; insist on the canonical form.
    if _b32encode(data) != text.lower():
        raise InvalidCid("non-canonical base32 encoding")
    return data


def _parse_multihash(mh: bytes) -> tuple[int, bytes]:
    try:
        code, pos = decode_uvarint(mh)
        length, pos = decode_uvarint(mh, pos)
    except VarintError as exc:
        raise InvalidCid(f"bad multihash: {exc}") from None
    digest = mh[pos:]
    if len(digest) != length:
        raise InvalidCid(f"multihash declares {length} digest bytes but has {len(digest)}")
    return code, digest


@dataclass(frozen=True, slots=True)
class Cid:
    """A CID; equality and hashing are by (version, codec, multihash).

    A v0 CID and the v1 dag-pb CID with the same multihash name the same
    block but are different values here, as in every IPFS implementation;
    use `to_v1()` to compare by content.
    """

    version: int
    codec: int
    multihash: bytes

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise InvalidCid(f"unsupported CID version {self.version}")
        if self.codec < 0:
            raise InvalidCid(f"invalid codec {self.codec}")
        code, digest = _parse_multihash(self.multihash)
        if self.version == 0 and (
            self.codec != DAG_PB or code != SHA2_256 or len(digest) != _SHA256_LEN
        ):
            raise InvalidCid("CIDv0 must be dag-pb with a 32-byte sha2-256 multihash")

    @property
    def hash_code(self) -> int:
        return _parse_multihash(self.multihash)[0]

    @property
    def digest(self) -> bytes:
        return _parse_multihash(self.multihash)[1]

    def to_v1(self) -> Cid:
        return self if self.version == 1 else Cid(1, self.codec, self.multihash)

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return encode_uvarint(1) + encode_uvarint(self.codec) + self.multihash

    def encode(self, base: Literal["base32", "base58btc"] | None = None) -> str:
        """Kubo's text form by default: base32 for v1, bare base58btc for v0."""
        if self.version == 0:
            if base not in (None, "base58btc"):
                raise InvalidCid("CIDv0 only has a base58btc text form")
            return _b58encode(self.multihash)
        if base is None or base == "base32":
            return "b" + _b32encode(self.to_bytes())
        return "z" + _b58encode(self.to_bytes())

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"Cid({self.encode()!r})"

    @classmethod
    def from_bytes(cls, data: bytes) -> Cid:
        data = bytes(data)
        if len(data) == 2 + _SHA256_LEN and data[0] == SHA2_256 and data[1] == _SHA256_LEN:
            return cls(0, DAG_PB, data)
        try:
            version, pos = decode_uvarint(data)
            codec, pos = decode_uvarint(data, pos)
        except VarintError as exc:
            raise InvalidCid(f"bad binary CID: {exc}") from None
        if version != 1:
            raise InvalidCid(f"unsupported binary CID version {version}")
        return cls(1, codec, data[pos:])

    @classmethod
    def decode(cls, text: str) -> Cid:
        """Parse "b..." (base32 v1), "z..." (base58btc v1) or "Qm..." (v0)."""
        if not isinstance(text, str) or not text:
            raise InvalidCid(f"expected a CID string, got {text!r}")
        if len(text) == 46 and text.startswith("Qm"):
            return cls(0, DAG_PB, _b58decode(text))
        prefix, body = text[0], text[1:]
        if prefix in ("b", "B"):
            raw = _b32decode(body)
        elif prefix == "z":
            raw = _b58decode(body)
        else:
            raise InvalidCid(
                f"unsupported CID text {text[:16]!r}: expected base32 'b...', "
                "base58btc 'z...' or CIDv0 'Qm...'"
            )
        cid = cls.from_bytes(raw)
        if cid.version != 1:
            raise InvalidCid("a multibase-prefixed CID must be CIDv1")
        return cid

    def verify(self, data: bytes | memoryview) -> bool:
        """Whether `data` hashes to this CID (only sha2-256 is supported)."""
        code, digest = _parse_multihash(self.multihash)
        if code != SHA2_256:
            raise InvalidCid(f"unsupported hash function 0x{code:x}; only sha2-256 is verified")
        if len(digest) != _SHA256_LEN:
            raise InvalidCid("truncated sha2-256 digests are not accepted")
        return hashlib.sha256(data).digest() == digest


def sha256_multihash(data: bytes | memoryview) -> bytes:
    return bytes((SHA2_256, _SHA256_LEN)) + hashlib.sha256(data).digest()


def cid_for_raw(data: bytes | memoryview) -> Cid:
    """CIDv1 of a raw block: what a ≤ 256 KiB file gets from `ipfs add --raw-leaves`."""
    return Cid(1, RAW, sha256_multihash(data))

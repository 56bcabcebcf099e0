"""Node identity: one Ed25519 key that is both the libp2p host key and the
signing key for every message a node sends, so a signer's PeerID can be
checked from an envelope alone.

PeerID derivation is written out here rather than borrowed from py-libp2p so
that `crypto/` stays importable (and checkable) without the networking stack;
a test pins it against libp2p's own `ID.from_pubkey`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from protocol.base58 import b58decode, b58encode

# libp2p's PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_ED25519_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # identity hash, 36 bytes
KEY_FILE_NAME = "identity.key"

__all__ = ["Identity", "b58decode", "b58encode", "peer_id_from_public_key"]


# Every envelope opened names its signer by PeerID, and pure-Python base58 of 38
# bytes cost about a tenth of opening one; the same few peers sign nearly all of
# them. Bounded, so a flood of fresh keys only evicts.
@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p PeerID ("12D3KooW…") of an Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return b58encode(_IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the Ed25519 public key embedded in an identity-hash PeerID."""
    raw = b58decode(peer_id)
    prefix = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"not an Ed25519 PeerID: {peer_id!r}")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 key pair, kept as the 32-byte seed."""

    seed: bytes = field(repr=False)  # the private key: never in logs or tracebacks

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(SigningKey.generate()))

    # Derived once per Identity: deriving the key pair from the seed (and the
    # PeerID's base58) on every access showed up in profiles of a busy node,
    # which asks for its own PeerID and signs on every message.
    @cached_property
    def _signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @cached_property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load the node key from its data dir, creating it (mode 0600) on first start.

        The same key across restarts keeps the PeerID stable, which peers and the
        job database rely on.
        """
        path = data_dir / KEY_FILE_NAME
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ValueError(f"{path} is not a 32-byte Ed25519 seed (size {len(seed)})")
            return cls(seed)
        data_dir.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.seed)
        os.replace(tmp, path)
        return identity

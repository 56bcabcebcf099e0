"""Signed envelopes: the only form in which a message crosses the wire.

The signature covers a domain tag plus the canonical payload bytes, so a valid
signature on a Bid can never be replayed as a Receipt (or any other type). The
envelope carries the signer's public key; its PeerID is derived from it and
must equal the message's own signer field.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from crypto.keys import Identity, peer_id_from_public_key, verify_signature
from protocol import encoding
from protocol.errors import ErrorCode, MeshrunError
from protocol.messages import MESSAGE_TYPES, WireModel

ENVELOPE_VERSION = 1
M = TypeVar("M", bound=WireModel)


def domain_tag(kind: str) -> bytes:
    return f"meshrun/{kind}/{ENVELOPE_VERSION}\x00".encode()


@dataclass(frozen=True)
class Opened:
    message: WireModel
    signer: str
    payload: bytes


def seal(identity: Identity, message: WireModel) -> bytes:
    """Sign a message with the node key and wrap it; raises if we are not its signer."""
    if message.signer() != identity.peer_id:
        raise ValueError(
            f"{message.KIND}.{message.SIGNER_FIELD} is {message.signer()}, not our own PeerID"
        )
    payload = encoding.encode(message.to_wire())
    signature = identity.sign(domain_tag(message.KIND) + payload)
    return encoding.encode(
        {
            "v": ENVELOPE_VERSION,
            "t": message.KIND,
            "p": payload,
            "k": identity.public_key,
            "s": signature,
        }
    )


# Envelopes opened lately, by their exact bytes. A gossiped job spec or provider
# announcement is opened by the topic validator and again by its handler, and a
# spec again when it is bid on; identical bytes check out identically, so the
# second open is a lookup. Only successes are kept, only small envelopes, and
# only this many (a flood of distinct messages costs what it did before).
MEMO_ENTRIES = 512
MEMO_MAX_BYTES = 8192
_memo: OrderedDict[tuple[bytes, int], Opened] = OrderedDict()
_memo_lock = threading.Lock()


def open_envelope(
    data: bytes, expected: type[M] | None = None, max_bytes: int = encoding.MAX_MESSAGE_BYTES
) -> Opened:
    """Check and decode an envelope from an untrusted peer.

    Raises MeshrunError with a code callers can log or return; nothing else escapes.
    """
    key = (data, max_bytes) if type(data) is bytes and len(data) <= MEMO_MAX_BYTES else None
    if key is not None:
        with _memo_lock:
            hit = _memo.get(key)
            if hit is not None:
                _memo.move_to_end(key)
        if hit is not None:
            if expected is not None and type(hit.message) is not expected:
                raise MeshrunError(
                    ErrorCode.MALFORMED_MESSAGE,
                    f"expected a {expected.KIND} message, got {hit.message.KIND}",
                )
            return hit
    opened = _open(data, expected, max_bytes)
    if key is not None:
        with _memo_lock:
            _memo[key] = opened
            while len(_memo) > MEMO_ENTRIES:
                _memo.popitem(last=False)
    return opened


def _open(data: bytes, expected: type[M] | None, max_bytes: int) -> Opened:
    outer = encoding.decode(data, max_bytes)
    if not isinstance(outer, dict) or set(outer) != {"v", "t", "p", "k", "s"}:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "not a meshrun envelope")
    version, kind, payload, key, signature = (outer[f] for f in ("v", "t", "p", "k", "s"))
    # `type(...) is int`: True and 1.0 equal 1 in Python but are other bytes on the wire, and
    # a second valid encoding of the same signed spec would be a second job id (replay).
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise MeshrunError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"envelope version {version!r} is not spoken here (we speak {ENVELOPE_VERSION})",
        )
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"unknown message type {kind!r}")
    model = MESSAGE_TYPES[kind]
    if expected is not None and model is not expected:
        raise MeshrunError(
            ErrorCode.MALFORMED_MESSAGE, f"expected a {expected.KIND} message, got {kind}"
        )
    if not (isinstance(payload, bytes) and isinstance(key, bytes) and isinstance(signature, bytes)):
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "envelope fields have the wrong types")
    if not verify_signature(key, domain_tag(kind) + payload, signature):
        raise MeshrunError(ErrorCode.SIGNATURE_INVALID, f"bad signature on {kind}")
    signer = peer_id_from_public_key(key)
    fields = encoding.decode(payload, max_bytes)
    try:
        message = model.model_validate(fields)
    except ValidationError as exc:
        raise MeshrunError(
            ErrorCode.INVALID_SPEC if kind == "jobspec" else ErrorCode.MALFORMED_MESSAGE,
            f"invalid {kind}: {exc.error_count()} problem(s): "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
        ) from exc
    if message.signer() != signer:
        raise MeshrunError(
            ErrorCode.SIGNATURE_INVALID,
            f"{kind} claims {model.SIGNER_FIELD}={message.signer()} but was signed by {signer}",
        )
    return Opened(message=message, signer=signer, payload=payload)

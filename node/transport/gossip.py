"""Opening signed envelopes that arrive by gossip, for topic validators."""

from __future__ import annotations

import logging
from typing import TypeVar

from crypto.envelope import open_envelope
from crypto.keys import b58decode
from node.transport.quiet import QuietLog
from protocol.errors import MeshrunError
from protocol.messages import WireModel

log = logging.getLogger("meshrun.gossip")
M = TypeVar("M", bound=WireModel)
# One line per (forwarder, reason) per 10 s, whatever a flood sends.
_quiet = QuietLog(log)


def dropped(
    what: str, forwarder: str, kind: str, detail: str, level: int = logging.WARNING
) -> None:
    """Log, aggregated, that a topic validator dropped `what` from `forwarder` (for `kind`).

    The first few drops per (forwarder, kind) are logged at once, the rest summed
    into one line per 10 s. The mesh already lowers the forwarder's score for
    every message a validator rejects; this only keeps the log readable.
    """
    _quiet.dropped(what, forwarder, kind, detail, level)


def open_gossip(
    data: bytes, expected: type[M], forwarder: str, origin: bytes, what: str
) -> M | None:
    """Open a gossiped envelope for a topic validator, or log why it is dropped.

    The gossip origin (the peer whose key signed the pubsub message) must be the
    envelope's signer: a relay may forward a message but never re-author one.
    """
    try:
        opened = open_envelope(data, expected)
    except MeshrunError as exc:
        dropped(what, forwarder, exc.code.value, str(exc))
        return None
    if origin and origin != b58decode(opened.signer):
        dropped(what, forwarder, "ORIGIN_MISMATCH", "gossip origin differs from its signer")
        return None
    assert isinstance(opened.message, expected)
    return opened.message


__all__ = ["dropped", "open_gossip"]

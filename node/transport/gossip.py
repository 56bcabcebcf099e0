"""Opening signed envelopes that arrive by gossip, for topic validators."""

from __future__ import annotations

import logging
from typing import TypeVar

from crypto.envelope import open_envelope
from crypto.keys import b58decode
from protocol.errors import MeshrunError
from protocol.messages import WireModel

log = logging.getLogger("meshrun.gossip")
M = TypeVar("M", bound=WireModel)


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
        log.warning("dropped %s from %s: %s", what, forwarder, exc)
        return None
    if origin and origin != b58decode(opened.signer):
        log.warning("dropped %s from %s: gossip origin differs from its signer", what, forwarder)
        return None
    assert isinstance(opened.message, expected)
    return opened.message


__all__ = ["open_gossip"]

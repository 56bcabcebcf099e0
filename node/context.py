"""What both roles share: identity, mesh, blockstore, job database, settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from crypto.envelope import Opened, open_envelope
from crypto.keys import Identity, b58decode
from node.jobdb import JobDB
from node.mesh import Mesh
from protocol.errors import MeshrunError
from protocol.messages import WireModel
from storage.blockstore import Blockstore
from storage.cid import cid_for_raw

log = logging.getLogger("meshrun.gossip")
M = TypeVar("M", bound=WireModel)

if TYPE_CHECKING:
    from node.content import Content


@dataclass
class NodeContext:
    mode: str
    data_dir: Path
    identity: Identity
    mesh: Mesh
    store: Blockstore
    db: JobDB
    content: Content  # pins, GC, the IPFS daemon mirror, fetch from anywhere

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


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


def job_id_of(spec_envelope: bytes) -> str:
    """The CID of the signed spec: anyone can check that id, spec and signer belong together."""
    return str(cid_for_raw(spec_envelope))


def spec_cid_of(opened: Opened) -> str:
    return str(cid_for_raw(opened.payload))


__all__ = ["NodeContext", "job_id_of", "open_envelope", "open_gossip", "spec_cid_of"]

"""What both roles share: identity, mesh, blockstore, job database, content, and job ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from crypto.envelope import Opened
from crypto.keys import Identity
from node.content.service import Content
from node.jobs.ledger import Ledger
from node.jobs.reputation import Reputation
from node.jobs.store import JobDB
from node.transport.mesh import Mesh
from protocol.lifecycle import Settle
from storage.blockstore import Blockstore
from storage.cid import cid_for_raw


class SettlementSink(Protocol):
    """What the requester needs of node.roles.settlement.Settlements (named here
    so the context does not import the room that imports it)."""

    async def settle(self, job_id: str, effect: Settle) -> object: ...


@dataclass
class NodeContext:
    mode: str
    data_dir: Path
    identity: Identity
    mesh: Mesh
    store: Blockstore
    db: JobDB
    content: Content  # pins, GC, the IPFS daemon mirror, fetch from anywhere
    reputation: Reputation  # what this node knows of each peer's past
    ledger: Ledger  # settlements this node signed (requester) or earned (compute)
    # Signs, delivers and receives settlements; set by the node once it starts.
    settlements: SettlementSink = field(init=False)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def job_id_of(spec_envelope: bytes) -> str:
    """The CID of the signed spec: anyone can check that id, spec and signer belong together."""
    return str(cid_for_raw(spec_envelope))


def spec_cid_of(opened: Opened) -> str:
    return str(cid_for_raw(opened.payload))


__all__ = ["NodeContext", "job_id_of", "spec_cid_of"]

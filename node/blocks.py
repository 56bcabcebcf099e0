"""Serving and fetching content-addressed blocks over libp2p bitswap.

The blockstore itself (storage/) is synchronous and libp2p-free; this module
adapts it to py-libp2p's async BlockStore interface so the bitswap engine can
serve from it and write fetched blocks into it, and walks DAGs so a whole file
or result directory can be fetched by its root CID. Every block is hash-checked
by the blockstore on the way in, so a lying peer cannot plant bad data.
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.bitswap import BitswapClient
from libp2p.bitswap.block_store import BlockStore as Libp2pBlockStore
from libp2p.bitswap.cid import CIDInput, cid_to_bytes
from libp2p.peer.id import ID

from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import Blockstore
from storage.cid import Cid, cid_for_raw
from storage.errors import StorageError

log = logging.getLogger("meshrun.blocks")

FETCH_PARALLELISM = 16
# py-libp2p's bitswap treats an empty block as "don't have" (falsy bytes), so a
# DAG holding an empty file (an empty log, say) could never be fetched. Its
# content is implied by its CID, so it is filled in locally instead.
EMPTY_BLOCK = cid_for_raw(b"")


def _cid(value: CIDInput) -> Cid:
    return Cid.from_bytes(cid_to_bytes(value))


class BitswapStore(Libp2pBlockStore):
    """py-libp2p's BlockStore interface over our on-disk blockstore."""

    def __init__(self, store: Blockstore) -> None:
        self.store = store

    async def get_block(self, cid: CIDInput) -> bytes | None:
        key = _cid(cid)
        if not self.store.has(key):
            return None
        try:
            return self.store.get(key)
        except StorageError:
            log.warning("refusing to serve corrupt block %s", key)
            return None

    async def put_block(self, cid: CIDInput, data: bytes) -> None:
        self.store.put(_cid(cid), data)

    async def has_block(self, cid: CIDInput) -> bool:
        return self.store.has(_cid(cid))

    async def delete_block(self, cid: CIDInput) -> None:
        self.store.delete(_cid(cid))

    def get_all_cids(self) -> list[bytes]:
        return [c.to_bytes() for c in self.store.iter_cids()]


async def fetch_dag(
    bitswap: BitswapClient,
    store: Blockstore,
    root: Cid,
    peer_id: str | None,
    timeout: float = 60.0,
) -> dict[str, float]:
    """Fetch every block of the DAG under `root` that is not local yet.

    Walks level by level: fetched dag-pb nodes reveal their children, which are
    then requested in parallel from the peer (the one that told us the CID, e.g.
    the executor of a job, per DESIGN §10: fetch directly over the existing
    connection). Raises FETCH_FAILED with the missing CIDs on timeout.
    """
    started = time.perf_counter()
    peer = ID.from_base58(peer_id) if peer_id else None
    fetched = 0
    fetched_bytes = 0
    limiter = trio.CapacityLimiter(FETCH_PARALLELISM)
    missing: list[Cid] = []

    async def get_one(cid: Cid) -> None:
        nonlocal fetched, fetched_bytes
        async with limiter:
            session = bitswap.new_session()
            data = await session.get_block(cid.to_bytes(), peer, timeout=timeout)
            if not store.has(cid):
                store.put(cid, data)
            fetched += 1
            fetched_bytes += len(data)

    try:
        with trio.fail_after(timeout):
            while True:
                missing = store.missing_blocks(root)
                if EMPTY_BLOCK in missing:
                    store.put(EMPTY_BLOCK, b"")
                    missing.remove(EMPTY_BLOCK)
                if not missing:
                    if store.missing_blocks(root):
                        continue
                    break
                async with trio.open_nursery() as nursery:
                    for cid in missing:
                        nursery.start_soon(get_one, cid)
    except Exception as exc:  # timeouts, corrupt blocks, stream errors (often grouped)
        raise MeshrunError(
            ErrorCode.FETCH_FAILED,
            f"could not fetch {root} from {peer_id or 'the mesh'}: {exc or 'timed out'}",
            {"missing": [str(c) for c in missing[:10]], "fetched_blocks": fetched},
        ) from exc
    elapsed = time.perf_counter() - started
    return {"blocks": fetched, "bytes": fetched_bytes, "seconds": elapsed}

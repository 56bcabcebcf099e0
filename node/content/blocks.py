"""Serving and fetching content-addressed blocks between peers.

Two ways, one store. Bitswap (node.content.bitswap, meshrun's own 1.2.0/1.1.0,
each message on a stream of its own as the spec has it) serves our blocks to
any IPFS peer (tested against a real js-ipfs peer on the wire: it fetches
meshrun's files and directories by CID, and meshrun fetches DAGs that only it
holds) and is the fallback fetcher. Between meshrun nodes, fetches use the
block exchange below: one libp2p stream, the fetcher pipelines batches of
wanted CIDs, the holder streams the blocks back in order, where bitswap needs
a stream (and a protocol negotiation) per message each way. Version 1.1.0
adds a want for a whole DAG ("this root and its descendants, up to N
bytes"): the holder streams its blocks in an order the fetcher predicts from
the blocks it has checked, so a small result takes one round trip, not one
per level of its DAG.

Every block is hash-checked by the blockstore on the way in, so a lying peer
cannot plant bad data, whichever way it came.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import cbor2
import trio
from libp2p.exceptions import BaseLibp2pError

from node.aio import inline_if_small
from node.content.bitswap import Bitswap
from node.transport.frames import Frames, ProtocolNotSpoken
from node.transport.mesh import Mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import BaseBlockstore
from storage.cid import Cid, VarintError, cid_for_raw, decode_uvarint, encode_uvarint
from storage.errors import (
    BlockNotFound,
    ContentTooLarge,
    CorruptBlock,
    MalformedBlock,
    StorageError,
)
from storage.unixfs import DagWalk

log = logging.getLogger("meshrun.blocks")

BLOCKS_PROTOCOL = "/meshrun/blocks/1.0.0"
# 1.0.0 plus the DAG want; a fetcher asks for it first and falls back to 1.0.0.
BLOCKS_PROTOCOL_DAG = "/meshrun/blocks/1.1.0"
# What one DAG want may ask the holder to stream (the fetcher's own limit
# permitting); the rest of a bigger DAG is wanted block by block as before.
DAG_STREAM_BYTES = 4 * 1024 * 1024
# Blocks wanted at once over bitswap (want-block: 32 x 256 KiB = 8 MiB in flight).
BITSWAP_WINDOW = 32
# Blocks in flight on one exchange stream: enough to keep the pipe full across
# a round trip (16 x 256 KiB = 4 MiB), small enough to bound memory.
EXCHANGE_WINDOW = 16
MAX_WANTS_PER_FRAME = 256
MAX_BLOCK_BYTES = 2 * 1024 * 1024
MAX_EXCHANGE_FRAME = MAX_BLOCK_BYTES + 1024
_BLOCK = b"\x01"
_DONT_HAVE = b"\x00"
_DAG_END = b"\x02"
# Small replies are sent together, up to this many bytes a write (Frames.write_frames).
COALESCE_BYTES = 64 * 1024
# An empty block (an empty file's leaf: an empty log, say) needs no peer: its
# content is implied by its CID, so it is filled in locally.
EMPTY_BLOCK = cid_for_raw(b"")


# What start_mesh is given: the node's bitswap over its blockstore (the name
# from when this was py-libp2p's BlockStore adapter, kept for its callers).
BitswapStore = Bitswap


# ---- block exchange: wire format ------------------------------------------------
#
# fetcher → holder: CBOR {"want": [cid bytes, ...]} (at most MAX_WANTS_PER_FRAME)
# holder → fetcher: one frame per wanted CID, in the order asked:
#     0x01 | uvarint(len(cid)) | cid | block     the block
#     0x00 | uvarint(len(cid)) | cid            "I do not have it"
# Frames are varint-length-prefixed (libp2p msgio). The fetcher may send more
# want frames before the answers to earlier ones arrive (pipelining).
#
# 1.1.0 adds, fetcher → holder: CBOR {"dag": root cid bytes, "max": N}. The
# holder answers with the DAG's blocks (frames as above), each once, in the
# breadth-first order of storage.unixfs.DagWalk: the root, then the children
# each block links to for the first time, in link order. It stops before
# the block that would take the blocks' bytes past N, or at a block it lacks
# or cannot walk, and ends with the frame 0x02. A root it lacks is answered
# 0x00 (then 0x02). The fetcher derives the same order from the blocks it
# has checked, so each block must be the one it expects next; anything else
# (out of order, not in the DAG, past the end, over N bytes) ends the fetch.
# The fetcher then wants what is still missing block by block, on the same
# stream.


class DagWant:
    """A 1.1.0 want: the DAG under `root`, up to `max_bytes` of blocks."""

    __slots__ = ("max_bytes", "root")

    def __init__(self, root: Cid, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes


def encode_dag_want(root: Cid, max_bytes: int) -> bytes:
    return bytes(cbor2.dumps({"dag": root.to_bytes(), "max": max_bytes}))


def encode_wants(cids: list[Cid]) -> bytes:
    return bytes(cbor2.dumps({"want": [c.to_bytes() for c in cids]}))


def decode_request(data: bytes) -> list[Cid] | DagWant:
    """A 1.1.0 want frame: a list of CIDs (as 1.0.0) or a DAG want."""
    try:
        message = cbor2.loads(data)
        if isinstance(message, dict) and "dag" in message:
            limit = message["max"]
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"max of {type(limit).__name__} {limit!r}")
            return DagWant(Cid.from_bytes(bytes(message["dag"])), limit)
    except Exception as exc:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"bad block want frame: {exc}") from exc
    return decode_wants(data)


def decode_wants(data: bytes) -> list[Cid]:
    try:
        message = cbor2.loads(data)
        wants = message["want"]
        if not isinstance(wants, list) or len(wants) > MAX_WANTS_PER_FRAME:
            raise ValueError(f"want list of {type(wants).__name__} or over the limit")
        return [Cid.from_bytes(bytes(w)) for w in wants]
    except Exception as exc:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"bad block want frame: {exc}") from exc


def encode_reply(cid: Cid, block: bytes | None) -> list[bytes]:
    """Header and body separately, so a 256 KiB block is never copied to prepend a few bytes."""
    raw = cid.to_bytes()
    header = (_BLOCK if block is not None else _DONT_HAVE) + encode_uvarint(len(raw)) + raw
    return [header] if block is None else [header, block]


def decode_reply(frame: bytes) -> tuple[Cid, bytes | None]:
    if not frame or frame[:1] not in (_BLOCK, _DONT_HAVE):
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, "bad block reply frame")
    try:
        length, pos = decode_uvarint(frame, 1, max_bytes=4)
        cid = Cid.from_bytes(frame[pos : pos + length])
    except (VarintError, ValueError) as exc:
        raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"bad block reply frame: {exc}") from exc
    body = frame[pos + length :]
    return cid, (body if frame[:1] == _BLOCK else None)


async def serve_blocks(
    store: BaseBlockstore,
    frames: Frames,
    stats: Counter[str] | None = None,
    *,
    dags: bool = False,
) -> None:
    """Answer want frames until the fetcher closes the stream.

    Blocks are read (and hash-checked: the disk is not trusted) in a worker
    thread a want frame at a time, so a large fetch never stalls the event loop.
    `stats` counts blocks and bytes served (for the node's metrics). With
    `dags` (protocol 1.1.0), DAG wants are answered too.
    """

    def load(cids: list[Cid]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for cid in cids:
            try:
                out.append(store.get(cid))
            except (BlockNotFound, StorageError):
                out.append(None)
        return out

    while True:
        try:
            data = await frames.read()
        except Exception:  # the fetcher closed or reset: it is done
            return
        wants = decode_request(data) if dags else decode_wants(data)
        if isinstance(wants, DagWant):
            await _serve_dag(store, frames, wants, stats)
            continue
        for start in range(0, len(wants), EXCHANGE_WINDOW):
            batch = wants[start : start + EXCHANGE_WINDOW]
            blocks = await trio.to_thread.run_sync(load, batch)
            replies = [encode_reply(cid, block) for cid, block in zip(batch, blocks, strict=True)]
            await _send(frames, replies)
            if stats is not None:
                sent = [len(block) for block in blocks if block is not None]
                stats["blocks_sent"] += len(sent)
                stats["bytes_sent"] += sum(sent)


async def _send(frames: Frames, replies: list[list[bytes]]) -> None:
    """Write `replies`, small ones together (COALESCE_BYTES a write), big ones alone."""
    pending: list[list[bytes]] = []
    size = 0
    for reply in replies:
        length = sum(len(p) for p in reply)
        if pending and size + length > COALESCE_BYTES:
            await frames.write_frames(pending)
            pending, size = [], 0
        pending.append(reply)
        size += length
    if pending:
        await frames.write_frames(pending)


async def _serve_dag(
    store: BaseBlockstore, frames: Frames, want: DagWant, stats: Counter[str] | None
) -> None:
    """Stream the DAG under `want.root` in DagWalk's breadth-first order, then the end frame."""
    budget = min(want.max_bytes, DAG_STREAM_BYTES)
    walk = DagWalk(want.root)
    queue: deque[Cid] = deque([want.root])
    sent = 0

    def load(cids: list[Cid]) -> list[tuple[Cid, bytes | None, list[Cid] | None]]:
        """Each block and the children it links to first (None: it cannot be walked)."""
        out: list[tuple[Cid, bytes | None, list[Cid] | None]] = []
        for cid in cids:
            try:
                block = b"" if cid == EMPTY_BLOCK else store.get(cid)
            except (BlockNotFound, StorageError):
                out.append((cid, None, None))
                break
            try:
                children: list[Cid] | None = walk.visit(cid, block)
            except (StorageError, ValueError):
                children = None  # sent all the same: the fetcher's walk says why it stops
            out.append((cid, block, children))
            if children is None:
                break
        return out

    replies: list[list[bytes]] = []
    while queue:
        batch = [queue.popleft() for _ in range(min(EXCHANGE_WINDOW, len(queue)))]
        stop = False
        for cid, block, children in await trio.to_thread.run_sync(load, batch):
            if block is None:
                if cid == want.root:
                    replies.append(encode_reply(cid, None))
                stop = True
                break
            if sent + len(block) > budget:
                stop = True
                break
            replies.append(encode_reply(cid, block))
            sent += len(block)
            if stats is not None:
                stats["blocks_sent"] += 1
                stats["bytes_sent"] += len(block)
            if children is None:
                stop = True
                break
            queue.extend(children)
        if stop:
            break
        if sum(len(p) for r in replies for p in r) >= COALESCE_BYTES:
            await _send(frames, replies)
            replies = []
    # A small DAG leaves in one write, end frame included: a sender's third
    # small write in a row can wait for the first two to leave the host.
    replies.append([_DAG_END])
    await _send(frames, replies)


def serve_block_exchange(mesh: Mesh, store: BaseBlockstore) -> Counter[str]:
    """Answer the block exchange protocol (1.1.0 and 1.0.0) on `mesh` from `store`;
    returns its counters."""
    stats: Counter[str] = Counter()
    mesh.handle(BLOCKS_PROTOCOL_DAG, partial(serve_blocks, store, stats=stats, dags=True))
    mesh.handle(BLOCKS_PROTOCOL, partial(serve_blocks, store, stats=stats))
    return stats


class _NotSpoken(Exception):
    """The peer does not speak the block exchange (an IPFS node, an older meshrun)."""


async def _exchange_fetch(
    mesh: Mesh,
    store: BaseBlockstore,
    walk: DagWalk,
    peer_id: str,
    added: list[Cid],
    first: list[Cid] | None = None,
) -> dict[str, int]:
    """Fetch over a (reused, if one is idle) exchange stream; retry once if a reused one died.

    1.1.0 is asked for first, its negotiation pipelined with the first want
    (no round trip of its own); a peer that refuses it (an older meshrun) is
    remembered and asked for 1.0.0, negotiated the usual way. `first` is what
    the caller already found missing; a retry looks again.
    """
    totals = {"blocks": 0, "bytes": 0}
    retried = False
    while True:
        dags = not mesh.unspoken(peer_id, BLOCKS_PROTOCOL_DAG)
        protocol = BLOCKS_PROTOCOL_DAG if dags else BLOCKS_PROTOCOL
        try:
            frames, reused = await mesh.checkout(peer_id, protocol, pipelined=dags)
        except Exception as exc:
            raise _NotSpoken(str(exc)) from exc
        frames.max_bytes = MAX_EXCHANGE_FRAME
        try:
            pending, first = first, None
            await _walk(frames, store, walk, peer_id, totals, added, dags=dags, first=pending)
        except ProtocolNotSpoken:
            await frames.reset()
            mesh.remember_unspoken(peer_id, BLOCKS_PROTOCOL_DAG)
            continue
        except (BaseLibp2pError, EOFError):
            await frames.reset()
            if reused and not retried:
                retried = True
                continue
            raise
        except BaseException:
            await frames.reset()
            raise
        mesh.checkin(frames, protocol)
        return totals


async def _walk(
    frames: Frames,
    store: BaseBlockstore,
    walk: DagWalk,
    peer_id: str,
    totals: dict[str, int],
    added: list[Cid],
    *,
    dags: bool = False,
    first: list[Cid] | None = None,
) -> None:
    """Walk the DAG under `walk.root` over one exchange stream, pipelining wants.

    With `dags` (1.1.0) and nothing of the DAG here yet, the DAG is first
    asked for whole (`_stream_dag`): a small one arrives in one round trip.

    Each block is checked and stored (on a worker thread) before its links
    are followed, so no want is ever derived from unverified bytes, and its
    sizes are checked against its parent's links and the budget (DagWalk)
    before any child is asked for. Handing raw leaves to a separate storer
    task measured no faster here: both ends are CPU-bound in py-libp2p's
    Noise and yamux, not waiting on the disk.
    """
    pending: deque[Cid] = deque(
        first if first is not None else await _outstanding_soon(store, walk)
    )
    if dags and list(pending) == [walk.root]:
        pending = deque(await _stream_dag(frames, store, walk, peer_id, totals, added))
    in_flight: deque[Cid] = deque()
    while pending or in_flight:
        if pending and len(in_flight) < EXCHANGE_WINDOW:
            room = min(MAX_WANTS_PER_FRAME, 4 * EXCHANGE_WINDOW - len(in_flight))
            batch = [pending.popleft() for _ in range(min(room, len(pending)))]
            if EMPTY_BLOCK in batch:
                pending.extend(_store_block(store, walk, EMPTY_BLOCK, b"", added))
                batch = [c for c in batch if c != EMPTY_BLOCK]
            if batch:
                in_flight.extend(batch)
                await frames.write(encode_wants(batch))
            if not in_flight:
                continue
        cid, block = decode_reply(await frames.read())
        expected = in_flight.popleft()
        if cid.to_v1() != expected.to_v1():
            raise MeshrunError(
                ErrorCode.MALFORMED_MESSAGE, f"peer answered {cid} when {expected} was next"
            )
        if block is None:
            raise BlockNotFound(f"{peer_id} does not have block {cid}")
        children = await inline_if_small(
            len(block), INLINE_BLOCK_BYTES, _store_block, store, walk, cid, block, added
        )
        totals["blocks"] += 1
        totals["bytes"] += len(block)
        pending.extend(children)


async def _stream_dag(
    frames: Frames,
    store: BaseBlockstore,
    walk: DagWalk,
    peer_id: str,
    totals: dict[str, int],
    added: list[Cid],
) -> list[Cid]:
    """Ask for the DAG under `walk.root` whole; check each block as it streams in.

    The holder must send exactly the blocks `walk` expects, in its order: each
    one is hash-checked and its sizes checked against its parent's link
    (DagWalk) before its children join the expected queue, so nothing is
    accepted that a verified block did not link to, and no more bytes than
    asked. Returns what the holder did not send (past the budget), still to
    fetch by want.
    """
    limit = DAG_STREAM_BYTES if walk.max_bytes is None else min(walk.max_bytes, DAG_STREAM_BYTES)
    await frames.write(encode_dag_want(walk.root, limit))
    expected: deque[Cid] = deque([walk.root])
    received = 0
    while True:
        frame = await frames.read()
        if frame == _DAG_END:
            break
        cid, block = decode_reply(frame)
        if not expected:
            raise MeshrunError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{peer_id} sent {cid} after the last block of {walk.root}",
            )
        want = expected.popleft()
        if cid.to_v1() != want.to_v1():
            raise MeshrunError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{peer_id} sent {cid} when {want} of {walk.root} was next",
            )
        if block is None:
            raise BlockNotFound(f"{peer_id} does not have block {cid}")
        received += len(block)
        if received > limit:
            raise MeshrunError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{peer_id} sent more than the {limit} bytes of {walk.root} asked for",
            )
        children = await inline_if_small(
            len(block), INLINE_BLOCK_BYTES, _store_streamed, store, walk, cid, block, added
        )
        totals["blocks"] += 1
        totals["bytes"] += len(block)
        expected.extend(children)
    if not expected:  # the whole DAG came: nothing left to look up
        return []
    return await trio.to_thread.run_sync(store.walk_local, walk, list(expected))


# Blocks up to this size are checked and stored on the event loop. Handing each
# one to a worker thread cost more than the work: for a result of six ~250-byte
# blocks, starting thread jobs took 7 % of a busy requester's CPU. Bigger blocks
# (hashing 256 KiB, a disk write) still go to a thread.
INLINE_BLOCK_BYTES = 16 * 1024


async def _outstanding_soon(store: BaseBlockstore, walk: DagWalk) -> list[Cid]:
    """`_outstanding`, without a thread when the root is not here (a first fetch) or
    the whole DAG may be no bigger than a few small blocks."""
    if walk.dag_size is None and not store.has(walk.root):
        return [walk.root]
    if walk.max_bytes is not None and walk.max_bytes <= INLINE_BLOCK_BYTES:
        return _outstanding(store, walk)
    return await trio.to_thread.run_sync(_outstanding, store, walk)


def _store_streamed(
    store: BaseBlockstore, walk: DagWalk, cid: Cid, block: bytes, added: list[Cid]
) -> list[Cid]:
    """Verify and keep one streamed block; return every child it links to first.

    Unlike `_store_block`, a block held here already is hash-checked too
    (the holder cannot know what we hold, so it sends it), and children held
    here are returned all the same: the holder sends them next.
    """
    if store.has(cid):
        if not cid.verify(block):
            raise CorruptBlock(f"refusing block that does not hash to {cid}")
    else:
        store.put(cid, block)
        added.append(cid)
    return walk.visit(cid, block)


def _outstanding(store: BaseBlockstore, walk: DagWalk) -> list[Cid]:
    """What is left to fetch: from the root on a first try, else (a retry) what is missing."""
    if walk.dag_size is None:
        return store.walk_local(walk, [walk.root])
    # Every block held was visited, so each missing one is a child the walk expects.
    return store.missing_blocks(walk.root)


def _store_block(
    store: BaseBlockstore, walk: DagWalk, cid: Cid, block: bytes, added: list[Cid]
) -> list[Cid]:
    """Verify and keep one fetched block, check its sizes; return its children still to fetch.

    The block is stored (hash-checked by `put`) before its sizes are walked,
    so nothing is parsed unverified; a block the walk refuses is in `added`
    and goes with the rest of the refused DAG.
    """
    if not store.has(cid):
        store.put(cid, block)
        added.append(cid)
    return store.walk_local(walk, walk.visit(cid, block))


async def _bitswap_fetch(
    bitswap: Bitswap,
    store: BaseBlockstore,
    walk: DagWalk,
    peer_id: str | None,
    added: list[Cid],
    idle_timeout: float | None = None,
    first: list[Cid] | None = None,
) -> dict[str, int]:
    """Walk the DAG over bitswap, BITSWAP_WINDOW blocks wanted at a time, from `peer_id`
    (or every connected peer); blocks are checked and stored as they arrive, in any order.

    As in `_walk`, a block is stored (hash-checked) and its sizes checked
    before any of its children is asked for. With `idle_timeout`, it gives up
    when no block has come for that long (trio.TooSlowError).
    """
    totals = {"blocks": 0, "bytes": 0}
    if first is None:
        first = await trio.to_thread.run_sync(_outstanding, store, walk)
    pending: deque[Cid] = deque(first)
    with bitswap.session(peer_id) as session:
        waiting = 0  # wanted, neither received nor refused yet
        rechecked = False
        while True:
            while pending and waiting < BITSWAP_WINDOW:
                room = BITSWAP_WINDOW - waiting
                batch = [pending.popleft() for _ in range(min(room, len(pending)))]
                if EMPTY_BLOCK in batch:
                    # Its content is implied by its CID: no peer needs to send it.
                    pending.extend(_store_block(store, walk, EMPTY_BLOCK, b"", added))
                    batch = [c for c in batch if c != EMPTY_BLOCK]
                waiting += session.want(batch)
            if not waiting:
                if pending:
                    continue
                if rechecked:
                    return totals
                # Collected meanwhile (a GC between the walk and now)? Fetch those again.
                rechecked = True
                pending.extend(await trio.to_thread.run_sync(store.missing_blocks, walk.root))
                continue
            with trio.fail_after(math.inf if idle_timeout is None else idle_timeout):
                cid, block = await session.receive()  # BlockNotFound if every peer lacks one
            waiting -= 1
            children = await trio.to_thread.run_sync(_store_block, store, walk, cid, block, added)
            totals["blocks"] += 1
            totals["bytes"] += len(block)
            pending.extend(children)


Discard = Callable[[Cid, list[Cid]], Awaitable[None]]


async def _delete_blocks(store: BaseBlockstore, blocks: list[Cid]) -> None:
    """The default clean-up of a refused DAG: delete the blocks this fetch wrote."""

    def drop() -> None:
        for cid in blocks:
            store.delete(cid)

    await trio.to_thread.run_sync(drop)


async def fetch_dag(
    source: Mesh | Bitswap,
    store: BaseBlockstore,
    root: Cid,
    peer_id: str | None,
    timeout: float = 60.0,
    *,
    max_bytes: int | None = None,
    discard: Discard | None = None,
    idle_timeout: float | None = None,
) -> dict[str, Any]:
    """Fetch every block of the DAG under `root` that is not local yet.

    `source` is the node's Mesh (or its Bitswap, to use bitswap alone).
    With a peer to ask (the one that told us the CID, e.g. the executor of a
    job: fetch directly over the connection already open to it) and a Mesh,
    the block exchange is used; a peer that does not
    speak it, or no peer at all, falls back to bitswap. Raises FETCH_FAILED
    with the missing CIDs on timeout or on a bad or missing block.

    Every block's sizes are checked as it arrives (storage.unixfs.DagWalk):
    with `max_bytes`, a DAG bigger than that as its links declare (Kubo's
    cumulative size, counting a block once per link that reaches it: what
    JobSpec.model_bytes holds) is refused after its root block, and one
    that lies about its sizes at the first block that contradicts its
    parent. Either raises CONTENT_TOO_LARGE (a DAG that is malformed in
    other ways, FETCH_FAILED), and the blocks this fetch wrote are handed to
    `discard(root, blocks)` (by default they are deleted; Content.discard
    spares any still reachable from a pin), so a refused DAG leaves nothing
    behind. Blocks of a fetch that merely timed out are kept for the next try.

    `idle_timeout` ends a bitswap fetch that has had no block for that long
    (a peer that has a block sends it; one that lacks it says so, and a fetch
    every peer refused fails at once), while one that is moving may take up
    to `timeout`.
    """
    started = time.perf_counter()
    bitswap = source.bitswap if isinstance(source, Mesh) else source
    if not isinstance(bitswap, Bitswap):
        raise TypeError(f"the mesh's bitswap is a {type(bitswap).__name__}, not a Bitswap")
    exchange = source if isinstance(source, Mesh) else None
    via = "bitswap"
    stats: dict[str, int] = {"blocks": 0, "bytes": 0}
    walk = DagWalk(root, max_bytes)
    added: list[Cid] = []
    try:
        with trio.fail_after(timeout):
            # Looked for once here and handed on: for a DAG partly here, the
            # fetcher looking again was a second walk of the local blocks.
            first: list[Cid] | None = await _outstanding_soon(store, walk)
            if not first:
                # All here already (an executor's model and inputs, job after job):
                # no stream, no peer.
                elapsed = time.perf_counter() - started
                return {**stats, "seconds": elapsed, "via": "local", "dag_bytes": walk.dag_size}
            if exchange is not None and peer_id:
                try:
                    stats = await _exchange_fetch(exchange, store, walk, peer_id, added, first)
                    via = "exchange"
                except _NotSpoken as exc:
                    log.info(
                        "%s does not speak %s (%s); using bitswap", peer_id, BLOCKS_PROTOCOL, exc
                    )
                first = None  # the exchange may have walked some of it: look again
            if via == "bitswap":
                stats = await _bitswap_fetch(
                    bitswap, store, walk, peer_id, added, idle_timeout, first
                )
    except Exception as exc:  # timeouts, corrupt blocks, stream errors (often grouped)
        bad = _find(exc, MalformedBlock)
        if bad is not None:
            with trio.CancelScope(shield=True):
                if discard is None:
                    await _delete_blocks(store, added)
                else:
                    await discard(root, added)
            too_large = isinstance(bad, ContentTooLarge)
            log.warning("refused %s from %s: %s", root, peer_id or "the mesh", bad)
            raise MeshrunError(
                ErrorCode.CONTENT_TOO_LARGE if too_large else ErrorCode.FETCH_FAILED,
                f"refused {root} from {peer_id or 'the mesh'}: {bad}",
                {
                    "cid": str(root),
                    "limit": max_bytes,
                    "checked_blocks": walk.blocks,
                    "discarded_blocks": len(added),
                },
            ) from exc
        missing = await trio.to_thread.run_sync(_missing_quietly, store, root)
        raise MeshrunError(
            ErrorCode.FETCH_FAILED,
            f"could not fetch {root} from {peer_id or 'the mesh'}: {exc or 'timed out'}",
            {"missing": [str(c) for c in missing[:10]], "fetched_blocks": stats["blocks"]},
        ) from exc
    elapsed = time.perf_counter() - started
    return {**stats, "seconds": elapsed, "via": via, "dag_bytes": walk.dag_size}


def _find(exc: BaseException, kind: type[MalformedBlock]) -> MalformedBlock | None:
    """The first `kind` in an exception, its causes, or the groups trio wraps it in."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    cause = exc.__cause__
    return _find(cause, kind) if cause is not None else None


def _missing_quietly(store: BaseBlockstore, root: Cid) -> list[Cid]:
    try:
        return store.missing_blocks(root)
    except StorageError:
        return [root]

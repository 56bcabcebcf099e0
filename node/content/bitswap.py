"""Bitswap 1.2.0 and 1.1.0 as IPFS peers speak it: meshrun's own client and server.

Why not py-libp2p's (`libp2p.bitswap`, 0.8.1): its server writes the blocks
it answers with back on the stream the asker opened
(`_send_wantlist_responses_inline`), and its client waits for them there.
js-ipfs and Kubo send each message on a stream of their own, close it, and
read only the streams their peer opens to them (the spec: a reply is a new
message on a new stream), so a real IPFS peer never received a block from
meshrun, and meshrun fetching a multi-block file from js-ipfs got the second
block only after py-libp2p closed its idle stream 30 s later. The fix is the
core of its client and server (the stream a reply goes on, where the
client reads), not a hook; subclassing or patching it would pin us to its
private methods. It also keeps every peer's wantlist unbounded, treats an
empty block as "don't have", and reads length prefixes a byte at a time.
So this module speaks the protocol itself over py-libp2p streams, with the
messages from the `protobuf` package (the schema below is the spec's
`message.proto`, built as a descriptor here: there is no protoc step).

On the wire (https://specs.ipfs.tech/bitswap-protocol/):

- Every message goes on a new outbound stream of its own, negotiated as
  `/ipfs/bitswap/1.2.0` (or 1.1.0), written as one varint-length-prefixed
  protobuf and closed. Inbound streams are read message by message until
  the peer closes them (Kubo reuses one per peer, js-ipfs opens one each).
- Server: a peer's wantlist (wants, cancels, `full` replacing the list)
  is kept here, at most MAX_PEER_WANTS entries. A want-block is answered
  with the block, a want-have with HAVE (or the block itself when it is at
  most MAX_SIZE_REPLACE_HAS_WITH_BLOCK, as Kubo and js-ipfs do), a block we
  lack with DONT_HAVE if the peer asked for one; a want stays until it is
  answered with a block or HAVE or cancelled, so a block that arrives later
  is still sent (:meth:`Bitswap.blocks_added`). Answers go in messages of
  about TARGET_MESSAGE_BYTES, one peer's at a time and at most
  MAX_SERVING_PEERS peers at once, so the bytes in flight are bounded
  whatever a peer asks; blocks are read (and hash-checked) on a worker thread.
- Client: a :class:`Session` sends want-block entries with send-dont-have
  to the peer it names (or every connected peer), receives blocks as they
  arrive in any order, and cancels what it no longer needs. A block is
  accepted only if it hashes to a CID some session wants; everything else
  is dropped unread. When every peer asked answered DONT_HAVE (or could
  not be reached) the session says so at once instead of waiting out a
  timeout.

Every peer may be hostile: messages are capped at MAX_MESSAGE_BYTES,
inbound streams per peer at MAX_INBOUND_STREAMS_PER_PEER, idle ones closed
after STREAM_IDLE_TIMEOUT, and a malformed message lowers the sender's
score (the mesh's guard bans it past the threshold). Interop failures (a
peer we cannot open a stream to, a write that fails or times out, a message
we cannot parse) are logged with the peer and the reason through an
aggregating log.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.exceptions import MessageTooLarge

from node.transport.frames import Frames
from node.transport.mesh import Mesh
from node.transport.quiet import QuietLog
from storage.blockstore import BaseBlockstore
from storage.cid import SHA2_256, Cid, VarintError, decode_uvarint, encode_uvarint
from storage.cid import sha256_multihash as _sha256_multihash
from storage.errors import BlockNotFound, InvalidCid, StorageError

log = logging.getLogger("meshrun.bitswap")

PROTOCOL_V120 = "/ipfs/bitswap/1.2.0"
PROTOCOL_V110 = "/ipfs/bitswap/1.1.0"
PROTOCOLS = (PROTOCOL_V120, PROTOCOL_V110)

# What Kubo and js-ipfs accept in one message; ours are far smaller.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
TARGET_MESSAGE_BYTES = 1024 * 1024
# No block meshrun stores or fetches is bigger (node.content.blocks.MAX_BLOCK_BYTES).
MAX_BLOCK_BYTES = 2 * 1024 * 1024
MAX_SIZE_REPLACE_HAS_WITH_BLOCK = 1024
# Kubo's server keeps at most 1024 wants per peer too (MaxQueuedWantlistEntriesPerPeer).
MAX_PEER_WANTS = 1024
MAX_LEDGERS = 512
MAX_SERVING_PEERS = 8
MAX_OUTBOUND_STREAMS = 64
MAX_INBOUND_STREAMS_PER_PEER = 32
MAX_BROADCAST_PEERS = 16
STREAM_IDLE_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0
# Entries taken from a peer's wantlist per answer (a message holds what fits).
ANSWER_BATCH = 64
# Decoding (hashing) a message with more block bytes than this runs on a worker thread.
THREAD_DECODE_BYTES = 64 * 1024


class BitswapError(ValueError):
    """A bitswap message we cannot parse."""


# ---- messages -------------------------------------------------------------------
#
# message Message {
#   message Wantlist {
#     enum WantType { Block = 0; Have = 1; }
#     message Entry {
#       bytes block = 1; int32 priority = 2; bool cancel = 3;
#       WantType wantType = 4; bool sendDontHave = 5;
#     }
#     repeated Entry entries = 1; bool full = 2;
#   }
#   message Block { bytes prefix = 1; bytes data = 2; }
#   enum BlockPresenceType { Have = 0; DontHave = 1; }
#   message BlockPresence { bytes cid = 1; BlockPresenceType type = 2; }
#   Wantlist wantlist = 1;
#   repeated bytes blocks = 2;          // bitswap 1.0.0 only
#   repeated Block payload = 3;
#   repeated BlockPresence blockPresences = 4;
#   int32 pendingBytes = 5;
# }

_PACKAGE = "bitswap.message.pb"
_F = descriptor_pb2.FieldDescriptorProto


def _add_field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int,
    type_name: str = "",
    repeated: bool = False,
) -> None:
    added = message.field.add(
        name=name,
        number=number,
        type=kind,
        label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
    )
    if type_name:
        added.type_name = f".{_PACKAGE}.{type_name}"


def _message_class() -> Any:
    """The spec's `Message`, built from a descriptor in a pool of its own."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="meshrun/bitswap.proto", package=_PACKAGE, syntax="proto3"
    )
    message = proto.message_type.add(name="Message")
    wantlist = message.nested_type.add(name="Wantlist")
    want_type = wantlist.enum_type.add(name="WantType")
    want_type.value.add(name="Block", number=0)
    want_type.value.add(name="Have", number=1)
    entry = wantlist.nested_type.add(name="Entry")
    _add_field(entry, "block", 1, _F.TYPE_BYTES)
    _add_field(entry, "priority", 2, _F.TYPE_INT32)
    _add_field(entry, "cancel", 3, _F.TYPE_BOOL)
    _add_field(entry, "wantType", 4, _F.TYPE_ENUM, "Message.Wantlist.WantType")
    _add_field(entry, "sendDontHave", 5, _F.TYPE_BOOL)
    _add_field(wantlist, "entries", 1, _F.TYPE_MESSAGE, "Message.Wantlist.Entry", repeated=True)
    _add_field(wantlist, "full", 2, _F.TYPE_BOOL)
    block = message.nested_type.add(name="Block")
    _add_field(block, "prefix", 1, _F.TYPE_BYTES)
    _add_field(block, "data", 2, _F.TYPE_BYTES)
    presence_type = message.enum_type.add(name="BlockPresenceType")
    presence_type.value.add(name="Have", number=0)
    presence_type.value.add(name="DontHave", number=1)
    presence = message.nested_type.add(name="BlockPresence")
    _add_field(presence, "cid", 1, _F.TYPE_BYTES)
    _add_field(presence, "type", 2, _F.TYPE_ENUM, "Message.BlockPresenceType")
    _add_field(message, "wantlist", 1, _F.TYPE_MESSAGE, "Message.Wantlist")
    _add_field(message, "blocks", 2, _F.TYPE_BYTES, repeated=True)
    _add_field(message, "payload", 3, _F.TYPE_MESSAGE, "Message.Block", repeated=True)
    _add_field(message, "blockPresences", 4, _F.TYPE_MESSAGE, "Message.BlockPresence", True)
    _add_field(message, "pendingBytes", 5, _F.TYPE_INT32)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Message"))


_PB = _message_class()
WANT_BLOCK, WANT_HAVE = 0, 1
HAVE, DONT_HAVE = 0, 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One wantlist entry."""

    cid: Cid
    priority: int = 1
    cancel: bool = False
    want_have: bool = False
    send_dont_have: bool = False


@dataclass(slots=True)
class Message:
    """A bitswap message, decoded; blocks carry the CID their bytes hash to."""

    entries: list[Entry] = field(default_factory=list)
    full: bool = False
    blocks: list[tuple[Cid, bytes]] = field(default_factory=list)
    haves: list[Cid] = field(default_factory=list)
    dont_haves: list[Cid] = field(default_factory=list)
    pending_bytes: int = 0
    skipped: int = 0  # entries, blocks or presences dropped as malformed

    def __bool__(self) -> bool:
        return bool(self.entries or self.full or self.blocks or self.haves or self.dont_haves)

    def block_bytes(self) -> int:
        return sum(len(data) for _, data in self.blocks)


def cid_prefix(cid: Cid) -> bytes:
    """The 1.1.0 block prefix: CID version, codec, multihash code and length."""
    return b"".join(
        encode_uvarint(v) for v in (cid.version, cid.codec, cid.hash_code, len(cid.digest))
    )


def cid_from_prefix(prefix: bytes, data: bytes) -> Cid:
    """The CID of `data` as `prefix` describes it; only sha2-256 is accepted."""
    try:
        version, pos = decode_uvarint(prefix)
        codec, pos = decode_uvarint(prefix, pos)
        code, pos = decode_uvarint(prefix, pos)
        length, pos = decode_uvarint(prefix, pos)
    except VarintError as exc:
        raise BitswapError(f"bad block prefix: {exc}") from None
    if pos != len(prefix):
        raise BitswapError("block prefix has trailing bytes")
    if code != SHA2_256 or length != 32:
        raise BitswapError(f"unsupported multihash 0x{code:x}/{length} in a block prefix")
    try:
        return Cid(version, codec, _sha256_multihash(data))
    except InvalidCid as exc:
        raise BitswapError(f"bad block prefix: {exc}") from None


def encode_message(message: Message, protocol: str = PROTOCOL_V120) -> bytes:
    """Serialize for `protocol`: 1.1.0 has no presences and no want-have."""
    v12 = protocol == PROTOCOL_V120
    pb = _PB()
    if message.entries or message.full:
        pb.wantlist.full = message.full
        for want in message.entries:
            if want.want_have and not v12 and not want.cancel:
                continue  # a 1.1.0 peer cannot answer HAVE; we never ask it that
            entry = pb.wantlist.entries.add()
            entry.block = want.cid.to_bytes()
            entry.priority = want.priority
            entry.cancel = want.cancel
            if v12:
                entry.wantType = WANT_HAVE if want.want_have else WANT_BLOCK
                entry.sendDontHave = want.send_dont_have
    for cid, data in message.blocks:
        block = pb.payload.add()
        block.prefix = cid_prefix(cid)
        block.data = data
    if v12:
        for kind, cids in ((HAVE, message.haves), (DONT_HAVE, message.dont_haves)):
            for cid in cids:
                presence = pb.blockPresences.add()
                presence.cid = cid.to_bytes()
                presence.type = kind
        if message.pending_bytes:
            pb.pendingBytes = message.pending_bytes
    return bytes(pb.SerializeToString())


def decode_message(data: bytes) -> Message:
    """Parse a message; an undecodable one raises BitswapError, bad parts are skipped.

    Blocks (1.1.0 payload, or 1.0.0 `blocks`, which are CIDv0 dag-pb) are
    hashed here to find their CID, so a block's CID always matches its bytes.
    """
    pb = _PB()
    try:
        pb.ParseFromString(data)
    except (DecodeError, RuntimeError) as exc:
        raise BitswapError(f"undecodable bitswap message: {exc}") from None
    out = Message(full=bool(pb.wantlist.full), pending_bytes=max(0, int(pb.pendingBytes)))
    for entry in pb.wantlist.entries:
        try:
            cid = Cid.from_bytes(bytes(entry.block))
        except (InvalidCid, ValueError):
            out.skipped += 1
            continue
        out.entries.append(
            Entry(
                cid,
                int(entry.priority),
                bool(entry.cancel),
                int(entry.wantType) == WANT_HAVE,
                bool(entry.sendDontHave),
            )
        )
    for block in pb.payload:
        try:
            out.blocks.append((cid_from_prefix(bytes(block.prefix), bytes(block.data)), block.data))
        except BitswapError:
            out.skipped += 1
    for raw in pb.blocks:  # bitswap 1.0.0: CIDv0 blocks
        try:
            out.blocks.append((cid_from_prefix(b"\x00\x70\x12\x20", bytes(raw)), bytes(raw)))
        except BitswapError:
            out.skipped += 1
    for presence in pb.blockPresences:
        try:
            cid = Cid.from_bytes(bytes(presence.cid))
        except (InvalidCid, ValueError):
            out.skipped += 1
            continue
        (out.dont_haves if int(presence.type) == DONT_HAVE else out.haves).append(cid)
    return out


# ---- the engine ------------------------------------------------------------------


@dataclass
class _Ledger:
    """What one peer wants from us."""

    wants: OrderedDict[Cid, Entry] = field(default_factory=OrderedDict)
    pending: OrderedDict[Cid, None] = field(default_factory=OrderedDict)  # to answer now
    serving: bool = False


@dataclass
class _Wanted:
    """A block some sessions want: who was asked, who said they lack it."""

    cid: Cid
    sessions: set[Session] = field(default_factory=set)
    asked: set[str] = field(default_factory=set)
    dont_have: set[str] = field(default_factory=set)


class Bitswap:
    """A node's bitswap: serves `store` to any peer and fetches blocks with sessions.

    Built before the mesh (start_mesh takes it), started by it with the mesh.
    """

    def __init__(self, store: BaseBlockstore) -> None:
        self.store = store
        self._mesh: Mesh | None = None
        self._ledgers: OrderedDict[str, _Ledger] = OrderedDict()
        self._serving = trio.CapacityLimiter(MAX_SERVING_PEERS)
        self._outbound = trio.CapacityLimiter(MAX_OUTBOUND_STREAMS)
        self._inbound: Counter[str] = Counter()
        self._wanted: dict[bytes, _Wanted] = {}
        self.quiet = QuietLog(log)
        self.stats: Counter[str] = Counter()

    @property
    def mesh(self) -> Mesh:
        if self._mesh is None:
            raise RuntimeError("bitswap is not started: start_mesh starts it")
        return self._mesh

    async def start(self, mesh: Mesh) -> None:
        self._mesh = mesh
        for protocol in PROTOCOLS:
            mesh.handle(protocol, self._on_stream)

    def status(self) -> dict[str, Any]:
        return {
            "protocols": list(PROTOCOLS),
            "peers_with_wants": sum(1 for ledger in self._ledgers.values() if ledger.wants),
            "blocks_wanted": len(self._wanted),
            **dict(self.stats),
        }

    # ---- receiving ----

    async def _on_stream(self, frames: Frames) -> None:
        peer = frames.remote_peer
        if self._inbound[peer] >= MAX_INBOUND_STREAMS_PER_PEER:
            self.quiet.dropped(
                "bitswap stream",
                peer,
                "too many streams",
                f"over {MAX_INBOUND_STREAMS_PER_PEER} open at once",
                logging.INFO,
            )
            await frames.reset()
            return
        self._inbound[peer] += 1
        frames.max_bytes = MAX_MESSAGE_BYTES
        try:
            while True:
                data: bytes | None = None
                with trio.move_on_after(STREAM_IDLE_TIMEOUT):
                    try:
                        data = await frames.read()
                    except EOFError:
                        return  # the peer closed the stream: the usual end
                    except MessageTooLarge as exc:
                        self.mesh.report(peer, "bitswap message", "too large", str(exc))
                        return
                    except BaseLibp2pError:
                        return  # reset, or the connection went
                if data is None:
                    log.debug(
                        "closing a bitswap stream from %s idle for %.0f s",
                        peer,
                        STREAM_IDLE_TIMEOUT,
                    )
                    return
                try:
                    if len(data) > THREAD_DECODE_BYTES:
                        message = await trio.to_thread.run_sync(decode_message, data)
                    else:
                        message = decode_message(data)
                except BitswapError as exc:
                    self.mesh.report(peer, "bitswap message", "malformed", str(exc))
                    return
                if message.skipped:
                    self.quiet.dropped(
                        "bitswap message parts",
                        peer,
                        "malformed",
                        f"{message.skipped} malformed entries, blocks or presences",
                    )
                self.stats["messages_received"] += 1
                self._received(peer, message)
        finally:
            self._inbound[peer] -= 1
            if self._inbound[peer] <= 0:
                del self._inbound[peer]
            await frames.close()

    def _received(self, peer: str, message: Message) -> None:
        for cid, data in message.blocks:
            self._block_arrived(peer, cid, data)
        for cid in message.dont_haves:
            self._dont_have(peer, cid)
        if message.entries or message.full:
            self._wantlist(peer, message)

    # ---- serving ----

    def _ledger(self, peer: str) -> _Ledger | None:
        ledger = self._ledgers.get(peer)
        if ledger is not None:
            self._ledgers.move_to_end(peer)
            return ledger
        if len(self._ledgers) >= MAX_LEDGERS:
            idle = next((p for p, led in self._ledgers.items() if not led.serving), None)
            if idle is None:
                return None
            del self._ledgers[idle]
        ledger = self._ledgers[peer] = _Ledger()
        return ledger

    def _wantlist(self, peer: str, message: Message) -> None:
        ledger = self._ledger(peer)
        if ledger is None:
            self.quiet.dropped(
                "bitswap wantlist", peer, "busy", "too many peers being served", logging.INFO
            )
            return
        if message.full:
            ledger.wants.clear()
            ledger.pending.clear()
        refused = 0
        for entry in message.entries:
            if entry.cancel:
                ledger.wants.pop(entry.cid, None)
                ledger.pending.pop(entry.cid, None)
                continue
            if entry.cid not in ledger.wants and len(ledger.wants) >= MAX_PEER_WANTS:
                refused += 1
                continue
            ledger.wants[entry.cid] = entry
            ledger.pending[entry.cid] = None
        if refused:
            self.quiet.dropped(
                "bitswap wants",
                peer,
                "wantlist full",
                f"{refused} want(s) over the limit of {MAX_PEER_WANTS} per peer",
                logging.INFO,
            )
        self._serve_soon(peer, ledger)

    def _serve_soon(self, peer: str, ledger: _Ledger) -> None:
        if ledger.pending and not ledger.serving:
            ledger.serving = True
            self.mesh.nursery.start_soon(self._serve, peer, ledger)

    def blocks_added(self, cids: Iterable[Cid]) -> None:
        """Blocks just stored: answer the peers whose wants they satisfy."""
        added = set(cids)
        for peer, ledger in list(self._ledgers.items()):
            hits = [c for c in ledger.wants if c in added or c.to_v1() in added]
            for cid in hits:
                ledger.pending[cid] = None
            if hits:
                self._serve_soon(peer, ledger)

    async def _serve(self, peer: str, ledger: _Ledger) -> None:
        try:
            async with self._serving:
                while ledger.pending and self._ledgers.get(peer) is ledger:
                    batch: list[Entry] = []
                    while ledger.pending and len(batch) < ANSWER_BATCH:
                        cid, _ = ledger.pending.popitem(last=False)
                        entry = ledger.wants.get(cid)
                        if entry is not None:
                            batch.append(entry)
                    reply, done, later = await trio.to_thread.run_sync(self._answer, batch)
                    for entry in reversed(later):  # did not fit this message: first next time
                        if entry.cid in ledger.wants:
                            ledger.pending[entry.cid] = None
                            ledger.pending.move_to_end(entry.cid, last=False)
                    for cid in done:
                        ledger.wants.pop(cid, None)
                    if not reply:
                        continue
                    if not await self.send(peer, reply):
                        ledger.pending.clear()  # unreachable: its wants wait for a new message
                        return
                    self.stats["blocks_sent"] += len(reply.blocks)
                    self.stats["bytes_sent"] += reply.block_bytes()
                    self.stats["presences_sent"] += len(reply.haves) + len(reply.dont_haves)
        finally:
            ledger.serving = False

    def _answer(self, batch: list[Entry]) -> tuple[Message, list[Cid], list[Entry]]:
        """Build one reply (on a worker thread): the message, wants it ends, entries left over."""
        reply = Message()
        done: list[Cid] = []
        size = 0
        for index, entry in enumerate(batch):
            if size >= TARGET_MESSAGE_BYTES:
                return reply, done, batch[index:]
            cid = entry.cid
            block_size = self.store.size_of(cid)
            block: bytes | None = None
            if block_size is not None and block_size <= MAX_BLOCK_BYTES:
                if entry.want_have and block_size > MAX_SIZE_REPLACE_HAS_WITH_BLOCK:
                    reply.haves.append(cid)
                    done.append(cid)
                    continue
                if size and size + block_size > TARGET_MESSAGE_BYTES:
                    return reply, done, batch[index:]
                try:
                    block = self.store.get(cid)
                except BlockNotFound:
                    block = None
                except StorageError as exc:
                    log.warning("not serving block %s over bitswap: %s", cid, exc)
                    block = None
            if block is None:
                if entry.send_dont_have:
                    reply.dont_haves.append(cid)
                continue  # the want stays: blocks_added answers it if the block comes
            reply.blocks.append((cid, block))
            done.append(cid)
            size += len(block)
        return reply, done, []

    async def send(self, peer: str, message: Message) -> bool:
        """One message on a new stream of its own; False (logged) if it did not go."""
        async with self._outbound:
            frames: Frames | None = None
            with trio.move_on_after(SEND_TIMEOUT):
                try:
                    frames = await self.mesh.open(peer, PROTOCOLS)
                    protocol = str(frames.stream.get_protocol() or PROTOCOL_V120)
                    data = encode_message(message, protocol)
                    frames.max_bytes = MAX_MESSAGE_BYTES
                    await frames.write(data)
                    await frames.close()
                    self.stats["messages_sent"] += 1
                    return True
                except Exception as exc:
                    if frames is not None:
                        await frames.reset()
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    stage = "write" if frames is not None else "open a stream"
                    self.stats["send_failures"] += 1
                    self.quiet.dropped(
                        "bitswap message",
                        peer,
                        "unreachable",
                        f"could not {stage}: {reason}",
                        prep="to",
                    )
                    return False
            if frames is not None:
                await frames.reset()
            self.stats["send_failures"] += 1
            self.quiet.dropped(
                "bitswap message",
                peer,
                "timeout",
                f"not sent within {SEND_TIMEOUT:.0f} s",
                prep="to",
            )
            return False

    # ---- fetching ----

    def session(self, peer: str | None = None) -> Session:
        """A fetch from `peer`, or from every connected peer (up to MAX_BROADCAST_PEERS)."""
        if peer:
            peers = [peer]
        else:
            mesh = self.mesh
            peers = [p for p in mesh.connected_peers() if not mesh.guard.refuses(p)]
            peers = peers[:MAX_BROADCAST_PEERS]
        return Session(self, peers)

    def _want(self, session: Session, cid: Cid, peers: Sequence[str]) -> None:
        key = cid.multihash
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = self._wanted[key] = _Wanted(cid)
        wanted.sessions.add(session)
        wanted.asked.update(peers)

    def _unwant(self, session: Session, keys: Iterable[bytes]) -> None:
        cancels: dict[str, list[Cid]] = {}
        for key in keys:
            wanted = self._wanted.get(key)
            if wanted is None:
                continue
            wanted.sessions.discard(session)
            if not wanted.sessions:
                del self._wanted[key]
                for peer in wanted.asked - wanted.dont_have:
                    cancels.setdefault(peer, []).append(wanted.cid)
        self._send_cancels(cancels)

    def _send_cancels(self, cancels: dict[str, list[Cid]]) -> None:
        for peer, cids in cancels.items():
            message = Message(entries=[Entry(c, cancel=True) for c in cids])
            self.mesh.nursery.start_soon(self.send, peer, message)

    def _block_arrived(self, peer: str, cid: Cid, data: bytes) -> None:
        wanted = self._wanted.pop(cid.multihash, None)
        if wanted is None:
            self.stats["unwanted_blocks"] += 1
            return
        self.stats["blocks_received"] += 1
        self.stats["bytes_received"] += len(data)
        for session in wanted.sessions:
            session._arrived(wanted.cid, data)
        others = wanted.asked - wanted.dont_have - {peer}
        self._send_cancels({p: [wanted.cid] for p in others})

    def _dont_have(self, peer: str, cid: Cid) -> None:
        wanted = self._wanted.get(cid.multihash)
        if wanted is None or peer not in wanted.asked:
            return
        wanted.dont_have.add(peer)
        if wanted.dont_have >= wanted.asked:
            del self._wanted[cid.multihash]
            for session in wanted.sessions:
                session._missing(wanted.cid, sorted(wanted.dont_have))

    async def _send_wants(self, peer: str, message: Message) -> None:
        if not await self.send(peer, message):
            for entry in message.entries:
                self._dont_have(peer, entry.cid)


class Session:
    """One fetch: want blocks, receive them in the order they arrive, cancel the rest.

    Use as a context manager: leaving it cancels what is still wanted.
    """

    def __init__(self, bitswap: Bitswap, peers: list[str]) -> None:
        self.bitswap = bitswap
        self.peers = peers
        self._send, self._receive = trio.open_memory_channel[tuple[Cid, bytes | None, str]](
            math.inf  # at most one item per want, and wants are bounded by the caller
        )
        self._outstanding: dict[bytes, Cid] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        keys, self._outstanding = list(self._outstanding), {}
        self.bitswap._unwant(self, keys)

    def want(self, cids: Sequence[Cid]) -> int:
        """Ask for `cids` (want-block, send-dont-have); the messages go in the background.

        Returns how many were not wanted already: each of those comes out of
        :meth:`receive` once, as its block or as BlockNotFound.
        """
        unique = {c.multihash: c for c in cids if c.multihash not in self._outstanding}
        fresh = list(unique.values())
        if not fresh:
            return 0
        if not self.peers:
            for cid in fresh:
                self._missing(cid, [])
            return len(fresh)
        for cid in fresh:
            self._outstanding[cid.multihash] = cid
            self.bitswap._want(self, cid, self.peers)
        entries = [
            Entry(cid, priority=len(fresh) - i, send_dont_have=True) for i, cid in enumerate(fresh)
        ]
        message = Message(entries=entries)
        for peer in self.peers:
            self.bitswap.mesh.nursery.start_soon(self.bitswap._send_wants, peer, message)
        return len(fresh)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def receive(self) -> tuple[Cid, bytes]:
        """The next wanted block to arrive, as (the CID asked for, its verified bytes).

        Raises BlockNotFound when every peer asked answered that it lacks one.
        """
        cid, data, why = await self._receive.receive()
        if data is None:
            raise BlockNotFound(why)
        return cid, data

    def _arrived(self, cid: Cid, data: bytes) -> None:
        asked = self._outstanding.pop(cid.multihash, None)
        if asked is not None:  # the CID as this session named it (v0 or v1)
            self._send.send_nowait((asked, data, ""))

    def _missing(self, cid: Cid, peers: list[str]) -> None:
        asked = self._outstanding.pop(cid.multihash, cid)
        if peers:
            why = f"{', '.join(peers)} answered that they do not have block {asked}"
        else:
            why = f"no connected peer to ask for block {asked}"
        self._send.send_nowait((asked, None, why))

"""Who stores which CID: signed provider announcements gossiped on `/meshrun/providers/1`.

A result is only "fetchable from anywhere" if a node that never heard of the
job can find a peer holding it. py-libp2p's Kademlia DHT would need every node
to run a DHT server and fill its routing table by hand, while every meshrun
node already sits in one gossipsub mesh; so a node that stores a result
gossips a signed `Provide` naming the CIDs, its PeerID and its addresses, and
every node keeps a bounded table of what it heard. Gossip does not replay old
messages to late joiners, so each node also re-announces its pinned roots
periodically.

Announcements are checked like job specs: the gossip validator
drops anything not signed by the provider it names, from the future or long
expired, so a peer cannot advertise content on someone else's behalf.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio

from crypto.envelope import open_envelope, seal
from node.transport.gossip import dropped, open_gossip
from node.transport.mesh import Mesh
from protocol.errors import MeshrunError
from protocol.messages import PROVIDERS_TOPIC, Provide
from storage.cid import Cid

log = logging.getLogger("meshrun.providers")

MAX_CIDS_PER_MESSAGE = 64
PROVIDER_TTL = 24 * 3600.0
MAX_TABLE_CIDS = 100_000
MAX_PROVIDERS_PER_CID = 16
MAX_CLOCK_SKEW = 300.0
REANNOUNCE_INTERVAL = 300.0
# Publishing a burst of announcements through gossipsub's 32-deep per-peer queue
# drops messages silently (py-libp2p 0.8); a short pause between batches avoids it.
BATCH_PAUSE = 0.05
# CIDs kept within this long go out in one announcement (see Providers.announce_soon).
ANNOUNCE_DELAY = 0.25
# ...and one announcement follows another no sooner than this (see Providers).
ANNOUNCE_INTERVAL = 2.0
# CIDs waiting for the next announcement; past this the oldest wait for the
# periodic re-announce instead (a burst must not grow memory without bound).
MAX_PENDING = 10_000


@dataclass
class ProviderRecord:
    peer_id: str
    addrs: list[str]
    seen_at: float


def _key(cid: Cid) -> bytes:
    # v0 and v1 names of the same DAG share providers.
    return cid.multihash


class ProviderTable:
    """CID → providers heard recently; bounded in CIDs, providers per CID and age."""

    def __init__(self, ttl: float = PROVIDER_TTL, max_cids: int = MAX_TABLE_CIDS) -> None:
        self.ttl = ttl
        self.max_cids = max_cids
        self._table: OrderedDict[bytes, dict[str, ProviderRecord]] = OrderedDict()

    def add(self, cid: Cid, peer_id: str, addrs: list[str], at: float) -> None:
        key = _key(cid)
        entry = self._table.pop(key, None) or {}
        entry[peer_id] = ProviderRecord(peer_id, list(addrs), at)
        if len(entry) > MAX_PROVIDERS_PER_CID:
            oldest = min(entry.values(), key=lambda r: r.seen_at)
            entry.pop(oldest.peer_id)
        self._table[key] = entry
        while len(self._table) > self.max_cids:
            self._table.popitem(last=False)

    def get(self, cid: Cid, now: float | None = None) -> list[ProviderRecord]:
        """Live providers of `cid`, most recently heard first."""
        now = time.time() if now is None else now
        entry = self._table.get(_key(cid), {})
        live = [r for r in entry.values() if now - r.seen_at < self.ttl]
        return sorted(live, key=lambda r: -r.seen_at)

    def forget(self, cid: Cid, peer_id: str) -> None:
        entry = self._table.get(_key(cid))
        if entry is not None:
            entry.pop(peer_id, None)

    def __len__(self) -> int:
        return len(self._table)


class Providers:
    """This node's announcements and the table of everyone else's.

    Results are announced a moment after they are kept, many to a message
    (:meth:`announce_soon`), not one gossip message per result on the job's
    path: every node verifies every announcement, so on the 1 + 3 devstack one
    message per job cost each of the five processes a signature check, a decode
    and a forward, and the executor and requester waited for the publish before
    sending the receipt and completing the job. Nobody needs it sooner: the
    requester fetches from the executor its receipt names.

    Under a stream of jobs the next announcement waits until `interval` has
    passed since the last one, gathering every result kept meanwhile: at N = 32
    on loopback, jobs one after another, an announcement every 0.25 s made the
    requester (the star's hub) forward ~24 messages a job and the compute nodes
    spend about a quarter of their CPU checking them; with 2 s between them the
    CPU of all processes per job fell by about a fifth. A quiet node's first
    result still goes out after `delay`.
    """

    def __init__(
        self, mesh: Mesh, delay: float = ANNOUNCE_DELAY, interval: float = ANNOUNCE_INTERVAL
    ) -> None:
        self.mesh = mesh
        self.table = ProviderTable()
        self.heard = 0
        self.announced = 0
        self.delay = delay
        self.interval = interval
        self._pending: OrderedDict[str, Cid] = OrderedDict()
        self._wake = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.mesh.subscribe(PROVIDERS_TOPIC, self._validate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            task_status.started()
            while True:
                message = await subscription.get()
                self._record(bytes(message.data))

    def announce_soon(self, cids: Iterable[Cid]) -> None:
        """Queue `cids` for the next announcement, within `delay` seconds."""
        for cid in cids:
            self._pending[str(cid)] = cid
            self._pending.move_to_end(str(cid))
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        self._wake.set()

    async def _flush_loop(self) -> None:
        last = -math.inf
        while True:
            await self._wake.wait()
            await trio.sleep_until(max(trio.current_time() + self.delay, last + self.interval))
            self._wake = trio.Event()
            last = trio.current_time()
            await self.flush()

    async def flush(self) -> None:
        """Announce everything queued now."""
        if self._pending:
            cids = list(self._pending.values())
            self._pending.clear()
            await self.announce(cids)

    def _validate(self, forwarder: str, origin: bytes, data: bytes) -> bool:
        message = open_gossip(data, Provide, forwarder, origin, "provider announcement")
        if message is None:
            return False
        now = time.time()
        if message.at > now + MAX_CLOCK_SKEW or message.at < now - PROVIDER_TTL:
            dropped("provider announcement", forwarder, "stale", "stale or future", logging.INFO)
            return False
        return True

    def _record(self, data: bytes) -> None:
        try:
            opened = open_envelope(data, Provide)
        except MeshrunError:
            return  # the validator already logged it
        message = opened.message
        assert isinstance(message, Provide)
        if message.provider == self.mesh.peer_id:
            return
        for text in message.cids:
            try:
                cid = Cid.decode(text)
            except ValueError:
                continue
            self.table.add(cid, message.provider, message.addrs, min(message.at, time.time()))
        self.heard += 1

    async def announce(self, cids: Iterable[Cid]) -> None:
        """Gossip that this node provides `cids` (in batches the message limits allow)."""
        texts = list(dict.fromkeys(str(c) for c in cids))
        for start in range(0, len(texts), MAX_CIDS_PER_MESSAGE):
            if start:
                await trio.sleep(BATCH_PAUSE)
            message = Provide(
                provider=self.mesh.peer_id,
                addrs=self.mesh.listen_addrs()[:16],
                cids=texts[start : start + MAX_CIDS_PER_MESSAGE],
                at=time.time(),
            )
            try:
                await self.mesh.publish(PROVIDERS_TOPIC, seal(self.mesh.identity, message))
                self.announced += 1
            except Exception as exc:  # gossip is best effort; the periodic re-announce retries
                log.info("could not announce %d CID(s): %s", len(message.cids), exc)

    def status(self) -> dict[str, Any]:
        return {
            "topic": PROVIDERS_TOPIC,
            "topic_peers": len(self.mesh.topic_peers(PROVIDERS_TOPIC)),
            "known_cids": len(self.table),
            "announcements_heard": self.heard,
            "announcements_sent": self.announced,
            "announcements_pending": len(self._pending),
        }

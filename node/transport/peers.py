"""Staying on the mesh: dialing bootstrap peers, redialing them, and remembering peers.

A node writes the peers it was connected to (and their addresses) to
``peers.json`` in its data dir, so that after a restart it rejoins its mesh by
itself even when nobody passes ``--bootstrap`` again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.peerstore import PeerStoreError

from node.transport.mesh import Mesh

log = logging.getLogger("meshrun.node")

PEERS_FILE = "peers.json"
MAX_REMEMBERED_PEERS = 64
# One dial may not hold up the others: a dial into a half-dead connection (a peer
# killed mid-handshake, a loaded machine) otherwise hangs a redial loop for a minute.
DIAL_TIMEOUT = 5.0


async def connect_bootstrap(mesh: Mesh, addr: str, attempts: int = 20) -> None:
    """Dial `addr`, retrying with a growing pause (the peer may still be starting)."""
    for attempt in range(attempts):
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                peer = await mesh.connect(addr)
            log.info("connected to bootstrap peer %s", peer)
            return
        except Exception as exc:
            log.info("bootstrap %s not reachable yet (%s); retrying", addr, exc)
            await trio.sleep(min(0.2 * (attempt + 1), 2.0))
    log.error("gave up on bootstrap peer %s after %d attempts", addr, attempts)


async def stay_connected(mesh: Mesh, addrs: list[str], interval: float = 3.0) -> None:
    """Redial bootstrap peers that went away (a requester restarted, say).

    A compute node that lost its only link to the mesh would otherwise sit idle
    until someone restarted it.
    """
    while addrs:
        await trio.sleep(interval)
        connected = set(mesh.connected_peers())
        for addr in addrs:
            if addr.rsplit("/p2p/", 1)[-1] in connected:
                continue
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    peer = await mesh.connect(addr)
                log.info("reconnected to bootstrap peer %s", peer)
            except Exception as exc:
                log.debug("bootstrap %s still unreachable: %s", addr, exc)


def remembered_peers(data_dir: Path, skip: list[str]) -> list[str]:
    """Peers this node knew before it stopped: a restarted node rejoins its mesh by itself."""
    try:
        saved = json.loads((data_dir / PEERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    skip_ids = {a.rsplit("/p2p/", 1)[-1] for a in skip}
    addrs = []
    for peer in saved.get("peers", []):
        if peer.get("peer_id") in skip_ids:
            continue
        for addr in peer.get("addrs", [])[:4]:
            addrs.append(f"{addr}/p2p/{peer['peer_id']}")
    return addrs


async def remember_peers(mesh: Mesh, data_dir: Path, interval: float = 2.0) -> None:
    """Keep ``peers.json`` up to date with the connected peers, most recently seen first."""
    path = data_dir / PEERS_FILE
    known: dict[str, dict[str, Any]] = {}
    try:
        known = {p["peer_id"]: p for p in json.loads(path.read_text()).get("peers", [])}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    last = None
    while True:
        await trio.sleep(interval)
        host = mesh.host
        store = host.get_peerstore()
        now = time.time()
        for pid in host.get_connected_peers():
            try:
                addrs = sorted({str(a).split("/p2p/")[0] for a in store.addrs(pid)})
            except PeerStoreError:  # connected, but no (unexpired) address known: skip it
                continue
            if addrs:
                known[str(pid)] = {"peer_id": str(pid), "addrs": addrs, "seen_at": now}
        peers = sorted(known.values(), key=lambda p: -float(p.get("seen_at", 0)))
        peers = peers[:MAX_REMEMBERED_PEERS]
        shape = [(p["peer_id"], p["addrs"]) for p in peers]
        if shape != last:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"peers": peers}, indent=2))
            os.replace(tmp, path)
            last = shape

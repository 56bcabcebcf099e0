"""The flood sender of the `hostile` benchmark: one libp2p peer gossiping fresh-key job specs.

Run as ``python -m benchmarks.hostile_peer CONFIG_JSON`` (keys: ``compute``
and ``requester``, full multiaddrs with /p2p/; ``count``; ``rate``, specs a
second; ``seconds``; ``watch``, how long after the flood to wait for a
disconnect; ``data_dir`` for its empty blockstore). Built from the
project's own modules, as tests/adversarial/test_spec_flood.py builds its
attackers: a mesh from :func:`node.transport.mesh.start_mesh` under a fresh
identity, and pubsub messages whose author and spec signer is a key made for that message alone,
all validly signed, each spec naming as its requester's address a local port
where a listener only counts connections (the dials the flood provokes).

It runs in its own process so that its event loop and its share of the GIL
stay out of the measuring client's way. Lines on stdin drive it; it answers
each with one JSON line on stdout:

- at start: builds ``count`` messages, connects to both nodes, waits until the
  compute node lists it on the job topic, then ``{"ready": true, ...}``;
- ``flood``: publishes at ``rate`` a second for ``seconds`` over its one
  connection to the compute node (it stops once that node has disconnected
  it) and reports what it sent; then, unless it was cut off already, it
  waits up to ``watch`` seconds for the node (which may still be working
  through a backlog) to disconnect it, and reports when that happened;
- ``reconnect``: dials the compute node again and reports whether the
  connection still stands a second later;
- end of input: exits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils.varint import encode_varint_prefixed

from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.roles.misbehave import fresh_key_spec_message
from node.transport.mesh import Mesh, start_mesh
from protocol.messages import JOBS_TOPIC
from storage.blockstore import Blockstore, MemoryBlockstore

SOME_CID = str(MemoryBlockstore().add_bytes(b"model bytes that are never fetched"))
# Long enough that no spec built at start expires before the flood is over.
SPEC_TTL_S = 300.0
# The flood writes what is due every TICK_S as one RPC.
TICK_S = 0.02


def _say(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _command() -> str:
    line: str = await trio.to_thread.run_sync(sys.stdin.readline)
    return line.strip()


async def _flood(
    mesh: Mesh, compute: str, msgs: list[rpc_pb2.Message], rate: float, seconds: float
) -> dict[str, Any]:
    """Publish at `rate` a second for `seconds` on the pubsub stream to the compute node.

    Every TICK_S the messages due are written as one RPC straight into the
    stream (as the adversarial test's burster does): publishing them through
    our own pubsub instead re-verifies each signature and queues one RPC per
    message, which capped a sender at ~130 specs/s on a busy 2-core machine.
    A sender that falls behind (a slow write) catches up in the next RPCs.
    """
    started = trio.current_time()
    end = started + seconds
    sent = 0
    cut_off_at: float | None = None
    sent_before_cut = 0
    stream = mesh.pubsub.peers[ID.from_base58(compute)]
    tick = 0
    while sent < len(msgs):
        tick += 1
        await trio.sleep_until(min(end, started + tick * TICK_S))
        now = trio.current_time()
        due = min(len(msgs), round((now - started) * rate))
        batch = msgs[sent:due]
        if batch and mesh.is_connected(compute):
            try:
                rpc = rpc_pb2.RPC(publish=batch)
                await stream.write(encode_varint_prefixed(rpc.SerializeToString()))
                sent += len(batch)
            except Exception:  # the node hung up on us
                pass
        if not mesh.is_connected(compute):
            cut_off_at = trio.current_time() - started
            sent_before_cut = sent
            break
        if now >= end:
            break
    await trio.sleep_until(end)
    return {
        "flood_done": True,
        "seconds": round(trio.current_time() - started, 3),
        "sent": sent,
        "cut_off_after_s": None if cut_off_at is None else round(cut_off_at, 3),
        "sent_before_cut_off": sent_before_cut if cut_off_at is not None else None,
    }


async def _reconnect(mesh: Mesh, addr: str, compute: str) -> dict[str, Any]:
    error = ""
    with trio.move_on_after(10):
        try:
            await mesh.connect(addr)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
    await trio.sleep(1.0)
    return {"reconnect_done": True, "connected": mesh.is_connected(compute), "error": error}


async def _main(config: dict[str, Any]) -> None:
    trap_hits = 0

    async def count(stream: trio.SocketStream) -> None:
        nonlocal trap_hits
        trap_hits += 1
        await stream.aclose()

    compute_addr, requester_addr = str(config["compute"]), str(config["requester"])
    compute = compute_addr.rsplit("/p2p/", 1)[1]
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        trap = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
        nursery.start_soon(trio.serve_listeners, count, listeners)
        built = time.perf_counter()
        msgs = [
            fresh_key_spec_message(SOME_CID, trap, SPEC_TTL_S) for _ in range(int(config["count"]))
        ]
        built_s = time.perf_counter() - built
        identity = Identity.generate()
        async with start_mesh(
            identity,
            ["/ip4/127.0.0.1/tcp/0"],
            BitswapStore(Blockstore(Path(config["data_dir"]) / "blocks")),
        ) as mesh:
            await mesh.connect(requester_addr)
            await mesh.connect(compute_addr)
            with trio.fail_after(30):
                while compute not in mesh.topic_peers(JOBS_TOPIC):
                    await trio.sleep(0.05)
            await trio.sleep(1.5)  # the gossip mesh forms (heartbeat 1 s)
            _say(
                {
                    "ready": True,
                    "peer_id": mesh.peer_id,
                    "trap": trap,
                    "messages": len(msgs),
                    "build_seconds": round(built_s, 2),
                }
            )
            while command := await _command():
                if command == "flood":
                    started = trio.current_time()
                    seconds = float(config["seconds"])
                    report = await _flood(mesh, compute, msgs, float(config["rate"]), seconds)
                    _say({**report, "trap_connections": trap_hits})
                    # The node may still be working through what it received.
                    cut = report["cut_off_after_s"]
                    deadline = started + seconds + float(config["watch"])
                    while cut is None and trio.current_time() < deadline:
                        if not mesh.is_connected(compute):
                            cut = round(trio.current_time() - started, 3)
                        await trio.sleep(0.02)
                    _say(
                        {
                            "watch_done": True,
                            "disconnected_after_s": cut,
                            "connected_requester": mesh.is_connected(
                                requester_addr.rsplit("/p2p/", 1)[1]
                            ),
                            "trap_connections": trap_hits,
                        }
                    )
                elif command == "reconnect":
                    _say(
                        {
                            **await _reconnect(mesh, compute_addr, compute),
                            "trap_connections": trap_hits,
                        }
                    )
                else:
                    _say({"error": f"unknown command {command!r}"})
            mesh.nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    trio.run(_main, json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

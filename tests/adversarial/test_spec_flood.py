"""A flood of job specs, each validly signed by a fresh key, cannot hurt a compute node.

Measured on a devstack before the fix: ~6,000 such specs in 8 s filled
py-libp2p's 1000-peer store with their requesters' addresses, evicting the
node's own entry, and the next ordinary peer to connect crashed every compute
process (``PeerStoreError: 'peer ID not found'`` in identify). The flood also
made each compute node open 1,824 TCP connections to the address the specs
named, and junk floods cost ~150 MB of RSS and ~24,000 WARNING lines a node.

Here a real compute node process (a devstack) is flooded by hostile peers
built from the project's own modules. Every spec names as its requester's
address a port on 127.0.0.1 where a listener only counts connections. Two
waves: one as fast as the link takes it (the peer sending it is over its
gossip budget within a second and gets banned), then one paced just under
the per-forwarder budget, so that every spec reaches the compute role and
only the dial budget stands between the specs and the trap port.
"""

from __future__ import annotations

import contextlib
import re
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils.varint import encode_varint_prefixed

from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.dev.devstack import Devstack, NodeProcess
from node.roles.misbehave import fresh_key_spec_message
from node.transport.guard import GOSSIP_RATE
from node.transport.mesh import OUTBOUND_HIGH_WATER, Mesh, start_mesh
from protocol.limits import DialLimits
from protocol.messages import BID_PROTOCOL, JOBS_TOPIC
from storage.blockstore import MemoryBlockstore
from tests.node.lifecycle_helpers import submit_mlp

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SOME_CID = str(MemoryBlockstore().add_bytes(b"model bytes that are never fetched"))
BURST_SPECS = 1500  # wave 1: as fast as the attacker's link takes them
PACED_SPECS = 1200  # wave 2: under the per-forwarder budget ...
PACED_RATE = 0.85 * GOSSIP_RATE  # ... at this many a second
RSS_GROWTH_BOUND_KB = 48 * 1024  # was ~150 MB for a junk flood before
JUNK_BIDS = 40
LOG_LINES_BOUND = 60  # was one WARNING line per message before


def _vmrss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1))


async def _push(attacker: Mesh, msg: rpc_pb2.Message) -> None:
    """Gossip a message authored by another key, as fast as the outbound queue allows."""
    while attacker._fullest_queue(JOBS_TOPIC) >= OUTBOUND_HIGH_WATER:
        await trio.sleep(0.002)
    await attacker.pubsub.push_msg(attacker.pubsub.my_id, msg)


async def _blast(attacker: Mesh, peer_id: str, msgs: list[rpc_pb2.Message]) -> int:
    """Write the messages straight into the pubsub stream, 50 to an RPC: a flood at link speed."""
    stream = attacker.pubsub.peers[ID.from_base58(peer_id)]
    sent = 0
    try:
        for i in range(0, len(msgs), 50):
            rpc = rpc_pb2.RPC(publish=msgs[i : i + 50])
            await stream.write(encode_varint_prefixed(rpc.SerializeToString()))
            sent += len(rpc.publish)
    except Exception:  # the node hung up on us: that is the point
        pass
    return sent


async def _join(mesh: Mesh, compute: NodeProcess) -> None:
    await mesh.connect(compute.info["listen_addrs"][0])
    with trio.fail_after(15):
        while compute.peer_id not in mesh.topic_peers(JOBS_TOPIC):
            await trio.sleep(0.05)


def _mesh(identity: Identity) -> AbstractAsyncContextManager[Mesh]:
    return start_mesh(identity, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(MemoryBlockstore()))


async def test_a_flood_of_fresh_key_specs_cannot_hurt_a_compute_node(tmp_path: Path) -> None:
    started = time.monotonic()
    with Devstack(tmp_path / "stack", compute=1, bid_window=1.0) as stack:
        compute = stack.compute_nodes[0]
        pid = compute.process.pid
        accepted_at: list[float] = []

        async def count(stream: trio.SocketStream) -> None:
            accepted_at.append(time.monotonic())
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            trap = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
            nursery.start_soon(trio.serve_listeners, count, listeners)

            await trio.sleep(1.0)  # the node settles after start
            rss_before = _vmrss_kb(pid)
            log_before = len(compute.log_path.read_text().splitlines())
            flood_started = time.monotonic()

            # Wave 1: as fast as the link takes it.
            burster = Identity.generate()
            burst = [fresh_key_spec_message(SOME_CID, trap) for _ in range(BURST_SPECS)]
            async with _mesh(burster) as mesh:
                await _join(mesh, compute)
                sent = await _blast(mesh, compute.peer_id, burst)
                with trio.fail_after(15):
                    while compute.peer_id in mesh.connected_peers():
                        await trio.sleep(0.05)
                mesh.nursery.cancel_scope.cancel()

            # Wave 2: paced just under the per-forwarder budget, every spec from a fresh key.
            pacer = Identity.generate()
            async with _mesh(pacer) as mesh:
                await _join(mesh, compute)
                paced_started = trio.current_time()
                for i in range(PACED_SPECS):
                    await trio.sleep_until(paced_started + i / PACED_RATE)
                    await _push(mesh, fresh_key_spec_message(SOME_CID, trap))
                paced_s = trio.current_time() - paced_started
                assert compute.peer_id in mesh.connected_peers(), "a paced peer was banned"
                await trio.sleep(1.5)  # the node works through what it received
                mesh.nursery.cancel_scope.cancel()
            flood_s = time.monotonic() - flood_started

            # An ordinary peer connects and identifies; the node is alive and answers.
            async with _mesh(Identity.generate()) as mesh:
                await _join(mesh, compute)
                identified = mesh.host.get_peerstore().get_protocols(
                    ID.from_base58(compute.peer_id)
                )
                mesh.nursery.cancel_scope.cancel()
            assert identified, "the compute node never identified itself"

            # Junk on the requester's bid protocol gets its sender banned there.
            junker = Identity.generate()
            async with _mesh(junker) as mesh:
                requester_addr = stack.requester.info["listen_addrs"][0]
                await mesh.connect(requester_addr)
                with contextlib.suppress(Exception):
                    frames = await mesh.open(stack.requester.peer_id, BID_PROTOCOL)
                    for i in range(JUNK_BIDS):
                        await frames.write(b"\xff not a bid %d" % i)
                with trio.fail_after(15):
                    while stack.requester.peer_id in mesh.connected_peers():
                        await trio.sleep(0.05)
                mesh.nursery.cancel_scope.cancel()
            requester_log = stack.requester.log_path.read_text()
            assert stack.alive(), compute.log_path.read_text()[-3000:]
            rss_after = _vmrss_kb(pid)
            lines = compute.log_path.read_text().splitlines()[log_before:]
            dials = len(accepted_at)
            nursery.cancel_scope.cancel()

        # A normal job still completes.
        def run_job() -> dict[str, object]:
            with stack.requester.client(timeout=60) as client:
                job = submit_mlp(client, timeout_seconds=30)
                return dict(client.wait_for_job(job["job_id"], timeout=60))

        job = await trio.to_thread.run_sync(run_job)
        assert job["status"] == "completed", job
        assert job["executor"] == compute.peer_id
        assert stack.alive()

    text = "\n".join(lines)
    retries = RetryConfig().max_retries
    dial_bound = DialLimits().most_dials(flood_s + 5, hosts=1) * (1 + retries)
    growth_kb = rss_after - rss_before
    print(
        f"\nflood: {sent} burst specs written (the sender banned), {PACED_SPECS} paced specs in "
        f"{paced_s:.1f} s, whole flood {flood_s:.1f} s; connections to the trap port: "
        f"{dials} (bound {dial_bound}); compute RSS {rss_before // 1024} -> "
        f"{rss_after // 1024} MB; {len(lines)} log lines; test {time.monotonic() - started:.0f} s"
    )
    offsets = [round(t - flood_started, 2) for t in accepted_at]
    assert dials <= dial_bound, (offsets, text[-3000:])
    assert dials >= 1  # the budget allows a few: the trap really was reachable
    assert f"banning peer {burster.peer_id}" in text
    assert f"banning peer {pacer.peer_id}" not in text
    assert len(lines) <= LOG_LINES_BOUND, text[-5000:]
    assert re.search(r"dropped \d+ more bids to unconnected peers at ip4/127\.0\.0\.1", text)
    assert "Traceback" not in text, text[-5000:]
    assert f"banning peer {junker.peer_id}" in requester_log, requester_log[-3000:]
    junk_lines = [line for line in requester_log.splitlines() if junker.peer_id in line]
    assert len(junk_lines) <= 6, junk_lines  # 3 at once, the ban, a summary at most
    assert growth_kb <= RSS_GROWTH_BOUND_KB, f"RSS grew by {growth_kb} kB"

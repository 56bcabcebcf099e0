"""What the job protocol's indispensable steps cost on this machine, against 200 jobs/s.

At 200 jobs/s a machine with C cores has C x 5 ms of CPU per job for every
process together: requester, compute nodes, executor workers and the clients
submitting. The `throughput` benchmark says how far the node is from that in
total; this one asks a different question: how much of that budget is gone
before any node logic runs at all? Each step the design prescribes per job
(design.md section 1: one JSON-RPC call, a gossiped spec, a signed bid from
every bidder, an Accept on a job stream, a progress frame, a receipt, the
result fetched by CID, a settlement, a pooled model run, durable state) is
measured on its own with the real parts the node uses: py-libp2p hosts
(Noise, yamux, gossipsub) on loopback in this process, the devstack's
requester process for the HTTP call, pynacl envelopes, the executor pool's
worker process, the job database. Each cost is multiplied by how many times
the protocol needs it per job at the least (`COUNTS`; no forwarding, no
retries, no refusals, one progress frame), and the sum is the floor.

Variants price the issue's own candidates: job streams reused between a
requester and an executor (no stream opened per job), and signatures only
where a third party must check them (spec, bids, receipt, settlement; the
Accept and progress frames relying on the authenticated channel). One prices
a protocol whose gossip messages, frames and job streams carry BATCH jobs
each, with those messages measured at that size; and one keeps only the steps
done by py-libp2p and pynacl, the parts the project requires.

CPU time, not wall time, is measured (`time.process_time` in this process,
/proc for the node and the worker), so other load on the machine slows the
run but barely moves the figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import BenchResult, Context, Row, children, store_tiny, tiny_workload, usage
from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from node.content.bitswap import Bitswap
from node.executor.pool import ExecutorPool
from node.jobs.store import JobDB
from node.transport.frames import Frames
from node.transport.mesh import Mesh, start_mesh
from protocol.lifecycle import LogEvent
from protocol.messages import Bid
from storage.blockstore import MemoryBlockstore
from storage.cid import cid_for_raw

NAME = "floor"
TITLE = "Per-job floor: the protocol's indispensable steps, each measured, against 200 jobs/s"
GOAL_JOBS_PER_S = 200.0
BIDDERS = 3  # the throughput benchmark's devstack: 1 requester + 3 compute nodes
ECHO = "/meshrun-bench/echo/1"
TOPIC = "meshrun-bench-floor"
# A signed spec is ~700 bytes, a bid or a receipt a few hundred: frames of this size.
FRAME_BYTES = 700
# Jobs per message in the batched variant: what a protocol whose gossip messages,
# frames and job streams carried several jobs would pay per job.
BATCH = 8
GOSSIP_MESSAGES = 200  # per size: both sizes and their warm-ups stay under a burst of 500

# Per job, at the least, with B bidders (design.md section 1).
COUNTS: dict[str, Any] = {
    "rpc_call": 1,  # job.submit with `wait`: one HTTP call a job
    "gossip_to_bidders": 1,  # the spec, published once to B subscribers
    # Frames on streams already open: B bids, a progress frame, the receipt,
    # a want and its block for the result, the settlement; plus the Accept,
    # which is the first frame on the job stream.
    "frame": lambda b: b + 6,
    "stream_open": 1,  # the job stream the Accept opens
    # Signed: the spec, B bids, the Accept, one progress frame, the receipt, the
    # settlement. Opened: the spec by B bidders, B bids, the Accept, the progress
    # frame, the receipt, the settlement.
    "seal": lambda b: b + 5,
    "open": lambda b: 2 * b + 4,
    "pool_run": 1,  # the model, in the executor's worker process
    # Committed writes: the requester's job (created, bidding, assigned, running,
    # completed) and the executor's (created on accept, running, completed).
    "db_write": 8,
}
# Where the Accept and progress frame are not signed: one seal and one open fewer each.
THIRD_PARTY_ONLY = {"seal": -2, "open": -2}
# The steps done entirely by parts the project requires (py-libp2p's Noise, yamux
# and gossipsub; pynacl's Ed25519), with no HTTP, executor or database at all.
REQUIRED_PARTS = ("gossip_to_bidders", "frame", "stream_open", "seal", "open")


def count(name: str, bidders: int = BIDDERS) -> int:
    value = COUNTS[name]
    return int(value(bidders) if callable(value) else value)


async def _cpu_per(n: int, step: Callable[[], Awaitable[object]]) -> float:
    """Microseconds of this process's CPU per await of `step`, over `n` of them."""
    start = time.process_time()
    for _ in range(n):
        await step()
    return (time.process_time() - start) / n * 1e6


async def _echo(frames: Frames) -> None:
    while True:
        try:
            data = await frames.read()
        except Exception:
            return
        await frames.write(data)


async def _connected(hub: Mesh, spoke: Mesh) -> None:
    addr = hub.listen_addrs()[0]
    await spoke.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{hub.peer_id}")


async def measure_transport(repeat: int) -> dict[str, float]:
    """Frames, stream opens and gossip between real py-libp2p hosts in this process
    (both ends' CPU is counted, as both ends run on the machine)."""
    listen = ["/ip4/127.0.0.1/tcp/0"]
    out: dict[str, float] = {}
    hosts = [Identity.generate() for _ in range(BIDDERS + 1)]
    async with (
        start_mesh(hosts[0], listen, Bitswap(MemoryBlockstore())) as hub,
        start_mesh(hosts[1], listen, Bitswap(MemoryBlockstore())) as b1,
        start_mesh(hosts[2], listen, Bitswap(MemoryBlockstore())) as b2,
        start_mesh(hosts[3], listen, Bitswap(MemoryBlockstore())) as b3,
    ):
        spokes = [b1, b2, b3]
        for spoke in spokes:
            await _connected(hub, spoke)
        b1.handle(ECHO, _echo)
        payload = os.urandom(FRAME_BYTES)

        frames = await hub.open(b1.peer_id, ECHO)

        async def round_trip() -> None:
            await frames.write(payload)
            await frames.read()

        await _cpu_per(repeat // 10 + 1, round_trip)  # warm
        out["frame"] = await _cpu_per(repeat, round_trip) / 2
        batch = payload * BATCH

        async def batch_round_trip() -> None:
            await frames.write(batch)
            await frames.read()

        out["frame_batch"] = await _cpu_per(repeat // 4, batch_round_trip) / 2
        await frames.close()

        async def open_once() -> None:
            stream = await hub.open_pipelined(b1.peer_id, ECHO)
            await stream.write(payload)
            await stream.read()
            await stream.close()

        await _cpu_per(5, open_once)
        out["stream_open"] = max(0.0, await _cpu_per(repeat // 4, open_once) - 2 * out["frame"])

        # Fewer: a node takes a burst of 500 gossip messages from one peer, then
        # 100/s (node/transport/guard.py); past that the hub would be dropped.
        n = min(GOSSIP_MESSAGES, repeat // 4)
        out["gossip_to_bidders"] = await _gossip(hub, spokes, payload, n, TOPIC)
        out["gossip_batch"] = await _gossip(hub, spokes, payload * BATCH, n, f"{TOPIC}-batch")
    return out


async def _gossip(hub: Mesh, spokes: list[Mesh], payload: bytes, n: int, topic: str) -> float:
    """CPU per message of `payload`'s size published by `hub` until every spoke has it."""
    subs = [await spoke.subscribe(topic, lambda peer, origin, data: True) for spoke in spokes]
    await hub.subscribe(topic, lambda peer, origin, data: True)
    with trio.fail_after(30):
        while len(hub.topic_peers(topic)) < len(spokes):
            await trio.sleep(0.05)
    received = [0] * len(subs)
    wanted = [0]
    all_in = [trio.Event()]

    async def drain(i: int, sub: Any) -> None:
        while True:
            await sub.get()
            received[i] += 1
            if min(received) >= wanted[0]:
                all_in[0].set()

    seq = [0]

    async def publish(count: int) -> None:
        wanted[0] += count
        all_in[0] = trio.Event()
        for _ in range(count):
            seq[0] += 1
            await hub.publish(topic, payload + seq[0].to_bytes(8, "big"))
            await trio.sleep(0)
        with trio.fail_after(60):
            await all_in[0].wait()

    async with trio.open_nursery() as nursery:
        for i, sub in enumerate(subs):
            nursery.start_soon(drain, i, sub)
        await publish(10)  # warm
        start = time.process_time()
        await publish(n)
        cost = (time.process_time() - start) / n * 1e6
        nursery.cancel_scope.cancel()
    return cost


def measure_envelopes(repeat: int) -> dict[str, float]:
    """Sealing and opening a bid, each one distinct (opened envelopes are cached by
    their bytes, so a repeated one would measure the cache)."""
    identity = Identity.generate()
    job_id = str(cid_for_raw(b"floor"))
    bids = [
        Bid(
            job_id=job_id,
            provider=identity.peer_id,
            price=0.01,
            eta_seconds=0.1,
            execution_providers=["CPUExecutionProvider"],
            device="cpu",
            created_at=time.time() + i,
        )
        for i in range(repeat)
    ]
    start = time.process_time()
    sealed = [seal(identity, bid) for bid in bids]
    seal_us = (time.process_time() - start) / repeat * 1e6
    start = time.process_time()
    for data in sealed:
        open_envelope(data, Bid)
    open_us = (time.process_time() - start) / repeat * 1e6
    return {"seal": seal_us, "open": open_us}


def _tree_cpu(pid: int) -> float:
    return usage(pid, children())[1]


async def measure_pool(repeat: int) -> float:
    """The tiny MLP through the executor pool: this process and the worker's CPU."""
    model, bundle, _ = tiny_workload()
    with tempfile.TemporaryDirectory(prefix="meshrun-floor-") as tmp:
        path = Path(tmp) / "tiny.onnx"
        path.write_bytes(model)
        async with ExecutorPool() as pool:
            await pool.start()
            for _ in range(10):
                await pool.run("tiny", path, bundle, 60.0)
            worker = pool.worker_pid
            assert worker is not None
            before = time.process_time() + usage(worker, {})[1]
            for _ in range(repeat):
                await pool.run("tiny", path, bundle, 60.0)
            after = time.process_time() + usage(worker, {})[1]
            return (after - before) / repeat * 1e6


def measure_db(repeat: int, directory: Path) -> float:
    """One committed event write to the job database (WAL, synchronous=NORMAL)."""
    db = JobDB(directory / "jobs.db")
    try:
        db.connection.execute(
            "INSERT INTO jobs (job_id, role, status, spec_envelope, spec, requester, "
            "created_at, updated_at) VALUES ('floor', 'requester', 'pending', x'', '{}', "
            "'me', 0, 0)"
        )
        start = time.process_time()
        for i in range(repeat):
            db.add_event("floor", LogEvent.CREATED, None, {"i": i})
        return (time.process_time() - start) / repeat * 1e6
    finally:
        db.close()


def measure_rpc(ctx: Context, repeat: int) -> dict[str, float]:
    """One JSON-RPC call to the devstack's requester: its CPU and this client's."""
    stack = ctx.stack(BIDDERS)
    node = stack.requester
    with node.client(timeout=60) as client:
        model_cid, inputs_cid = store_tiny(client)
        job_id = client.submit_job(model_cid, inputs_cid, timeout_seconds=60, wait=30)["job_id"]
        for _ in range(20):
            client.get_job(job_id)
        server_before = _tree_cpu(node.process.pid)
        client_before = time.thread_time()
        for _ in range(repeat):
            client.get_job(job_id)
        client_us = (time.thread_time() - client_before) / repeat * 1e6
        server_us = (_tree_cpu(node.process.pid) - server_before) / repeat * 1e6
    return {"server": server_us, "client": client_us}


def floor_ms(
    costs_us: dict[str, float],
    adjust: dict[str, int] | None = None,
    only: tuple[str, ...] = tuple(COUNTS),
) -> float:
    total = 0.0
    for name in only:
        times = count(name) + (adjust or {}).get(name, 0)
        total += times * costs_us[name]
    return total / 1000.0


def batched_floor_ms(costs_us: dict[str, float], k: int = BATCH) -> float:
    """The floor where each gossip message, frame and job stream carries `k` jobs
    (measured at that size); every job still has its own RPC call, model run,
    database writes and signatures, as a third party must check each one."""
    shared = (
        costs_us["gossip_batch"]
        + count("frame") * costs_us["frame_batch"]
        + count("stream_open") * costs_us["stream_open"]
    )
    own = floor_ms(costs_us, only=("rpc_call", "pool_run", "db_write", "seal", "open"))
    return own + shared / k / 1000.0


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    repeat = 200 if ctx.quick else 2000
    ctx.log(f"floor: each step measured {repeat} times (stream opens and gossip a quarter)")
    costs: dict[str, float] = {}
    rpc = measure_rpc(ctx, max(50, repeat // 4))
    costs["rpc_call"] = rpc["server"] + rpc["client"]
    costs.update(trio.run(measure_transport, repeat))
    costs.update(measure_envelopes(repeat))
    costs["pool_run"] = trio.run(measure_pool, max(50, repeat // 4))
    costs["db_write"] = measure_db(repeat, ctx.scratch("floor"))

    cores = os.cpu_count() or 1
    budget = cores * 1000.0 / GOAL_JOBS_PER_S
    steps = {
        name: {
            "us_each": round(costs[name], 1),
            "per_job": count(name),
            "ms_per_job": round(count(name) * costs[name] / 1000.0, 3),
        }
        for name in COUNTS
    }
    floor = floor_ms(costs)
    reused = floor_ms(costs, {"stream_open": -1})
    third_party = floor_ms(costs, {"stream_open": -1, **THIRD_PARTY_ONLY})
    required = floor_ms(costs, only=REQUIRED_PARTS)
    batched = batched_floor_ms(costs)
    result.details = {
        "cores": cores,
        "bidders": BIDDERS,
        "budget_ms": budget,
        "rpc_us": {k: round(v, 1) for k, v in rpc.items()},
        "steps": steps,
        "floor_ms": round(floor, 2),
        "floor_streams_reused_ms": round(reused, 2),
        "floor_streams_reused_third_party_signatures_ms": round(third_party, 2),
        "required_parts_ms": round(required, 2),
        "batch": BATCH,
        "batch_us": {
            "frame": round(costs["frame_batch"], 1),
            "gossip_to_bidders": round(costs["gossip_batch"], 1),
        },
        "floor_batched_ms": round(batched, 2),
        "per_job_rpc_and_run_ms": round(floor_ms(costs, only=("rpc_call", "pool_run")), 2),
    }
    biggest = sorted(steps.items(), key=lambda kv: -kv[1]["ms_per_job"])[:4]
    where = ", ".join(f"{name} {s['ms_per_job']:.2f}" for name, s in biggest)
    for label, value, note in (
        ("per-job floor, CPU of all processes", floor, f"largest (ms): {where}"),
        ("floor with job streams reused", reused, "no stream opened per job"),
        (
            "floor, streams reused, signed only for third parties",
            third_party,
            "Accept and progress frame unsigned",
        ),
        (
            "py-libp2p and pynacl steps alone",
            required,
            "gossip, frames, the stream open, signing and checking; no HTTP, executor or DB",
        ),
        (
            f"floor with {BATCH} jobs per message",
            batched,
            f"gossip, frames and job streams shared by {BATCH} jobs (measured at that size); "
            "RPC call, model run, DB writes and signatures still per job",
        ),
    ):
        result.add(
            Row(
                label,
                round(value, 2),
                "ms",
                round(budget, 2),
                f"CPU per job at {GOAL_JOBS_PER_S:.0f} jobs/s on {cores} cores",
                round(value / budget, 3),
                f"≤ {budget:.1f} ms",
                value <= budget,
                note,
            )
        )
    return result

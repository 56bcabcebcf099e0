"""5. Result fetch by CID between two processes vs a raw TCP copy and py-libp2p's bitswap.

The peer process (benchmarks.peer) holds the file in an on-disk blockstore
behind the node's mesh, as an executor holds a result. This process fetches
it by CID the way the requester fetches a result (node.content.blocks.fetch_dag, into
an on-disk blockstore, every block hash-checked), then the same bytes over a
plain loopback TCP socket (the ceiling), then with py-libp2p's own bitswap
client (MerkleDag.fetch_file), which is what the node used before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import BenchResult, Context, Row
from crypto.keys import Identity
from node.content.blocks import BitswapStore, fetch_dag
from node.transport.mesh import start_mesh
from storage.blockstore import Blockstore
from storage.cid import Cid

NAME = "fetch"
TITLE = "Result fetch by CID between two processes vs raw TCP and py-libp2p bitswap"
GOAL_MB_S = 100.0
WAN_RTT_MS = 50.0
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_peer(
    data_dir: Path,
    mib: int,
    timeout: float = 120.0,
    prefix: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> tuple[Any, dict[str, Any]]:
    """The serving peer, run under `prefix` (a testbed host's `ip netns exec`) on `host`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "peer.json").unlink(missing_ok=True)
    env = _env()
    log = (data_dir / "peer.log").open("ab")
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "benchmarks.peer", str(data_dir), str(mib), host],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"benchmark peer exited with {process.returncode}; see peer.log")
        path = data_dir / "peer.json"
        if path.exists():
            return process, json.loads(path.read_text())
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("benchmark peer did not start in time")


def tcp_copy(port: int, size: int, host: str = "127.0.0.1") -> float:
    """Seconds to receive `size` bytes over TCP into one buffer."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    start = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:], min(size - got, 1 << 20))
            if not n:
                raise RuntimeError(f"TCP peer closed after {got} of {size} bytes")
            got += n
    return time.perf_counter() - start


async def libp2p_fetches(
    info: dict[str, Any], scratch: Path, bitswap_too: bool, host: str = "127.0.0.1"
) -> dict[str, Any]:
    root = Cid.decode(info["cid"])
    out: dict[str, Any] = {}
    store = Blockstore(scratch / "fetched")
    async with start_mesh(Identity.generate(), [f"/ip4/{host}/tcp/0"], BitswapStore(store)) as mesh:
        peer = await mesh.connect(info["multiaddr"])
        start = time.perf_counter()
        stats = await fetch_dag(mesh, store, root, peer, timeout=600)
        out["meshrun_seconds"] = time.perf_counter() - start
        out["meshrun_stats"] = stats
        start = time.perf_counter()
        data = await trio.to_thread.run_sync(store.cat, root)
        out["read_back_seconds"] = time.perf_counter() - start
        out["verified_bytes"] = len(data)
        del data
        if bitswap_too:
            from libp2p.bitswap.block_store import MemoryBlockStore
            from libp2p.bitswap.client import BitswapClient
            from libp2p.bitswap.dag import MerkleDag
            from libp2p.peer.id import ID

            # A separate client with an empty store on the same host, so nothing
            # fetched above can be served locally.
            client = BitswapClient(mesh.host, MemoryBlockStore())
            client.set_nursery(mesh.nursery)
            # Its stream handlers replace meshrun's bitswap on this host: the peer
            # answers on new streams (as IPFS peers do), which only they read.
            await client.start()
            start = time.perf_counter()
            content, _ = await MerkleDag(client).fetch_file(
                root.to_bytes(), peer_id=ID.from_base58(peer), timeout=120
            )
            out["bitswap_seconds"] = time.perf_counter() - start
            out["bitswap_bytes"] = len(content)
        mesh.nursery.cancel_scope.cancel()
    return out


def _wan(ctx: Context, mib: int) -> dict[str, Any]:
    """The same fetch between two testbed hosts WAN_RTT_MS apart, each in its own
    network namespace (node/dev/testnet.py), with a raw TCP copy over the same
    path as its baseline: the delay is added in userspace per packet, so the
    path itself has a ceiling, and the TCP copy shows it."""
    from node.dev.testnet import Testnet, available

    reason = available()
    if reason is not None:
        return {"skipped": f"no network testbed here: {reason}"}
    scratch = ctx.scratch("fetch-wan")
    with Testnet(hosts=2, rtt_ms=WAN_RTT_MS) as net:
        rtt = net.probe(0, 1, count=5)
        process, _ = start_peer(
            scratch / "peer", mib, prefix=tuple(net.command(1, [])), host=net.addr(1)
        )
        try:
            fetcher = [sys.executable, "-m", "benchmarks.result_fetch", "fetch"]
            done = subprocess.run(
                net.command(0, [*fetcher, str(scratch / "peer"), str(scratch), net.addr(0)]),
                capture_output=True,
                text=True,
                env=_env(),
                timeout=600,
            )
        finally:
            process.kill()
            process.wait()
    if done.returncode != 0:
        return {"skipped": f"the fetcher failed: {done.stderr.strip()[-300:]}"}
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out["rtt_ms"] = round(rtt * 1000, 1)
    return out


def _fetcher(peer_dir: Path, scratch: Path, host: str) -> dict[str, Any]:
    """The fetching side of `_wan`, run inside a testbed host."""
    info = json.loads((peer_dir / "peer.json").read_text())
    size = int(info["bytes"])
    tcp = min(tcp_copy(info["tcp_port"], size, info["tcp_host"]) for _ in range(2))
    out = trio.run(libp2p_fetches, info, scratch, False, host)
    return {
        "bytes": size,
        "tcp_seconds": tcp,
        "meshrun_seconds": out["meshrun_seconds"],
        "verified_bytes": out["verified_bytes"],
    }


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    mib = 8 if ctx.quick else 100
    bitswap_mib = mib if ctx.quick else 25
    scratch = ctx.scratch("fetch")
    ctx.log(f"fetch: {mib} MiB between two processes (bitswap baseline on {bitswap_mib} MiB)")
    figures: dict[str, Any] = {"mib": mib}
    process, info = start_peer(scratch / "peer", mib)
    try:
        size = int(info["bytes"])
        figures["tcp_seconds"] = min(tcp_copy(info["tcp_port"], size) for _ in range(3))
        figures.update(trio.run(libp2p_fetches, info, scratch, bitswap_mib == mib))
    finally:
        process.kill()
        process.wait()
    if bitswap_mib != mib:
        # Bitswap moves ~10 MB/s here: a smaller file keeps the run short, and a
        # rate is a rate (the block count still spans many round trips).
        process, info = start_peer(scratch / "peer-small", bitswap_mib)
        try:
            small = trio.run(libp2p_fetches, info, scratch / "small", True)
            figures["bitswap_seconds"] = small["bitswap_seconds"]
            figures["bitswap_bytes"] = small["bitswap_bytes"]
        finally:
            process.kill()
            process.wait()
    if figures.get("verified_bytes") != size:
        result.skipped = f"fetched {figures.get('verified_bytes')} bytes, expected {size}"
    ours = size / figures["meshrun_seconds"] / 1e6
    tcp = size / figures["tcp_seconds"] / 1e6
    bitswap = figures["bitswap_bytes"] / figures["bitswap_seconds"] / 1e6
    figures.update(
        {
            "meshrun_mb_s": round(ours, 1),
            "tcp_mb_s": round(tcp, 1),
            "bitswap_mb_s": round(bitswap, 1),
        }
    )
    result.details = figures
    result.add(
        Row(
            f"fetch_dag {mib} MiB (into disk blockstore, hash-checked)",
            round(ours, 1),
            "MB/s",
            round(tcp, 1),
            "raw TCP loopback copy MB/s",
            ours / tcp,
            f"≥ {GOAL_MB_S:.0f} MB/s",
            ours >= GOAL_MB_S,
        )
    )
    result.add(
        Row(
            f"  vs py-libp2p bitswap ({bitswap_mib} MiB, MerkleDag.fetch_file)",
            round(ours, 1),
            "MB/s",
            round(bitswap, 1),
            "py-libp2p bitswap MB/s",
            ours / bitswap,
        )
    )
    ctx.log(f"fetch: {mib} MiB between two testbed hosts {WAN_RTT_MS:g} ms apart")
    wan = _wan(ctx, mib)
    figures["wan"] = wan
    label = f"fetch_dag {mib} MiB at {WAN_RTT_MS:g} ms RTT (testbed hosts)"
    if "skipped" in wan:
        result.add(Row(label, None, "MB/s", note=str(wan["skipped"])))
        return result
    if wan["verified_bytes"] != wan["bytes"]:
        result.skipped = f"testbed: fetched {wan['verified_bytes']} of {wan['bytes']} bytes"
    wan_ours = wan["bytes"] / wan["meshrun_seconds"] / 1e6
    wan_tcp = wan["bytes"] / wan["tcp_seconds"] / 1e6
    result.add(
        Row(
            label,
            round(wan_ours, 1),
            "MB/s",
            round(wan_tcp, 1),
            "raw TCP copy over the same path MB/s",
            wan_ours / wan_tcp,
            note=f"probe RTT {wan['rtt_ms']} ms",
        )
    )
    return result


if __name__ == "__main__":
    if sys.argv[1:2] != ["fetch"] or len(sys.argv) != 5:
        sys.exit("usage: python -m benchmarks.result_fetch fetch PEER_DIR SCRATCH HOST")
    print(json.dumps(_fetcher(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])))

"""Numbers for the IPFS storage work (docs/ipfs.md quotes them).

    python benchmarks/ipfs_storage.py [--size-mib 256] [--fetch-mib 32]

1. Import throughput of the streaming UnixFS importer against a bare sha256 of the
   same bytes (the floor: every byte must be hashed once), in memory and into both
   on-disk layouts (packs, the default, and one file per block), each also as a
   ratio to the same run's sha256.
2. Fetch throughput between two node processes over bitswap (`storage.fetch`,
   found through a provider announcement) and over the HTTP gateway.
3. Time to publish a 10 MiB result package to a real IPFS daemon (js-ipfs from
   tests/fixtures/jsipfs): storage.kubo directly and `storage.publish` on a node.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.dev.devstack import Devstack
from storage.blockstore import BaseBlockstore, FileBlockstore, MemoryBlockstore
from storage.cid import Cid
from storage.kubo import KuboBackend
from storage.packstore import PackBlockstore
from storage.unixfs import CHUNK_SIZE, FileImporter
from tests.storage.jsipfs_daemon import JsIpfsDaemon

warnings.filterwarnings("ignore", message=".*'strict' parameter", category=FutureWarning)
MIB = 1024 * 1024


def best(fn: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def import_numbers(size: int) -> dict[str, float]:
    rng = random.Random(1)
    data = b"".join(rng.randbytes(MIB) for _ in range(size // MIB))
    view = memoryview(data)

    def sha_whole() -> None:
        hashlib.sha256(data).digest()

    def sha_chunks() -> None:
        for i in range(0, size, CHUNK_SIZE):
            hashlib.sha256(view[i : i + CHUNK_SIZE]).digest()

    def pieces() -> Iterator[memoryview]:
        return (view[i : i + MIB] for i in range(0, size, MIB))

    def to_memory() -> None:
        importer = FileImporter(lambda cid, block: None)
        for piece in pieces():
            importer.write(piece)
        importer.finish()

    disk: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [0]
        stores: dict[str, Callable[[Path], BaseBlockstore]] = {
            "packs": PackBlockstore,
            "files": FileBlockstore,
        }
        for kind, make in stores.items():

            def to_disk(make: Callable[[Path], BaseBlockstore] = make) -> None:
                runs[0] += 1
                chunks = (data[i : i + MIB] for i in range(0, size, MIB))
                store = make(Path(tmp) / str(runs[0]))
                store.add_stream(chunks)
                store.close()

            disk[kind] = best(to_disk, 2)
    mb = size / 1e6
    sha = best(sha_whole)
    return {
        "size_mib": size / MIB,
        "sha256_whole_MBps": mb / sha,
        "sha256_per_chunk_MBps": mb / best(sha_chunks),
        "import_discard_MBps": mb / best(to_memory),
        "import_to_disk_packs_MBps": mb / disk["packs"],
        "import_to_disk_packs_vs_sha256": sha / disk["packs"],
        "import_to_disk_one_file_per_block_MBps": mb / disk["files"],
        "import_to_disk_one_file_per_block_vs_sha256": sha / disk["files"],
    }


def network_numbers(fetch_size: int, root: Path) -> dict[str, float]:
    daemon = JsIpfsDaemon(root / "jsipfs").start()
    extra = {"requester": ["--ipfs-api", daemon.api]}
    stack = Devstack(root / "stack", compute=1, extra_args=extra)
    out: dict[str, float] = {}
    try:
        stack.start()
        daemon.wait_ready()
        requester, compute = stack.requester, stack.compute_nodes[0]
        data = random.Random(2).randbytes(fetch_size)
        with requester.client(timeout=300) as rc, compute.client(timeout=300) as cc:
            cid = rc.storage_add(data)
            for _ in range(100):
                if cc.call("storage.providers", cid=cid)["providers"]:
                    break
                time.sleep(0.05)
            fetched = cc.call("storage.fetch", cid=cid, timeout=300)
            assert fetched["source"] == "mesh", fetched
            out["fetch_mib"] = fetch_size / MIB
            out["bitswap_fetch_seconds"] = fetched["seconds"]
            out["bitswap_fetch_MBps"] = fetch_size / 1e6 / fetched["seconds"]
            base = compute.rpc_url.rsplit("/rpc", 1)[0]
            headers = {"Authorization": f"Bearer {compute.token}"}
            started = time.perf_counter()
            body = httpx.get(f"{base}/ipfs/{cid}", headers=headers, timeout=300).content
            gw = time.perf_counter() - started
            assert body == data
            out["gateway_read_MBps"] = fetch_size / 1e6 / gw

            # 10 MiB result package published to the daemon.
            import numpy as np

            from node.roles.result_package import build_files

            kubo = KuboBackend(daemon.api)
            direct, via_node = [], []
            for seed in range(3):
                arr = np.random.default_rng(seed).standard_normal(10 * MIB // 4).astype("float32")
                files, _ = build_files(f"bench{seed}", {"y": arr}, {})
                store = MemoryBlockstore()
                root_cid = store.add_tree(files)
                result = kubo.publish(store, root_cid)
                assert result.method == "add"
                direct.append(result.seconds)
            for seed in range(3, 6):
                blob = np.random.default_rng(seed).bytes(10 * MIB)
                one = rc.storage_add(blob)  # queued for the daemon in the background...
                started = time.perf_counter()
                rc.call("storage.publish", cid=one)  # ...and published again, timed, here
                via_node.append(time.perf_counter() - started)
            out["daemon_publish_10MiB_package_seconds_median"] = statistics.median(direct)
            out["daemon_publish_10MiB_via_rpc_seconds_median"] = statistics.median(via_node)
            assert Cid.decode(str(root_cid))
    finally:
        stack.stop()
        daemon.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--fetch-mib", type=int, default=32)
    args = parser.parse_args()
    results = {"import": import_numbers(args.size_mib * MIB)}
    with tempfile.TemporaryDirectory() as tmp:
        results["network"] = network_numbers(args.fetch_mib * MIB, Path(tmp))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

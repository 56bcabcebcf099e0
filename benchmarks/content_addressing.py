"""4. Content addressing: importing bytes into the blockstore vs hashlib.sha256 over them.

Importing is chunking into 256 KiB leaves, hashing each (sha2-256, like Kubo),
building the balanced UnixFS DAG and writing every block to the on-disk
blockstore. A single sha256 pass over the same bytes is the floor any
CID-producing import is measured against. Both on-disk layouts are measured:
packs (storage.packstore, the node's default) and one file per block (what
older data directories keep). The in-memory store row shows how much of the
cost is the disk.

The machine is shared and its speed drifts, so the rounds are interleaved
(sha256, packs, files, memory, then again) and each figure is the best of its
rounds, divided by the best sha256 of the same run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import BenchResult, Context, Row
from storage.blockstore import BaseBlockstore, FileBlockstore, MemoryBlockstore
from storage.packstore import PackBlockstore

NAME = "cid"
TITLE = "Content addressing: blockstore import vs hashlib.sha256 over the same bytes"
GOAL_RATIO = 0.8
ROUNDS = 5


def _file_creation_seconds(directory: Path, count: int) -> float:
    """The filesystem's floor for a one-file-per-block store: create `count` empty files."""
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(directory / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return elapsed


def _interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, setup: Callable[[str], None]
) -> dict[str, list[float]]:
    """Seconds of each fn in every round, the rounds interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            setup(name)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    mib = 16 if ctx.quick else 256
    data = os.urandom(mib << 20)
    rounds = 3 if ctx.quick else ROUNDS
    ctx.log(f"cid: importing {mib} MiB, best of {rounds} interleaved rounds")
    root = ctx.scratch("cid")
    stores: dict[str, Callable[[Path], BaseBlockstore]] = {
        "packs": PackBlockstore,
        "files": FileBlockstore,
    }

    def disk_import(kind: str) -> Callable[[], None]:
        def go() -> None:
            store = stores[kind](root / kind)
            store.add_bytes(data)
            store.close()  # commits the index: part of the import

        return go

    def setup(name: str) -> None:
        # The previous round's store is removed outside the timing.
        shutil.rmtree(root / name, ignore_errors=True)

    def sha256() -> None:
        hashlib.sha256(data).digest()

    def memory() -> None:
        MemoryBlockstore().add_bytes(data)

    times = _interleaved(
        {
            "sha256": sha256,
            "packs": disk_import("packs"),
            "files": disk_import("files"),
            "memory": memory,
        },
        rounds,
        setup,
    )
    best = {name: min(seconds) for name, seconds in times.items()}
    # The same comparison round by round: less flattering, less noisy than best-of.
    paired = {
        name: round(
            statistics.median(s / t for s, t in zip(times["sha256"], seconds, strict=True)), 3
        )
        for name, seconds in times.items()
        if name != "sha256"
    }
    sha = best["sha256"]
    blocks = sum(1 for _ in FileBlockstore(root / "files").iter_cids())
    packs_on_disk = len(list((root / "packs" / "packs").glob("*.pack")))
    for kind in stores:
        shutil.rmtree(root / kind, ignore_errors=True)
    creates = _file_creation_seconds(root / "floor", blocks)
    size_mb = len(data) / 1e6
    result.details = {
        "mib": mib,
        "rounds": rounds,
        "sha256_mb_s": round(size_mb / sha, 1),
        "packs_import_mb_s": round(size_mb / best["packs"], 1),
        "files_import_mb_s": round(size_mb / best["files"], 1),
        "memory_import_mb_s": round(size_mb / best["memory"], 1),
        "blocks": blocks,
        "pack_files": packs_on_disk,
        "creating_that_many_empty_files_s": round(creates, 3),
        "median_round_ratio_vs_sha256": paired,
    }
    rows = (
        (
            "blockstore import (disk, packs: the node's default)",
            best["packs"],
            True,
            f"{blocks} blocks appended to {packs_on_disk} pack file(s), "
            "index in SQLite committed in batches",
        ),
        (
            "blockstore import (disk, one file per block)",
            best["files"],
            False,
            f"the layout older data dirs keep; creating {blocks} empty files here alone "
            f"takes {creates:.2f} s ({100 * creates / best['files']:.0f}% of the import)",
        ),
        (
            "import, in-memory store",
            best["memory"],
            False,
            "the same import with blocks kept in memory: the CID pipeline alone",
        ),
    )
    for label, seconds, is_goal, note in rows:
        result.add(
            Row(
                f"{label}, {mib} MiB",
                round(size_mb / seconds, 1),
                "MB/s",
                round(size_mb / sha, 1),
                "hashlib.sha256 MB/s (same run)",
                sha / seconds,
                f"≥ {GOAL_RATIO}x sha256" if is_goal else "",
                (sha / seconds >= GOAL_RATIO) if is_goal else None,
                note,
            )
        )
    return result

"""4. Content addressing: importing bytes into the blockstore vs hashlib.sha256 over them.

Importing is chunking into 256 KiB leaves, hashing each (sha2-256, like Kubo),
building the balanced UnixFS DAG and writing every block to the on-disk
blockstore. A single sha256 pass over the same bytes is the floor any
CID-producing import is measured against. The in-memory store row shows how
much of the cost is the disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import BenchResult, Context, Row
from storage.blockstore import Blockstore, MemoryBlockstore

NAME = "cid"
TITLE = "Content addressing: blockstore import vs hashlib.sha256 over the same bytes"
GOAL_RATIO = 0.8
ROUNDS = 3


def _best_seconds(fn: object, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def _file_creation_seconds(directory: Path, count: int) -> float:
    """The filesystem's floor for a one-file-per-block store: create `count` empty files."""
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(directory / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return elapsed


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    mib = 16 if ctx.quick else 256
    data = os.urandom(mib << 20)
    ctx.log(f"cid: importing {mib} MiB, best of {ROUNDS}")
    sha = _best_seconds(lambda: hashlib.sha256(data).digest(), ROUNDS)
    memory = _best_seconds(lambda: MemoryBlockstore().add_bytes(data), ROUNDS)
    root = ctx.scratch("cid")

    def disk_import() -> None:
        shutil.rmtree(root / "store", ignore_errors=True)
        Blockstore(root / "store").add_bytes(data)

    disk = _best_seconds(disk_import, ROUNDS)
    blocks = sum(1 for _ in Blockstore(root / "store").iter_cids())
    shutil.rmtree(root / "store", ignore_errors=True)
    creates = _file_creation_seconds(root / "floor", blocks)
    size_mb = len(data) / 1e6
    result.details = {
        "mib": mib,
        "sha256_mb_s": round(size_mb / sha, 1),
        "memory_import_mb_s": round(size_mb / memory, 1),
        "disk_import_mb_s": round(size_mb / disk, 1),
        "blocks": blocks,
        "creating_that_many_empty_files_s": round(creates, 3),
    }
    for label, seconds in (("blockstore import (disk)", disk), ("import, in-memory store", memory)):
        value = size_mb / seconds
        is_goal = label.endswith("(disk)")
        result.add(
            Row(
                f"{label}, {mib} MiB",
                round(value, 1),
                "MB/s",
                round(size_mb / sha, 1),
                "hashlib.sha256 MB/s",
                sha / seconds,
                f"≥ {GOAL_RATIO}x sha256" if is_goal else "",
                (sha / seconds >= GOAL_RATIO) if is_goal else None,
                (
                    f"{blocks} blocks, one file each; creating {blocks} empty files here "
                    f"alone takes {creates:.2f} s ({100 * creates / disk:.0f}% of the import)"
                )
                if is_goal
                else "the same import with blocks kept in memory: the CID pipeline alone",
            )
        )
    return result

"""A zip-bomb input cannot grow the node or its worker.

Measured before the fix: a 2 MiB .npz that expands to 2 GiB ran and completed,
worker peak 8.4 GB; the input-size check looked at compressed bytes only. Now
the pool reads each member's zip entry and .npy header, sums what loading would
allocate, and refuses more than the per-job memory limit before any worker
sees the bytes.

Bound asserted here: the node process (this test's process) grows by less than
64 MiB, in resident and in peak memory, while refusing an 8 MiB bundle that
declares 8 GiB, five times over; no worker process is started.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from node.dev.models import build_mlp
from node.executor import ExecutorPool
from node.executor.memory import rss_bytes
from protocol.errors import ErrorCode, MeshrunError
from tests.adversarial.bombs import zip_bomb

MIB = 1 << 20
BOUND = 64 * MIB


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_zip_bomb_is_refused_and_the_node_does_not_grow(tmp_path: Path) -> None:
    bomb = zip_bomb(2048, members=4)  # 8 GiB of float32 zeros in ~8 MiB
    assert len(bomb) < 10 * MIB
    model = tmp_path / "mlp.onnx"
    model.write_bytes(build_mlp())
    async with ExecutorPool(providers=["CPUExecutionProvider"]) as pool:  # default limit
        assert pool.max_job_memory <= 4096 * MIB
        rss, peak = rss_bytes(os.getpid()), peak_rss()
        assert rss is not None
        started = time.perf_counter()
        for _ in range(5):
            with pytest.raises(MeshrunError) as info:
                await pool.run("mlp", model, bomb, timeout=30.0)
            assert info.value.code is ErrorCode.INPUT_TOO_LARGE
            assert info.value.details["inputs_bytes"] == 8192 * MIB
        assert time.perf_counter() - started < 5.0
        assert pool.worker_pid is None
        grown = (rss_bytes(os.getpid()) or 0) - rss
        assert grown < BOUND, f"node grew {grown >> 20} MiB refusing a zip bomb"
        assert peak_rss() - peak < BOUND

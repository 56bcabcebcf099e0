"""Data-parallel runs: a job's batch split across several executor pools and merged back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio

from node.dev.models import build_lookup_model, build_mlp, make_inputs
from node.executor import ExecutorPool
from node.executor.split import merge_outputs, run_split, split_inputs, split_sizes
from node.executor.tensors import decode_tensors, encode_tensors
from protocol.errors import ErrorCode, MeshrunError

CPU = "CPUExecutionProvider"
TIMEOUT = 20.0


def test_uneven_batch_splits_contiguously_first_parts_larger() -> None:
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    ids = np.arange(5, dtype=np.int64)
    parts = [decode_tensors(p) for p in split_inputs(encode_tensors({"x": x, "ids": ids}), 2)]
    assert [p["x"].shape[0] for p in parts] == [3, 2]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), x)
    np.testing.assert_array_equal(parts[1]["ids"], [3, 4])
    assert all(p["ids"].dtype == np.int64 for p in parts)
    assert split_sizes(7, 3) == [3, 2, 2]


def test_more_parts_than_items_gives_one_item_each() -> None:
    bundle = encode_tensors({"x": np.zeros((2, 4), np.float32)})
    assert [decode_tensors(p)["x"].shape for p in split_inputs(bundle, 8)] == [(1, 4), (1, 4)]
    # One part: the bundle itself, not a re-encoded copy.
    assert split_inputs(bundle, 1) == [bundle]


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        (
            {"x": np.zeros((4, 2), np.float32), "mask": np.zeros((3, 2), bool)},
            r"do not share a leading \(batch\) dimension.*'x' \(4, 2\), 'mask' \(3, 2\)",
        ),
        (
            {"x": np.zeros((4, 2), np.float32), "n": np.array(3, np.int64)},
            r"'n' are scalars.*'n' \(\)",
        ),
        ({"x": np.zeros((0, 2), np.float32)}, r"batch is empty.*'x' \(0, 2\)"),
        ({}, r"no inputs"),
    ],
    ids=["mismatched", "scalar", "empty-batch", "no-inputs"],
)
def test_inputs_without_a_shared_batch_are_refused(
    tensors: dict[str, np.ndarray], expected: str
) -> None:
    with pytest.raises(MeshrunError, match=expected) as info:
        split_inputs(encode_tensors(tensors), 2)
    assert info.value.code is ErrorCode.INVALID_SPEC


def test_oversized_or_malformed_bundles_are_refused_before_decoding() -> None:
    bundle = encode_tensors({"x": np.zeros((4, 256), np.float32)})
    with pytest.raises(MeshrunError) as info:
        split_inputs(bundle, 2, max_bytes=1024)
    assert info.value.code is ErrorCode.INPUT_TOO_LARGE
    with pytest.raises(MeshrunError, match=r"\.npz") as info:
        split_inputs(b"not npz", 2)
    assert info.value.code is ErrorCode.EXECUTION_FAILED


def test_merge_concatenates_in_order() -> None:
    a = {"y": np.array([[1.0], [2.0]]), "ids": np.array([0, 1])}
    b = {"ids": np.array([2]), "y": np.array([[3.0]])}
    merged = merge_outputs([a, b], [2, 1])
    assert list(merged) == ["y", "ids"]
    np.testing.assert_array_equal(merged["y"], [[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(merged["ids"], [0, 1, 2])


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        # A per-job summary (e.g. a mean over the batch): same shape whatever the part size.
        ([{"m": np.zeros(4)}, {"m": np.zeros(4)}], r"'m' has shape \(4,\) for part 0 of 3"),
        ([{"m": np.array(1.0)}, {"m": np.array(2.0)}], r"'m' has shape \(\)"),
        ([{"y": np.zeros((3, 2))}, {"z": np.zeros((2, 2))}], r"part 1 returned outputs"),
        ([{"y": np.zeros((3, 2))}, {"y": np.zeros((2, 5))}], r"'y' is float64\(2, 5\)"),
    ],
    ids=["fixed-leading", "scalar", "names", "trailing"],
)
def test_merge_refuses_unbatched_outputs(parts: list[dict[str, np.ndarray]], expected: str) -> None:
    with pytest.raises(MeshrunError, match=expected) as info:
        merge_outputs(parts, [3, 2])
    assert info.value.code is ErrorCode.EXECUTION_FAILED
    assert "not batched" in info.value.message


# Two real CPU workers, started side by side. pytest-trio runs each test in its own
# event loop, so pools cannot be module-scoped: the device checks share few tests.
@pytest.fixture
async def pools() -> AsyncIterator[list[ExecutorPool]]:
    async with ExecutorPool([CPU], threads=1) as a, ExecutorPool([CPU], threads=1) as b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.start)
            nursery.start_soon(b.start)
        yield [a, b]


async def test_split_across_two_pools_is_bitwise_one_pool_run(
    pools: list[ExecutorPool], tmp_path: Path
) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(build_mlp(in_dim=16, hidden=64, layers=3))
    inputs = encode_tensors(make_inputs(in_dim=16, batch=9, seed=3))
    # Bitwise equality needs nothing beyond threads=1 pools (deterministic=False):
    # each row of a Gemm is reduced the same way whatever the batch size.
    single = await pools[0].run("mlp", model, inputs, timeout=TIMEOUT)

    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))

    # log_level="info": each part's new session logs its start, which proves both pools ran.
    split = await run_split(
        pools, "mlp", model, inputs, TIMEOUT, on_progress=progress, log_level="info"
    )
    assert split.outputs["y"].shape == (9, 4)
    assert np.array_equal(split.outputs["y"], single.outputs["y"])
    assert split.outputs["y"].tobytes() == single.outputs["y"].tobytes()
    # Same bytes, so the same result CID as the one-device run.
    assert split.outputs_npz == single.outputs_npz
    assert split.provider == CPU
    assert split.timings["split_parts"] == 2
    assert split.worker_pid == pools[0].worker_pid != pools[1].worker_pid
    assert split.cold_start is True
    assert split.stderr.startswith("--- part 0 ---\n")
    assert split.stderr.count("Session successfully initialized") == 2
    assert "--- part 1 ---\n" in split.stderr
    assert split.resources["cpu_s"] >= 0 and "max_rss_mb" in split.resources
    assert seen[-1] == (9, 9)
    assert all(total == 9 for _, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    # A failing part (wrong feature dim) raises one MeshrunError, not a group,
    # and both pools serve the next job.
    bad = encode_tensors({"x": np.zeros((4, 15), np.float32)})
    with pytest.raises(MeshrunError, match=r"expects size 16 on axis 1") as info:
        await run_split(pools, "mlp", model, bad, TIMEOUT)
    assert info.value.code is ErrorCode.EXECUTION_FAILED
    assert info.value.details["split_parts"] == 2

    mismatched = encode_tensors({"x": np.zeros((4, 16), np.float32), "z": np.zeros(3)})
    with pytest.raises(MeshrunError, match=r"'x' \(4, 16\), 'z' \(3,\)") as info:
        await run_split(pools, "mlp", model, mismatched, TIMEOUT)
    assert info.value.code is ErrorCode.INVALID_SPEC

    again = await run_split(pools, "mlp", model, inputs, TIMEOUT, batch_chunk=2)
    assert again.outputs_npz == single.outputs_npz
    # A part cancelled because its sibling failed loses its worker (the pool
    # cannot reuse a worker stopped mid-job), so "again" may be a cold start.
    assert None not in (pools[0].worker_pid, pools[1].worker_pid)


async def test_failing_first_part_keeps_its_finished_items_as_a_prefix(
    pools: list[ExecutorPool], tmp_path: Path
) -> None:
    model_bytes, table = build_lookup_model(rows=4)
    model = tmp_path / "lookup.onnx"
    model.write_bytes(model_bytes)
    # Part 0 is items 0..1: item 1 indexes past the table. Part 1 is fine.
    idx = np.array([2, 99, 0, 1], dtype=np.int64)
    with pytest.raises(
        MeshrunError, match=r"items 1\.\.1 of 2 failed.*in part 0 of 2: batch items 0\.\.1"
    ) as info:
        await run_split(
            pools, "lookup", model, encode_tensors({"idx": idx}), TIMEOUT, batch_chunk=1
        )
    error = info.value
    assert error.code is ErrorCode.EXECUTION_FAILED
    assert error.details["split_part"] == 0
    assert error.details["partial_items"] == 1
    assert error.partial_outputs is not None
    np.testing.assert_array_equal(error.partial_outputs["y"], table[[2]])

    ok = await run_split(pools, "lookup", model, encode_tensors({"idx": idx % 4}), TIMEOUT)
    np.testing.assert_array_equal(ok.outputs["y"], table[idx % 4])

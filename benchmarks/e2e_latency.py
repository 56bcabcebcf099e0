"""1. End-to-end job latency: submit → completed, by phase, on a real devstack.

The phases come from clocks the job itself leaves behind, not from extra
instrumentation: the requester's event log (Published, BidAccepted,
ResultsPublished, ReceiptVerified, Completed), the winning bid's creation
time (when the executor heard the gossip) and the receipt's timings (fetch,
execute, publish) and start/finish times. All processes share one machine,
so their wall clocks agree to well under a millisecond.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from benchmarks.common import (
    BenchResult,
    Context,
    Row,
    ratio,
    raw_ort_ms,
    store_tiny,
    summary_ms,
    tiny_workload,
)
from node.client import Client

NAME = "latency"
TITLE = "End-to-end job latency (1 requester + 3 compute processes, tiny MLP)"
COMPUTE = 3
GOAL_P50_MS = 100.0
BACALHAU_NOOP_MS = 630.0

PHASES = (
    "submit_rpc",
    "gossip",
    "bid_window",
    "accept",
    "fetch",
    "execute",
    "publish",
    "receipt_send",
    "result_fetch",
    "receipt_verify",
    "notify",
)


def _first(events: list[dict[str, Any]], kind: str) -> float | None:
    for event in events:
        if event["type"] == kind:
            return float(event["at"])
    return None


def job_phases(
    job: Mapping[str, Any],
    events: list[dict[str, Any]],
    bids: list[dict[str, Any]],
    submitted: float,
    returned: float,
) -> dict[str, float]:
    """Milliseconds per phase of one completed job; phases it cannot see are left out.

    ``submitted``/``returned`` are this process's wall clock around the submit
    call and the wait that saw the job terminal.
    """
    ms: dict[str, float] = {}
    created = _first(events, "Created")
    published = _first(events, "Published")
    accepted = _first(events, "BidAccepted")
    results = _first(events, "ResultsPublished")
    verified = _first(events, "ReceiptVerified")
    completed = _first(events, "Completed")
    receipt = job.get("receipt") or {}
    timings = receipt.get("timings_ms") or {}
    winner = next(
        (b for b in bids if b.get("provider") == job.get("executor") and b.get("kind") == "bid"),
        None,
    )
    heard = float(winner["created_at"]) if winner and winner.get("created_at") else None

    def put(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            ms[name] = (end - start) * 1000.0

    put("submit_rpc", submitted, created)
    put("gossip", published, heard)
    put("bid_window", heard, accepted)
    put("accept", accepted, receipt.get("started_at"))
    for phase, key in (("fetch", "fetch_ms"), ("publish", "publish_ms")):
        if key in timings:
            ms[phase] = float(timings[key])
    execute = timings.get("total_ms", timings.get("run_ms"))
    if execute is not None:
        ms["execute"] = float(execute)
    put("receipt_send", receipt.get("finished_at"), results)
    fetch = None
    for event in events:
        if event["type"] == "ReceiptVerified":
            fetch = (event.get("data") or {}).get("fetch") or {}
    if fetch and "seconds" in fetch:
        ms["result_fetch"] = float(fetch["seconds"]) * 1000.0
        if results is not None and verified is not None:
            ms["receipt_verify"] = max(0.0, (verified - results) * 1000.0 - ms["result_fetch"])
    put("notify", completed, returned)
    ms["total"] = (returned - submitted) * 1000.0
    return ms


def run_jobs(
    client: Client, model_cid: str, inputs_cid: str, count: int
) -> tuple[list[dict[str, float]], list[str]]:
    """Submit and wait for `count` jobs one after another; phases of each, and failures."""
    phases: list[dict[str, float]] = []
    problems: list[str] = []
    for _ in range(count):
        submitted = time.time()
        job = client.submit_job(model_cid, inputs_cid, timeout_seconds=30)
        job = client.wait_for_job(job["job_id"], timeout=60, poll_interval=0.05)
        returned = time.time()
        if job["status"] != "completed":
            problems.append(f"{job['job_id']}: {job['status']} {job.get('error')}")
            continue
        events = client.call("job.events", job_id=job["job_id"])["events"]
        bids = client.call("job.bids", job_id=job["job_id"])["bids"]
        phases.append(job_phases(job.to_dict(), events, bids, submitted, returned))
    return phases, problems


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    jobs = 10 if ctx.quick else 100
    warmup = 2 if ctx.quick else 5
    stack = ctx.stack(COMPUTE)
    with stack.requester.client(timeout=60) as client:
        model_cid, inputs_cid = store_tiny(client)
        ctx.log(f"latency: {warmup} warm-up jobs, then {jobs} measured jobs")
        _, warm_problems = run_jobs(client, model_cid, inputs_cid, warmup)
        phases, problems = run_jobs(client, model_cid, inputs_cid, jobs)
    model, _, inputs = tiny_workload()
    raw = raw_ort_ms(model, inputs, repeat=max(200, jobs))
    totals = [p["total"] for p in phases]
    by_phase = {
        name: summary_ms([p[name] for p in phases if name in p]) for name in (*PHASES, "total")
    }
    raw_summary = summary_ms(raw)
    result.details = {
        "jobs": jobs,
        "completed": len(phases),
        "failed": problems + warm_problems,
        "phases_ms": by_phase,
        "raw_onnxruntime_ms": raw_summary,
        "stack_start_seconds": round(ctx.stack_start_seconds.get(COMPUTE, 0.0), 2),
    }
    if not totals:
        result.skipped = f"no job completed: {problems[:3]}"
        return result
    p50, p95 = by_phase["total"]["p50"], by_phase["total"]["p95"]
    base = raw_summary["p50"]
    result.add(
        Row(
            "submit→completed p50",
            p50,
            "ms",
            base,
            "raw onnxruntime in-process p50",
            ratio(p50, base),
            f"p50 ≤ {GOAL_P50_MS:.0f} ms",
            p50 <= GOAL_P50_MS,
            f"Bacalhau no-op job: {BACALHAU_NOOP_MS:.0f} ms ({BACALHAU_NOOP_MS / p50:.1f}x ours)",
        )
    )
    result.add(
        Row(
            "submit→completed p95",
            p95,
            "ms",
            raw_summary["p95"],
            "raw onnxruntime in-process p95",
            ratio(p95, raw_summary["p95"]),
        )
    )
    for name in PHASES:
        stats = by_phase.get(name)
        if stats:
            result.add(
                Row(
                    f"  phase {name} p50",
                    stats["p50"],
                    "ms",
                    note=f"p95 {stats['p95']:.1f} ms, {100 * stats['p50'] / p50:.0f}% of p50",
                )
            )
    if problems:
        result.add(Row("jobs not completed", len(problems), "jobs", goal="0", goal_met=False))
    return result

"""7. Gossip reach and bid collection with every node on its own host: N compute
nodes, each in its own network namespace (node/dev/testnet.py), up to 64.

The loopback `gossip` benchmark shares one network stack among all processes;
here each node has its own kernel TCP stack and address on a bridge, the way
separate machines would (without delay, so the figures stay comparable with
the loopback ones taken just before). One testbed is built for the largest
size and the devstack grows in place, like `gossip`'s. Next to reach and the
bid window it reports what each node costs as N grows: resident memory of a
compute node with its worker processes, and CPU per job of compute nodes and
the requester, read from /proc (the testbed is Linux-only anyway).

Skipped, with the reason, where a testbed cannot be built (not root, no
nftables); CI runs as root and runs the quick variant.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import BenchResult, Context, Row, children, usage
from benchmarks.gossip_scale import measure, sweep
from node.client import Client
from node.dev.testnet import Testnet, available

NAME = "gossip-netns"
TITLE = "Gossip reach, bid window, memory and CPU per node vs N, one network namespace per node"
SIZES_FULL = (8, 16, 32, 64)
SIZES_QUICK = (3,)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _step(stack: Any, client: Any, n: int, jobs: int, model: str, inputs: str) -> dict[str, Any]:
    """`measure` at size n, with each node's memory and CPU per job around it."""
    pids = {node.name: node.process.pid for node in stack.nodes}
    kids = children()
    before = {name: usage(pid, kids) for name, pid in pids.items()}
    started = time.perf_counter()
    step = measure(client, n, jobs, model, inputs)
    wall = time.perf_counter() - started
    kids = children()
    after = {name: usage(pid, kids) for name, pid in pids.items()}
    compute = [name for name in pids if name != "requester"]
    cpu = [(after[c][1] - before[c][1]) / jobs * 1000 for c in compute]
    rss = [after[c][0] / 2**20 for c in compute]
    step.update(
        {
            "wall_per_job_ms": round(wall / jobs * 1000, 1),
            "compute_rss_mib": {"median": round(_median(rss), 1), "max": round(max(rss), 1)},
            "compute_cpu_ms_per_job": {
                "median": round(_median(cpu), 2),
                "max": round(max(cpu), 2),
            },
            "requester_rss_mib": round(after["requester"][0] / 2**20, 1),
            "requester_cpu_ms_per_job": round(
                (after["requester"][1] - before["requester"][1]) / jobs * 1000, 2
            ),
        }
    )
    return step


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    reason = available()
    if reason is not None:
        result.skipped = f"no network testbed here: {reason}"
        return result
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    jobs = 3 if ctx.quick else 12
    ctx.close()  # the shared loopback devstack would only steal CPU
    with Testnet(hosts=sizes[-1] + 1) as net:
        ctx.log(f"gossip-netns: {sizes[-1] + 1} hosts, each its own network namespace")
        stack = net.devstack(ctx.scratch("gossip-netns"), compute=sizes[-1], log_level="warning")
        stack.compute_count = sizes[0]  # placed for the largest size, started at the first

        def measure_at(client: Client, n: int, model: str, inputs: str) -> dict[str, Any]:
            return _step(stack, client, n, jobs, model, inputs)

        steps, stopped = sweep(ctx, stack, sizes, measure_at, "gossip-netns", "compute hosts")
    result.details = {"steps": steps, "stopped": stopped}
    for step in steps:
        n = step["compute"]
        reach, window = step["reach_all_ms"], step["window_ms"]
        result.add(
            Row(
                f"N={n} hosts: gossip reach to all p50",
                reach.get("p50"),
                "ms",
                note=(
                    f"p95 {reach.get('p95')} ms; answers {step['answers_mean']}/{n} "
                    f"(all answered in {100 * step['all_answered_fraction']:.0f}% of jobs), "
                    f"{step['failed']} failed"
                ),
            )
        )
        result.add(
            Row(
                f"N={n} hosts: bid window closed p50",
                window.get("p50"),
                "ms",
                note=f"p95 {window.get('p95')} ms",
            )
        )
        result.add(
            Row(
                f"N={n} hosts: compute node RSS (with workers), median",
                step["compute_rss_mib"]["median"],
                "MiB",
                note=(
                    f"max {step['compute_rss_mib']['max']} MiB; requester "
                    f"{step['requester_rss_mib']} MiB"
                ),
            )
        )
        result.add(
            Row(
                f"N={n} hosts: CPU per job, compute median / requester",
                step["compute_cpu_ms_per_job"]["median"],
                "ms",
                note=(
                    f"compute max {step['compute_cpu_ms_per_job']['max']} ms; requester "
                    f"{step['requester_cpu_ms_per_job']} ms"
                ),
            )
        )
    if stopped:
        result.add(Row("mesh growth", None, "", note=stopped))
    return result

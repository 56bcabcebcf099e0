"""Hostile peers cannot hurt a node: honest jobs during a flood of job specs.

One hostile peer (benchmarks.hostile_peer, its own process) connects to a
compute node and to the requester of the shared devstack and gossips job
specs at a fixed rate over its one connection to the compute node (the one
that won the warm-up jobs: the node doing the honest work is the one
flooded). Each spec is validly signed by a key made for it alone, so no
signature check or seen-cache can stop them: only the node's per-forwarder
gossip budget and its peer scores can (node/transport/guard.py). Meanwhile
one client submits honest tiny-MLP jobs one after another, as the `latency`
benchmark does.
It runs after `throughput`, on the same 1 requester + 3 compute devstack.

Reported: the honest jobs' p50 submit → completed during the flood against
the quiet p50 measured moments before on the same devstack, the share of
honest jobs that completed, how much resident memory (VmRSS) the flooded
compute node and the requester gained, and whether the flood's sender was
banned: the node logs "banning peer <id>", its `node.peers` no longer lists
the sender, and a reconnect is closed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.common import BenchResult, Context, Row, ratio, store_tiny, summary_ms
from node.client import Client, RpcError
from node.dev.devstack import NodeProcess

NAME = "hostile"
TITLE = "Honest jobs while one hostile peer floods a compute node with fresh-key job specs"
COMPUTE = 3
RATE_FULL, SECONDS_FULL, QUIET_FULL, WARMUP_FULL = 200.0, 15.0, 30, 5
RATE_QUICK, SECONDS_QUICK, QUIET_QUICK, WARMUP_QUICK = 300.0, 4.0, 5, 2
JOB_TIMEOUT_S = 30.0
WAIT_S = 60.0
# After its last spec the sender waits this long for the node (still working
# through what it received) to disconnect it.
WATCH_S, WATCH_QUICK_S = 20.0, 5.0
PEERS_SAMPLES, PEERS_GAP_S = 5, 0.2
SETTLE_S = 2.0  # after the flood, before the "after" RSS is read
RSS_SAMPLE_S = 0.2
GOAL_COMPLETED = 0.99
GOAL_P50_RATIO = 3.0
GOAL_RSS_MB = 50.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    status: str
    ms: float
    error: str = ""
    executor: str = ""
    started: float = 0.0  # time.monotonic() at submit


def vmrss_kb(pid: int) -> int | None:
    """Resident memory of a process, from /proc/<pid>/status; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def run_jobs(
    client: Client, model_cid: str, inputs_cid: str, more: Callable[[int], bool]
) -> list[Outcome]:
    """Honest jobs one after another while `more(jobs done so far)` says so."""
    out: list[Outcome] = []
    while more(len(out)):
        started = time.monotonic()
        try:
            job = client.submit_job(model_cid, inputs_cid, timeout_seconds=JOB_TIMEOUT_S)
            job = client.wait_for_job(job["job_id"], timeout=WAIT_S, poll_interval=0.05)
            error = job.get("error") or {}
            reason = f"{error.get('code')}: {error.get('message')}" if error else ""
            ms = (time.monotonic() - started) * 1000
            executor = str(job.get("executor") or "")
            out.append(Outcome(str(job["status"]), ms, reason, executor, started))
        except RpcError as exc:
            ms = (time.monotonic() - started) * 1000
            out.append(Outcome("error", ms, str(exc)[:200], started=started))
    return out


class RssSampler(threading.Thread):
    """The highest VmRSS of each process, sampled every RSS_SAMPLE_S until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                kb = vmrss_kb(pid)
                if kb is not None:
                    self.peak[name] = max(self.peak.get(name, 0), kb)
            if self.halt.wait(RSS_SAMPLE_S):
                return


class Sender:
    """The flood sender process: commands on its stdin, JSON lines back on its stdout."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.log_path = workdir / "hostile-peer.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.hostile_peer", json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the flood sender did not answer in {timeout:.0f} s") from None
        if line is None:
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"the flood sender exited ({self.process.poll()}): {tail}")
        return dict(json.loads(line))

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.reply(timeout)

    def close(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def _addr(node: NodeProcess) -> str:
    addr = str(node.info["listen_addrs"][0])
    return addr if "/p2p/" in addr else f"{addr}/p2p/{node.peer_id}"


def _listed(node: NodeProcess, peer: str) -> int:
    """In how many of PEERS_SAMPLES `node.peers` answers `peer` is connected to `node`.

    Sampled because a banned peer that redials is connected for a moment
    before the node closes the connection again.
    """
    seen = 0
    with node.client(timeout=30) as client:
        for i in range(PEERS_SAMPLES):
            if i:
                time.sleep(PEERS_GAP_S)
            seen += peer in [str(p) for p in client.call("node.peers")["peers"]]
    return seen


def _log_size(node: NodeProcess) -> int:
    try:
        return node.log_path.stat().st_size
    except OSError:
        return 0


def _log_since(node: NodeProcess, offset: int) -> str:
    with node.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def _top_errors(outcomes: list[Outcome], limit: int = 5) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.status != "completed":
            key = f"{outcome.status}: {outcome.error}"[:160]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE)
    rate, seconds = (RATE_QUICK, SECONDS_QUICK) if ctx.quick else (RATE_FULL, SECONDS_FULL)
    quiet_jobs, warmup = (QUIET_QUICK, WARMUP_QUICK) if ctx.quick else (QUIET_FULL, WARMUP_FULL)
    stack = ctx.stack(COMPUTE)
    requester = stack.requester
    with requester.client(timeout=WAIT_S + 10) as client:
        model_cid, inputs_cid = store_tiny(client)
        ctx.log(f"hostile: {warmup} warm-up jobs")
        warm = run_jobs(client, model_cid, inputs_cid, lambda done: done < warmup)
    # Flood the node that wins honest jobs when all is quiet (bids are ranked
    # by price, then eta, then peer id, so on a devstack it wins most of them).
    winners = [o.executor for o in warm if o.status == "completed"]
    target = max(
        stack.compute_nodes, key=lambda n: (winners.count(n.peer_id), -stack.compute_nodes.index(n))
    )
    workdir = ctx.scratch("hostile")
    config: dict[str, Any] = {
        "data_dir": str(workdir),
        "compute": _addr(target),
        "requester": _addr(requester),
        "rate": rate,
        "seconds": seconds,
        "watch": WATCH_QUICK_S if ctx.quick else WATCH_S,
        "count": int(rate * seconds) + 1,
    }
    ctx.log(f"hostile: a flood sender builds {config['count']} fresh-key specs and joins")
    sender = Sender(workdir, config)
    try:
        ready = sender.reply(timeout=180)
        sender_id = str(ready["peer_id"])
        with requester.client(timeout=WAIT_S + 10) as client:
            ctx.log(f"hostile: {quiet_jobs} quiet jobs")
            quiet = run_jobs(client, model_cid, inputs_cid, lambda done: done < quiet_jobs)
            pids = {"compute": target.process.pid, "requester": requester.process.pid}
            others = [n for n in stack.compute_nodes if n is not target]
            pids |= {n.name: n.process.pid for n in others}
            rss_before = {name: vmrss_kb(pid) or 0 for name, pid in pids.items()}
            logs_at = {"compute": _log_size(target), "requester": _log_size(requester)}
            sampler = RssSampler(pids)
            sampler.start()
            ctx.log(f"hostile: {rate:.0f} specs/s for {seconds:.0f} s, honest jobs meanwhile")
            flood_started = time.monotonic()
            sender.send("flood")
            # Until the sender has written its last spec (and at least one job).
            flooded = run_jobs(
                client, model_cid, inputs_cid, lambda done: not done or sender.lines.empty()
            )
        report = sender.reply(timeout=seconds + 120)
        watch = sender.reply(timeout=float(config["watch"]) + 60)
        time.sleep(SETTLE_S)
        sampler.halt.set()
        sampler.join()
        rss_after = {name: vmrss_kb(pid) or 0 for name, pid in pids.items()}
        listed_by_compute = _listed(target, sender_id)
        listed_by_requester = _listed(requester, sender_id)
        reconnect = sender.ask("reconnect", timeout=60)
        listed_after_reconnect = _listed(target, sender_id)
    finally:
        sender.close()
    compute_log = _log_since(target, logs_at["compute"])
    requester_log = _log_since(requester, logs_at["requester"])
    banned_logged = f"banning peer {sender_id}" in compute_log
    alive = stack.alive()

    quiet_ms = [o.ms for o in quiet if o.status == "completed"]
    flood_ms = [o.ms for o in flooded if o.status == "completed"]
    completed = len(flood_ms)
    by_target = sum(1 for o in flooded if o.status == "completed" and o.executor == target.peer_id)
    share = completed / len(flooded) if flooded else 0.0
    quiet_sum, flood_sum = summary_ms(quiet_ms), summary_ms(flood_ms)
    growth_mb = {n: (rss_after[n] - rss_before[n]) / 1024 for n in pids}
    peak_mb = {n: (sampler.peak.get(n, 0) - rss_before[n]) / 1024 for n in pids}
    cut = watch["disconnected_after_s"]
    sent = int(report["sent"])
    writing_s = float(report["cut_off_after_s"] or report["seconds"])
    achieved = sent / writing_s if writing_s else None
    disconnected = cut is not None and listed_by_compute == 0
    # Jobs submitted while the sender was still connected: the flood at its worst.
    before_ban = [
        o.ms
        for o in flooded
        if o.status == "completed" and (cut is None or o.started - flood_started < cut)
    ]
    before_ban_sum = summary_ms(before_ban)
    result.details = {
        "target_rate_specs_per_s": rate,
        "flooded_node": target.name,
        "warmup_winners": {n.name: winners.count(n.peer_id) for n in stack.compute_nodes},
        "flood_seconds": seconds,
        "sender": {**ready, **report, **watch, "reconnect": reconnect},
        "peers_samples": PEERS_SAMPLES,
        "sender_listed_by_compute_after": listed_by_compute,
        "sender_listed_by_requester_after": listed_by_requester,
        "sender_listed_by_compute_after_reconnect": listed_after_reconnect,
        "banning_logged": banned_logged,
        "compute_log_lines": len(compute_log.splitlines()),
        "requester_log_lines": len(requester_log.splitlines()),
        "compute_log_tail": compute_log.splitlines()[-12:],
        "quiet_ms": quiet_sum,
        "flood_ms": flood_sum,
        "flood_before_ban_ms": before_ban_sum,
        "quiet_jobs": len(quiet),
        "quiet_completed": len(quiet_ms),
        "quiet_completed_by_flooded_node": sum(
            1 for o in quiet if o.status == "completed" and o.executor == target.peer_id
        ),
        "flood_jobs": len(flooded),
        "flood_completed": completed,
        "flood_completed_by_flooded_node": by_target,
        "flood_failures": _top_errors(flooded),
        "rss_before_mb": {n: round(kb / 1024, 1) for n, kb in rss_before.items()},
        "rss_after_mb": {n: round(kb / 1024, 1) for n, kb in rss_after.items()},
        "rss_peak_growth_mb": {n: round(v, 1) for n, v in peak_mb.items()},
        "rss_growth_mb": {n: round(v, 1) for n, v in growth_mb.items()},
        "stack_alive": alive,
    }
    if not quiet_ms:
        result.skipped = f"no quiet job completed: {_top_errors(quiet)}"
        return result
    quiet_p50 = quiet_sum["p50"]
    flood_p50 = flood_sum["p50"] if flood_ms else None
    result.add(
        Row(
            "honest submit→completed p50 during the flood",
            flood_p50,
            "ms",
            quiet_p50,
            "quiet p50, same stack, just before",
            ratio(flood_p50, quiet_p50),
            f"≤ {GOAL_P50_RATIO:.0f}x quiet",
            flood_p50 is not None and flood_p50 <= GOAL_P50_RATIO * quiet_p50,
            f"p95 {flood_sum.get('p95', 0):.1f} ms (quiet p95 {quiet_sum['p95']:.1f} ms); "
            f"{len(quiet_ms)} quiet, {len(flooded)} flood jobs, "
            f"{by_target} of these run by the flooded node",
        )
    )
    if before_ban:
        result.add(
            Row(
                "  p50 of those submitted before the ban",
                before_ban_sum["p50"],
                "ms",
                quiet_p50,
                "quiet p50, same stack, just before",
                ratio(before_ban_sum["p50"], quiet_p50),
                note=f"p95 {before_ban_sum['p95']:.1f} ms; {len(before_ban)} jobs",
            )
        )
    result.add(
        Row(
            "honest jobs completed during the flood",
            round(100 * share, 1),
            "%",
            goal=f"≥ {100 * GOAL_COMPLETED:.0f} %",
            goal_met=bool(flooded) and share >= GOAL_COMPLETED,
            note=f"{completed}/{len(flooded)}"
            + (f"; {_top_errors(flooded)}" if completed < len(flooded) else ""),
        )
    )
    for name, label in (("compute", "flooded compute node"), ("requester", "requester")):
        grown = max(peak_mb[name], growth_mb[name])
        result.add(
            Row(
                f"RSS growth, {label}",
                round(grown, 1),
                "MB",
                round(rss_before[name] / 1024, 1),
                "RSS before the flood, MB",
                goal=f"≤ {GOAL_RSS_MB:.0f} MB",
                goal_met=grown <= GOAL_RSS_MB,
                note=f"peak during the flood; {growth_mb[name]:+.1f} MB {SETTLE_S:.0f} s after it",
            )
        )
    seen = f"{{}}/{PEERS_SAMPLES} samples"
    result.add(
        Row(
            "flood sender disconnected after",
            cut,
            "s",
            goal="banned, disconnected",
            goal_met=disconnected and banned_logged,
            note=(
                "from the flood's start; "
                if cut is not None
                else f"not within {config['watch']:.0f} s after the flood; "
            )
            + f"'banning peer' logged: {'yes' if banned_logged else 'no'}; "
            + f"listed in compute's node.peers: {seen.format(listed_by_compute)}, "
            + f"after a reconnect: {seen.format(listed_after_reconnect)}",
        )
    )
    result.add(
        Row(
            "flood rate achieved",
            round(achieved, 1) if achieved is not None else None,
            "specs/s",
            rate,
            "target specs/s",
            ratio(achieved, rate),
            note=f"{sent} specs written in {writing_s:.1f} s"
            + (" (then cut off)" if report["cut_off_after_s"] else "")
            + f"; {watch['trap_connections']} dials to the specs' address; "
            f"compute log +{len(compute_log.splitlines())} lines",
        )
    )
    if not alive:
        result.add(Row("devstack alive after the flood", 0, "", goal="alive", goal_met=False))
    return result

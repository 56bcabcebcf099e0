"""Run the benchmarks, print one table, write JSON: what `meshrun bench` calls.

Cheap, self-contained benchmarks go first and the devstack ones last, so a
run cut short still reports the figures that need no network; `hostile`
comes after `latency` and `throughput` because it floods a node of their
shared devstack; the gossip benchmarks go last because they stop the shared
3-node devstack to grow their own (`gossip-netns` in network namespaces).
"""

from __future__ import annotations

import datetime
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import (
    content_addressing,
    e2e_latency,
    exec_overhead,
    floor,
    gossip_netns,
    gossip_scale,
    gpu,
    hostile,
    result_fetch,
    throughput,
    verify,
)
from benchmarks.common import BenchResult, bench_context, dump_json, machine

MODULES: tuple[ModuleType, ...] = (
    content_addressing,
    exec_overhead,
    gpu,
    result_fetch,
    e2e_latency,
    throughput,
    floor,
    hostile,
    verify,
    gossip_scale,
    gossip_netns,
)
NAMES = tuple(m.NAME for m in MODULES)


def run_benchmarks(
    only: Sequence[str] | None = None,
    quick: bool = False,
    json_out: Path | None = None,
    console: Console | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run the selected benchmarks (all by default) and return the JSON document.

    A benchmark that crashes is reported as skipped with its error, so one
    broken figure never hides the others.
    """
    wanted = list(only or NAMES)
    unknown = sorted(set(wanted) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    say: Callable[[str], None] = (
        (lambda text: console.print(f"[dim]{text}[/]")) if console else (lambda text: None)
    )
    started = time.perf_counter()
    results: list[BenchResult] = []
    with bench_context(quick, say, workdir) as ctx:
        for module in MODULES:
            if module.NAME not in wanted:
                continue
            say(f"— {module.NAME}: {module.TITLE}")
            t0 = time.perf_counter()
            try:
                result = module.run(ctx)
            except Exception as exc:
                result = BenchResult(module.NAME, module.TITLE)
                result.skipped = f"crashed: {type(exc).__name__}: {exc}"
                result.details = {"traceback": traceback.format_exc()}
            result.seconds = time.perf_counter() - t0
            results.append(result)
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "benchmarks": [r.to_json() for r in results],
    }
    if json_out is not None:
        dump_json(document, json_out)
    if console is not None:
        console.print(render_table(results, document))
    return document


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.3g}"


def render_markdown(document: dict[str, Any]) -> str:
    """The same table as Markdown, for benchmarks/README.md."""
    lines = [
        "| benchmark | figure | value | baseline | ratio | goal | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in document["benchmarks"]:
        rows = bench["rows"] or [
            {"metric": "skipped", "value": None, "unit": "", "baseline": None, "ratio": None}
        ]
        for i, row in enumerate(rows):
            value = (
                f"{_fmt(row['value'])} {row['unit']}".strip() if row["value"] is not None else "-"
            )
            base = (
                f"{_fmt(row['baseline'])} ({row.get('baseline_name', '')})"
                if row["baseline"] is not None
                else ""
            )
            ratio_text = f"{_fmt(row['ratio'], 2)}x" if row["ratio"] is not None else ""
            goal = row.get("goal", "")
            if row.get("goal_met") is not None:
                goal = f"{'✓' if row['goal_met'] else '✗'} {goal}"
            note = row.get("note", "") or (bench["skipped"] or "" if not bench["rows"] else "")
            cells = [bench["name"] if i == 0 else "", row["metric"].strip(), value, base]
            cells += [ratio_text, goal, note]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render_table(results: list[BenchResult], document: dict[str, Any]) -> Table:
    info = document["machine"]
    table = Table(
        title=f"meshrun bench - {document['date']} — {info['cpu']}, {info['cores']} cores"
        + (" - QUICK" if document["quick"] else ""),
        caption="ratio = figure ÷ baseline, both measured in this run",
    )
    for column, justify in (
        ("benchmark", "left"),
        ("figure", "left"),
        ("value", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("goal", "left"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for result in results:
        if result.skipped and not result.rows:
            table.add_row(result.name, "skipped", "", "", "", "", result.skipped)
            continue
        for i, row in enumerate(result.rows):
            goal = row.goal
            if row.goal_met is not None:
                goal = f"{'[green]✓' if row.goal_met else '[red]✗'}[/] {goal}"
            value = f"{_fmt(row.value)} {row.unit}".strip() if row.value is not None else "-"
            base = f"{_fmt(row.baseline)} ({row.baseline_name})" if row.baseline is not None else ""
            table.add_row(
                result.name if i == 0 else "",
                row.metric,
                value,
                base,
                f"{_fmt(row.ratio, 2)}x" if row.ratio is not None else "",
                goal,
                row.note,
            )
    return table

"""The benchmarks' quick variants run end to end and report in the documented shape.

Only structure and correctness are asserted (every job reached a terminal
state, none lost or stuck, every figure has its baseline): timings on these
shared 2-core machines swing too much for any time to be asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.runner import NAMES, run_benchmarks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_benchmarks(quick=True, json_out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    return result


def _bench(document: dict, name: str) -> dict:
    return next(b for b in document["benchmarks"] if b["name"] == name)


def test_every_benchmark_reports(document: dict) -> None:
    assert document["quick"] is True
    assert document["machine"]["cores"] >= 1
    assert [b["name"] for b in document["benchmarks"]] == list(NAMES)
    for bench in document["benchmarks"]:
        assert not (bench["skipped"] or "").startswith("crashed"), bench["details"]
        for row in bench["rows"]:
            assert set(row) >= {"metric", "value", "unit", "baseline", "ratio", "goal", "note"}
            if row["ratio"] is not None:
                assert row["baseline"] is not None and row["value"] is not None


def test_latency_phases_cover_the_job(document: dict) -> None:
    latency = _bench(document, "latency")
    details = latency["details"]
    assert details["completed"] == details["jobs"], details["failed"]
    phases = details["phases_ms"]
    for phase in ("gossip", "bid_window", "accept", "fetch", "execute", "result_fetch", "total"):
        assert phases[phase]["n"] == details["jobs"], phase
    assert latency["rows"][0]["baseline_name"].startswith("raw onnxruntime")


def test_throughput_loses_no_job(document: dict) -> None:
    levels = _bench(document, "throughput")["details"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 8]
    for level in levels:
        assert level["lost"] == 0 and level["stuck"] == 0, level
        assert sum(level["statuses"].values()) == level["jobs"], level
        assert level["statuses"].get("completed") == level["jobs"], level
        cpu = level["cpu_ms_per_job"]
        assert set(cpu) == {"requester", "compute", "submitters", "total"}, cpu
        assert cpu["requester"] > 0 and cpu["compute"] > 0, cpu
        assert cpu["total"] == pytest.approx(
            cpu["requester"] + cpu["compute"] + cpu["submitters"], abs=0.2
        )
    slots = _bench(document, "throughput")["details"]["slots_level"]
    assert slots["slots_per_node"] == 3 and slots["lost"] == 0 and slots["stuck"] == 0, slots
    assert slots["statuses"].get("completed") == slots["jobs"], slots


def test_floor_prices_every_step_the_protocol_needs(document: dict) -> None:
    from benchmarks.floor import COUNTS, count

    details = _bench(document, "floor")["details"]
    assert set(details["steps"]) == set(COUNTS)
    total = 0.0
    for name, step in details["steps"].items():
        assert step["us_each"] > 0, name
        assert step["per_job"] == count(name) >= 1, name
        total += step["per_job"] * step["us_each"] / 1000
    assert details["floor_ms"] == pytest.approx(total, abs=0.05)
    assert details["required_parts_ms"] < details["floor_streams_reused_ms"] < details["floor_ms"]
    assert details["per_job_rpc_and_run_ms"] < details["floor_batched_ms"] < details["floor_ms"]
    assert details["batch_us"]["frame"] > 0 and details["batch_us"]["gossip_to_bidders"] > 0
    assert details["budget_ms"] == pytest.approx(details["cores"] * 1000 / 200)


def test_fetch_moves_every_byte(document: dict) -> None:
    details = _bench(document, "fetch")["details"]
    assert details["verified_bytes"] == details["mib"] << 20
    assert details["bitswap_bytes"] == details["mib"] << 20
    assert details["meshrun_stats"]["via"] == "exchange"
    wan = details["wan"]  # between two testbed hosts 50 ms apart, where root allows
    assert "skipped" in wan or wan["verified_bytes"] == wan["bytes"] == details["mib"] << 20


def test_gossip_reaches_every_compute_node(document: dict) -> None:
    steps = _bench(document, "gossip")["details"]["steps"]
    assert steps and all(step["failed"] == 0 for step in steps)
    assert all(step["answers_min"] == step["compute"] for step in steps)


def test_gossip_across_namespaces_reaches_every_host(document: dict) -> None:
    bench = _bench(document, "gossip-netns")
    if bench["skipped"]:  # no root or no nftables here; CI runs it
        assert bench["skipped"].startswith("no network testbed here")
        return
    steps = bench["details"]["steps"]
    assert steps and all(step["failed"] == 0 for step in steps)
    assert all(step["answers_min"] == step["compute"] for step in steps)
    for step in steps:
        assert step["compute_rss_mib"]["median"] > 0 and step["requester_cpu_ms_per_job"] > 0


def test_hostile_flood_leaves_honest_jobs_and_the_stack_alone(document: dict) -> None:
    hostile = _bench(document, "hostile")
    details = hostile["details"]
    assert details["quiet_completed"] == details["quiet_jobs"]
    assert details["flood_jobs"] >= 1
    assert details["flood_completed"] == details["flood_jobs"], details["flood_failures"]
    assert details["sender"]["sent"] > 0 and details["stack_alive"]
    assert set(details["rss_growth_mb"]) >= {"compute", "requester"}
    assert hostile["rows"][0]["baseline_name"].startswith("quiet p50")


def test_exec_and_gpu_explain_themselves(document: dict) -> None:
    exec_ = _bench(document, "exec")
    if exec_["skipped"]:
        assert "pip install" in exec_["skipped"]
    else:
        assert exec_["details"]["raw_ms"]["n"] == exec_["details"]["pool_ms"]["n"]
    gpu = _bench(document, "gpu")
    if gpu["skipped"]:
        assert all(row["value"] is None and row["note"] for row in gpu["rows"])


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["nope"], quick=True, workdir=tmp_path)


def test_verify_accepts_no_wrong_result_under_redundancy(document: dict) -> None:
    details = _bench(document, "verify")["details"]
    for policy, cost in details["cost"].items():
        assert cost["statuses"] == {"completed": cost["jobs"]}, (policy, cost)
    alongside = details["cost"]["receipt alongside redundant:2"]
    assert alongside["jobs"] == details["cost"]["redundant:2"]["jobs"]
    assert details["cost"]["redundant:2"]["runs_per_job"] >= 2
    actor = details["actor"]
    assert actor["policies"]["redundant:2"]["wrong_accepted"] == 0, actor
    assert actor["honest_disputed"] == [] and actor["cost_disputed"] == []

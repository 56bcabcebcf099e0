"""A validly signed wrong answer: what result verification (issue 10) must catch.

Real node processes: a devstack with honest compute nodes and the
result-correctness attackers of node/roles/misbehave.py (`zeros`, `perturb`,
`replay`, and `noise`, the honest control). Their receipts are genuine, their
results re-hash to the CIDs they sign, so receipt checks pass; only comparing
outputs with another executor's (protocol/compare.py) can tell.

Each job here runs the small MLP on inputs of its own (seed = job index), so a
replayed answer is a wrong one, and the helpers return each job's final record
and can read its published outputs and the outputs a local onnxruntime run
gives, for asserting what a job's verdict should have been.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from protocol.compare import compare_outputs, outputs_from_files
from protocol.messages import Tolerance

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

MODEL_SEED = 1
BATCH = 4
JOB_TIMEOUT = 60.0


@contextmanager
def wrong_result_stack(root: Path, bad: Mapping[str, int], honest: int = 1) -> Iterator[Devstack]:
    """A requester, `honest` honest compute nodes and the `bad` ones ({kind: count})."""
    with Devstack(root, compute=honest, bad=bad, bid_window=2.0) as stack:
        yield stack


def submit_jobs(
    stack: Devstack,
    jobs: int,
    verification: str | None = None,
    tolerance: Mapping[str, Any] | None = None,
    timeout: float = JOB_TIMEOUT,
    start: int = 0,
) -> list[dict[str, Any]]:
    """Run `jobs` MLP jobs one after another; each one's final record, in order.

    Job i's inputs are make_inputs(seed=i). `verification` and `tolerance` are
    passed only when given, so the node's defaults apply otherwise.
    """
    extra: dict[str, Any] = {}
    if verification is not None:
        extra["verification"] = verification
    if tolerance is not None:
        extra["tolerance"] = dict(tolerance)
    records = []
    with stack.requester.client(timeout=timeout + 10) as client:
        model_cid = client.storage_add(build_mlp(seed=MODEL_SEED))
        for i in range(start, start + jobs):
            inputs_cid = client.storage_add(encode_tensors(_inputs(i)))
            job = client.call(
                "job.submit",
                model_cid=model_cid,
                inputs_cid=inputs_cid,
                timeout_seconds=30,
                **extra,
            )
            records.append(dict(client.wait_for_job(job["job_id"], timeout=timeout)))
    return records


def run_jobs(
    root: Path,
    bad: Mapping[str, int],
    jobs: int,
    verification: str | None = None,
    honest: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Start a stack, run the jobs, stop it: the records and each node's kind by PeerID."""
    with wrong_result_stack(root, bad, honest) as stack:
        records = submit_jobs(stack, jobs, verification)
        kinds = {n.peer_id: n.misbehave or "honest" for n in stack.compute_nodes}
        for record in records:
            record["outputs"] = published_outputs(stack, record)
    return records, kinds


def published_outputs(stack: Devstack, record: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The tensors of a job's result package, read as the requester stored it."""
    if not record.get("result_cid"):
        return None
    with stack.requester.client() as client:
        files = client.storage_tree(record["result_cid"]).contents()
    return outputs_from_files(files)


def expected_outputs(job_index: int) -> dict[str, np.ndarray]:
    """What an honest executor computes for job `job_index` (a local onnxruntime run)."""
    session = ort.InferenceSession(build_mlp(seed=MODEL_SEED), providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, _inputs(job_index)), strict=True))


def _inputs(job_index: int) -> dict[str, np.ndarray]:
    return make_inputs(batch=BATCH, seed=job_index)


def _executors(record: Mapping[str, Any]) -> list[str]:
    return [e["peer"] for e in (record.get("verification") or {}).get("executors", [])]


def _correct(record: Mapping[str, Any], index: int) -> bool:
    outputs = record["outputs"]
    return (
        outputs is not None and compare_outputs(outputs, expected_outputs(index), Tolerance()).agree
    )


def test_receipt_alone_accepts_a_validly_signed_wrong_answer(tmp_path: Path) -> None:
    """The attack the policies answer: under `receipt` the zeros node's answer completes."""
    records, kinds = run_jobs(tmp_path, {"zeros": 1}, jobs=3, verification="receipt")
    won = [(i, r) for i, r in enumerate(records) if kinds.get(r.get("executor", "")) == "zeros"]
    assert won, [(r["status"], kinds.get(r.get("executor", ""))) for r in records]
    for i, record in won:
        assert record["status"] == "completed" and not _correct(record, i)


def test_redundant_never_completes_a_wrong_answer_and_excludes_the_liar(tmp_path: Path) -> None:
    """redundant:2 with a zeros node bidding lowest among two honest ones: its first
    answer is outvoted by a tie-break, it is disputed, paid nothing, and not asked again."""
    records, kinds = run_jobs(tmp_path, {"zeros": 1}, jobs=4, verification="redundant:2", honest=2)
    liar = next(p for p, k in kinds.items() if k == "zeros")
    for i, record in enumerate(records):
        assert record["status"] == "completed", record.get("error")
        assert _correct(record, i), i
        assert kinds[record["executor"]] == "honest"
    # It bids lowest, so it runs the first job whose bid window its bid reaches in time.
    ran = [i for i, record in enumerate(records) if liar in _executors(record)]
    assert ran, [r["verification"] for r in records]
    first = records[ran[0]]["verification"]
    assert first["disputed"] == [liar] and len(first["agreed"]) == 2
    assert ran == [ran[0]]  # excluded after its dispute
    for record in records:
        assert liar not in record["verification"]["agreed"]


def test_honest_noise_is_never_disputed(tmp_path: Path) -> None:
    """A node on "different hardware" (one thread, no graph optimisation) agrees
    with an honest one under redundant:2, job after job."""
    records, kinds = run_jobs(tmp_path, {"noise": 1}, jobs=3, verification="redundant:2")
    for i, record in enumerate(records):
        assert record["status"] == "completed", record.get("error")
        assert _correct(record, i)
        summary = record["verification"]
        assert summary["disputed"] == [] and sorted(summary["agreed"]) == sorted(kinds)


def test_sampling_catches_a_cheater_then_excludes_it(tmp_path: Path) -> None:
    """sample:0.1 with a zeros node bidding lowest: strangers are audited one time in
    two, so it is caught within a few wins; after that it never runs a job again."""
    with wrong_result_stack(tmp_path, {"zeros": 1}, honest=2) as stack:
        kinds = {n.peer_id: n.misbehave or "honest" for n in stack.compute_nodes}
        liar = next(p for p, k in kinds.items() if k == "zeros")
        caught_at = None
        records: list[dict[str, Any]] = []
        for i in range(12):
            record = submit_jobs(stack, 1, "sample:0.1", start=i)[0]
            records.append(record)
            if liar in (record.get("verification") or {}).get("disputed", []):
                caught_at = i
                break
        assert caught_at is not None, [r.get("verification") for r in records]
        caught = records[caught_at]
        assert caught["status"] == "completed" and kinds[caught["executor"]] == "honest"
        after = submit_jobs(stack, 2, "sample:0.1", start=caught_at + 1)
        for record in after:
            assert record["status"] == "completed"
            assert liar not in _executors(record) and record["executor"] != liar
        with stack.requester.client() as client:
            peers = client.call("node.peers")
        text = str(peers)
        assert liar in text and "exclu" in text

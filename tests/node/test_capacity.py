"""Compute nodes with several slots, over real nodes and real onnxruntime workers.

A node started with ``--cpu-slots 3`` runs three jobs at once (their receipts'
execution intervals overlap); a one-slot node queues accepted jobs by
priority, its bids' ETAs grow with its queue, a full queue answers ``NoBid``
``BUSY``, and a cancel frees the slot for the next job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.client import Client
from node.dev.devstack import Devstack
from tests.node.lifecycle_helpers import submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TERMINAL = {"completed", "failed", "timeout", "canceled"}


def compute_events(client: Client, job_id: str) -> list[dict[str, Any]]:
    return list(client.call("job.events", job_id=job_id)["events"])


def wait_queued(client: Client, job_id: str, timeout: float = 30) -> None:
    """Until the job is assigned and waiting for a slot on its executor."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if job["status"] == "assigned" and job["substate"] == "queued":
            return
        assert job["status"] in ("pending", "bidding", "assigned"), job
        assert time.monotonic() < deadline, f"never queued: {job}"
        time.sleep(0.05)


def bid_etas(client: Client, job_id: str) -> list[float]:
    return [
        float(b["eta_seconds"])
        for b in client.call("job.bids", job_id=job_id)["bids"]
        if b.get("kind") == "bid"
    ]


@pytest.fixture(scope="module")
def three_slots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(
        tmp_path_factory.mktemp("slots3"),
        compute=1,
        bid_window=0.5,
        extra_args={"compute-1": ["--cpu-slots", "3"]},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(
        tmp_path_factory.mktemp("slot1"),
        compute=1,
        bid_window=0.5,
        extra_args={"compute-1": ["--cpu-slots", "1", "--max-queue", "2"]},
    ) as stack:
        yield stack


def test_three_slots_run_three_jobs_at_once(three_slots: Devstack) -> None:
    compute = three_slots.compute_nodes[0].client()
    capacity = compute.call("node.info")["capacity"]
    assert capacity["slots"] == 3 and capacity["busy"] == 0, capacity
    assert [d["slot"] for d in capacity["devices"]] == ["cpu:0", "cpu:1", "cpu:2"]

    client = three_slots.requester.client()
    jobs = [submit_spin(client, 3, timeout_seconds=120) for _ in range(3)]
    done = [wait_status(client, j["job_id"], TERMINAL, timeout=120) for j in jobs]
    assert [j["status"] for j in done] == ["completed"] * 3, done
    receipts = [j["receipt"] for j in done]
    # Every run was going at one moment: the latest start is before the earliest end.
    assert max(r["started_at"] for r in receipts) < min(r["finished_at"] for r in receipts)
    slots = set()
    for job in jobs:
        started = [
            e for e in compute_events(compute, job["job_id"]) if e["type"] == "ExecutionStarted"
        ]
        slots.add(tuple(started[0]["data"]["slots"]))
    assert slots == {("cpu:0",), ("cpu:1",), ("cpu:2",)}
    assert compute.call("node.info")["capacity"]["busy"] == 0


def test_a_full_node_queues_by_priority_then_answers_busy(one_slot: Devstack) -> None:
    client = one_slot.requester.client()
    compute = one_slot.compute_nodes[0].client()
    assert compute.call("node.info")["capacity"]["slots"] == 1

    running = submit_spin(client, 4, timeout_seconds=120)
    wait_status(client, running["job_id"], {"running"}, timeout=60)
    low = submit_spin(client, 0.2, timeout_seconds=120, priority="low")
    wait_queued(client, low["job_id"])
    high = submit_spin(client, 0.2, timeout_seconds=120, priority="high")
    wait_queued(client, high["job_id"])
    # The queue holds two: the fourth job is refused with the reason.
    refused = submit_spin(client, 0.2, timeout_seconds=120)
    ended = wait_status(client, refused["job_id"], TERMINAL, timeout=60)
    assert ended["status"] == "failed" and ended["error"]["code"] == "NO_BIDS", ended
    nobids = [b for b in client.call("job.bids", job_id=refused["job_id"])["bids"]]
    assert [b["reason"] for b in nobids if b.get("kind") == "nobid"] == ["BUSY"], nobids
    capacity = compute.call("node.info")["capacity"]
    assert (capacity["busy"], capacity["queued"]) == (1, 2), capacity

    done = {
        name: wait_status(client, job["job_id"], TERMINAL, timeout=120)
        for name, job in (("running", running), ("low", low), ("high", high))
    }
    assert {j["status"] for j in done.values()} == {"completed"}, done
    assert done["high"]["priority"] == "high" and done["low"]["priority"] == "low"
    # High was accepted after low but ran first.
    assert done["high"]["receipt"]["started_at"] < done["low"]["receipt"]["started_at"]


def test_bid_etas_grow_with_the_queue(one_slot: Devstack) -> None:
    client = one_slot.requester.client()
    first = submit_spin(client, 4, timeout_seconds=120)
    wait_status(client, first["job_id"], {"running"}, timeout=60)
    second = submit_spin(client, 0.2, timeout_seconds=120)
    wait_queued(client, second["job_id"])
    third = submit_spin(client, 0.2, timeout_seconds=120)
    wait_queued(client, third["job_id"])
    etas = [bid_etas(client, job["job_id"])[0] for job in (first, second, third)]
    assert etas[0] < etas[1] < etas[2], etas
    for job in (first, second, third):
        assert wait_status(client, job["job_id"], TERMINAL, timeout=120)["status"] == "completed"


def test_a_cancel_frees_the_slot_for_the_next_job(one_slot: Devstack) -> None:
    client = one_slot.requester.client()
    hog = submit_spin(client, 60, timeout_seconds=300)
    wait_status(client, hog["job_id"], {"running"}, timeout=60)
    waiting = submit_spin(client, 0.2, timeout_seconds=300)
    wait_queued(client, waiting["job_id"])
    client.call("job.cancel", job_id=hog["job_id"])
    assert wait_status(client, hog["job_id"], TERMINAL, timeout=60)["status"] == "canceled"
    # The waiting job ran long before the 60 s the hog would have held the slot.
    done = wait_status(client, waiting["job_id"], TERMINAL, timeout=40)
    assert done["status"] == "completed", done


def test_flags_that_ask_for_missing_devices_are_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(
        app,
        ["node", "--mode", "compute", "--data-dir", str(tmp_path), "--devices", "cuda:7"],
    )
    assert result.exit_code == 2, result.output
    assert "cuda:7" in result.output

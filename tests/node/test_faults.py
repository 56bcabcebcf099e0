"""Crashes across real processes: an executor killed mid-job, a requester
restarted mid-job. No job may be lost or left stuck."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.dev.devstack import Devstack
from tests.node.lifecycle_helpers import event_types, submit_mlp, submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("faults"), compute=2, bid_window=1.0) as devstack:
        yield devstack


def test_killed_executor_is_replaced_by_the_next_bid(stack: Devstack) -> None:
    with stack.requester.client() as client:
        job = submit_spin(client, seconds=4, timeout_seconds=90)
        running = wait_status(client, job["job_id"], {"running"})
        victim = next(n for n in stack.compute_nodes if n.peer_id == running["executor"])
        stack.kill(victim)

        done = client.wait_for_job(job["job_id"], timeout=90)
        assert done["status"] == "completed", done
        assert done["executor"] != victim.peer_id
        assert done["retry_count"] == 1
        types = event_types(client, job["job_id"])
        assert "ExecutorLost" in types and "Retried" in types
        assert types.count("BidAccepted") == 2
    stack.restart(victim)
    # The killed executor's own record of the job does not stay running forever.
    with victim.client() as client:
        mine = client.get_job(job["job_id"])
        assert mine["status"] == "failed", mine
        assert "compute node restarted" in mine["error"]["message"]
        types = event_types(client, job["job_id"])
        assert types == ["BidAccepted", "ExecutionStarted", "Failed"], types


def test_restarted_requester_ends_every_job_and_rejoins_the_mesh(stack: Devstack) -> None:
    """What a restarted requester resumes is in test_resume.py; here, a job nobody can
    run re-opens its bid window after the restart and still ends, clearly."""
    requester = stack.requester
    with requester.client() as client:
        finished = client.wait_for_job(submit_mlp(client, seed=5)["job_id"], timeout=60)
        assert finished["status"] == "completed"
        bidding = submit_mlp(client, requirements={"provider": "tensorrt"}, bid_window_seconds=30)
        wait_status(client, bidding["job_id"], {"bidding"})

    stack.kill(requester)
    stack.restart(requester)

    with requester.client() as client:
        assert client.get_job(finished["job_id"])["status"] == "completed"
        job = client.wait_for_job(bidding["job_id"], timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "NO_BIDS"
        assert "Resumed" in event_types(client, bidding["job_id"])
        stuck = [
            j
            for j in client.call("job.list", limit=1000)["jobs"]
            if j["status"] not in ("completed", "failed", "timeout", "canceled")
        ]
        assert stuck == []

        # It dials the peers it knew, so new work flows without re-bootstrapping.
        stack.wait_mesh(timeout=60)
        again = client.wait_for_job(submit_mlp(client, seed=6)["job_id"], timeout=60)
        assert again["status"] == "completed"

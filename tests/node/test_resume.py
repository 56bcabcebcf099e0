"""A restarted node finishes what it started, across real processes.

A requester killed (SIGKILL) while its job runs, after the executor finished
it, or while it was bidding, comes back on the same data dir and completes the
job without a resubmission: it re-opens bidding, or sends the executor a
signed Resume and gets the run's progress and its original receipt (no second
execution). An executor that is itself gone and restarted meanwhile answers
with a Failure, and the job moves on to the next bid. No record on any node
is left non-terminal.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from node.client import Client, RpcError
from node.dev.devstack import Devstack, NodeProcess
from tests.node.lifecycle_helpers import event_types, submit_mlp, submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TERMINAL = {"completed", "failed", "timeout", "canceled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("resume"), compute=2, bid_window=1.0) as devstack:
        yield devstack


def node_of(stack: Devstack, peer_id: str) -> NodeProcess:
    return next(n for n in stack.compute_nodes if n.peer_id == peer_id)


def status_on_disk(node: NodeProcess, job_id: str) -> str:
    """A killed node's record of a job, read from its SQLite file."""
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        row = db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return str(row[0]) if row else "unknown"


def wait_on(node: NodeProcess, job_id: str, statuses: set[str], timeout: float = 60) -> Any:
    with node.client() as client:
        return wait_status(client, job_id, statuses, timeout)


def nothing_live(client: Client) -> None:
    jobs = client.call("job.list", limit=1000)["jobs"]
    assert [j for j in jobs if j["status"] not in TERMINAL] == []


def events(client: Client, job_id: str) -> list[dict[str, Any]]:
    return list(client.call("job.events", job_id=job_id)["events"])


def wait_processing(client: Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """Running, its model and inputs fetched: from here the executor needs nothing
    from the requester to finish."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if job["status"] == "running" and job["substate"] == "processing":
            return dict(job)
        assert time.monotonic() < deadline, f"job not processing: {job['status']}"
        time.sleep(0.05)


def restart_and_wait(stack: Devstack, job_id: str) -> tuple[dict[str, Any], float]:
    """Restart the requester; return the job once ended and the seconds that took."""
    started = time.monotonic()
    stack.restart(stack.requester)
    with stack.requester.client() as client:
        done = client.wait_for_job(job_id, timeout=90)
    return done, time.monotonic() - started


def test_requester_killed_mid_run_resumes_and_gets_the_original_receipt(stack: Devstack) -> None:
    requester = stack.requester
    with requester.client() as client:
        job = submit_spin(client, seconds=8, timeout_seconds=90)
        job_id = job["job_id"]
        running = wait_processing(client, job_id)
    executor = node_of(stack, running["executor"])
    stack.kill(requester)
    assert status_on_disk(requester, job_id) == "running"

    done, took = restart_and_wait(stack, job_id)
    print(f"\nrequester restart -> completed (resumed mid-run): {took:.1f}s")
    with requester.client() as client:
        log = events(client, job_id)
    assert done["status"] == "completed", log
    assert done["executor"] == executor.peer_id and done["retry_count"] == 0, log
    with requester.client() as client:
        types = [e["type"] for e in log]
        assert types.count("BidAccepted") == 1 and "ExecutorLost" not in types, types
        resumed = next(e for e in log if e["type"] == "Resumed")
        assert resumed["peer"] == executor.peer_id and resumed["data"]["step"] == "running"
        # It followed the run after the resume, then completed.
        assert types.index("Resumed") < types.index("ResultsPublished") < types.index("Completed")
        nothing_live(client)
    with executor.client() as client:
        mine = client.get_job(job_id)
        assert mine["status"] == "completed"
        # The receipt the requester verified is the one this executor signed once.
        assert mine["receipt_envelope_b64"] == done["receipt_envelope_b64"]
        types = event_types(client, job_id)
        assert types.count("ExecutionStarted") == 1 and types.count("ResultsPublished") == 1
        assert "RequesterLost" in types and "Resumed" in types, types
        assert "CancelRequested" not in types
    other = next(n for n in stack.compute_nodes if n is not executor)
    with other.client() as client, pytest.raises(RpcError):
        client.get_job(job_id)  # it never ran there


def test_requester_killed_after_the_executor_finished_gets_the_kept_receipt(
    stack: Devstack,
) -> None:
    requester = stack.requester
    with requester.client() as client:
        job_id = submit_spin(client, seconds=2, timeout_seconds=60)["job_id"]
        running = wait_processing(client, job_id)
    executor = node_of(stack, running["executor"])
    stack.kill(requester)
    finished = wait_on(executor, job_id, TERMINAL)
    assert finished["status"] == "completed", finished  # finished alone, not canceled

    done, took = restart_and_wait(stack, job_id)
    print(f"\nrequester restart -> completed (from the kept receipt): {took:.1f}s")
    assert done["status"] == "completed", done
    assert done["receipt_envelope_b64"] == finished["receipt_envelope_b64"]
    with requester.client() as client:
        assert "Resumed" in event_types(client, job_id)
    with executor.client() as client:
        answered = [e for e in events(client, job_id) if e["type"] == "Resumed"]
        assert answered and answered[-1]["data"] == {"sent": "receipt"}
        assert event_types(client, job_id).count("ExecutionStarted") == 1


def test_requester_killed_while_bidding_re_opens_its_bid_window(stack: Devstack) -> None:
    requester = stack.requester
    with requester.client() as client:
        job_id = submit_mlp(client, seed=11)["job_id"]
    stack.kill(requester)  # within milliseconds of the submit: no executor chosen yet
    assert status_on_disk(requester, job_id) in ("pending", "bidding")

    done, took = restart_and_wait(stack, job_id)
    print(f"\nrequester restart -> completed (bidding re-opened): {took:.1f}s")
    assert done["status"] == "completed", done
    with requester.client() as client:
        resumed = [e for e in events(client, job_id) if e["type"] == "Resumed"]
        assert resumed and resumed[0]["data"]["step"] in ("publish", "bidding"), resumed
        nothing_live(client)


def test_executor_restarted_while_the_requester_was_down_the_job_moves_on(
    stack: Devstack,
) -> None:
    requester = stack.requester
    with requester.client() as client:
        job_id = submit_spin(client, seconds=8, timeout_seconds=90)["job_id"]
        running = wait_processing(client, job_id)
    executor = node_of(stack, running["executor"])
    stack.kill(requester)
    stack.kill(executor)
    started = time.monotonic()
    # The requester first (the executor's bootstrap peer): its Resume waits for the
    # executor, which comes back having ended its record, and answers so.
    stack.restart(requester)
    stack.restart(executor)
    with requester.client() as client:
        done = client.wait_for_job(job_id, timeout=90)
    print(f"\nrequester restart -> completed elsewhere: {time.monotonic() - started:.1f}s")
    assert done["status"] == "completed", done
    assert done["executor"] != executor.peer_id and done["retry_count"] == 1
    with requester.client() as client:
        log = events(client, job_id)
        types = [e["type"] for e in log]
        assert "Resumed" in types and "ExecutorLost" in types and "Retried" in types, types
        lost = next(e for e in log if e["type"] == "ExecutorLost")
        assert lost["peer"] == executor.peer_id
        print(f"resumed run lost: {lost['data']['reason']}")
        nothing_live(client)
    with executor.client() as client:  # its own record ended at its restart
        mine = client.get_job(job_id)
        assert mine["status"] == "failed" and "restarted" in mine["error"]["message"]
    for node in stack.compute_nodes:
        with node.client() as client:
            nothing_live(client)

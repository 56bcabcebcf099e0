"""Nodes that move, join late, come and go, each on its own host of a testnet.

Hosts 0-3 start with the requester (host 0) and three compute nodes; the rest
are free for nodes that move or join. Every link has 20 ms of round trip. What
is asserted is what a user would check: jobs reach the nodes that are there,
and every job submitted ends completed, none lost or stuck. Times are printed
(`-s`), never asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.common import store_tiny
from node.client import Client
from node.dev.devstack import Devstack
from node.dev.testnet import Testnet
from node.transport.peers import PEERS_FILE
from tests.node.lifecycle_helpers import submit_spin

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HOSTS = 7
RTT = 20.0


@pytest.fixture(scope="module")
def net(testnet_ok: None) -> Iterator[Testnet]:
    with Testnet(hosts=HOSTS, rtt_ms=RTT) as testnet:
        yield testnet


@pytest.fixture(scope="module")
def stack(net: Testnet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with net.devstack(tmp_path_factory.mktemp("churn"), compute=3) as devstack:
        yield devstack


@pytest.fixture(scope="module")
def workload(stack: Devstack) -> tuple[str, str]:
    with stack.requester.client() as client:
        return store_tiny(client)


def run_job(client: Client, workload: tuple[str, str]) -> dict[str, Any]:
    model_cid, inputs_cid = workload
    job = client.call("job.submit", model_cid=model_cid, inputs_cid=inputs_cid)
    return dict(client.wait_for_job(job["job_id"], timeout=120))


def bidders(client: Client, job_id: str) -> set[str]:
    return {b["provider"] for b in client.call("job.bids", job_id=job_id)["bids"]}


def wait_topic(client: Client, peers: set[str], timeout: float = 60.0) -> float:
    """Seconds until every one of `peers` is on the requester's job topic."""
    started = time.monotonic()
    while not peers <= set(client.call("node.peers")["topic_peers"]):
        assert time.monotonic() - started < timeout, client.call("node.peers")["topic_peers"]
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_compute_node_that_moved_to_a_new_address_rejoins(
    net: Testnet, stack: Devstack, workload: tuple[str, str]
) -> None:
    mover = stack.compute_nodes[2]
    old = mover.info["listen_addrs"][0]
    stack.move(mover, net.placement(4))
    assert mover.info["listen_addrs"][0] != old and net.addr(4) in mover.info["listen_addrs"][0]
    with stack.requester.client() as client:
        took = wait_topic(client, {mover.peer_id})
        done = run_job(client, workload)
        assert done["status"] == "completed", done
        assert mover.peer_id in bidders(client, done["job_id"])
    print(f"\ncompute node moved {old} → {net.addr(4)}: back on the job topic in {took:.1f} s")


def test_a_requester_that_moved_to_a_new_address_finds_its_compute_nodes(
    net: Testnet, stack: Devstack, workload: tuple[str, str]
) -> None:
    """Compute nodes only know the requester's old address; the requester
    remembers theirs (peers.json) and dials them from its new one."""
    requester = stack.requester
    remembered = requester.data_dir / PEERS_FILE
    deadline = time.monotonic() + 30
    while net.addr(4) + "/" not in (remembered.read_text() if remembered.exists() else ""):
        assert time.monotonic() < deadline, "the requester never wrote the moved node's address"
        time.sleep(0.2)
    stack.move(requester, net.placement(5))
    with requester.client() as client:
        took = wait_topic(client, {n.peer_id for n in stack.compute_nodes})
        done = run_job(client, workload)
        assert done["status"] == "completed", done
        assert bidders(client, done["job_id"]) == {n.peer_id for n in stack.compute_nodes}
    print(f"\nrequester moved to {net.addr(5)}: every compute node back in {took:.1f} s")


def test_a_compute_node_that_joins_mid_job_bids_on_the_next_one(
    net: Testnet, stack: Devstack, workload: tuple[str, str]
) -> None:
    with stack.requester.client() as client:
        running = submit_spin(client, seconds=3, timeout_seconds=120)
        stack.placement["compute-late"] = net.placement(6)
        late = stack.spawn(
            "compute-late", "compute", [str(stack.requester.info["listen_addrs"][0])]
        )
        stack.nodes.append(late)
        stack.wait_ready(late)
        took = wait_topic(client, {late.peer_id})
        done = run_job(client, workload)
        assert done["status"] == "completed", done
        assert late.peer_id in bidders(client, done["job_id"])
        assert client.wait_for_job(running["job_id"], timeout=120)["status"] == "completed"
    print(f"\na compute node joined mid-job: on the job topic {took:.1f} s after it was ready")


def test_no_job_is_lost_while_compute_nodes_leave_and_join(
    net: Testnet, stack: Devstack, workload: tuple[str, str]
) -> None:
    """Two submitters keep jobs coming while one compute node is killed, another
    is stopped and a killed one comes back; every job ends completed."""
    ids: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def submitter() -> None:
        try:
            with stack.requester.client() as client:
                model_cid, inputs_cid = workload
                while not stop.is_set():
                    job = client.call("job.submit", model_cid=model_cid, inputs_cid=inputs_cid)
                    ids.append(job["job_id"])
                    client.wait_for_job(job["job_id"], timeout=120)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        killed = stack.compute_nodes[0]
        stack.kill(killed)  # a crash: no goodbye
        time.sleep(2)
        stack.remove(stack.compute_nodes[1])  # a clean stop
        time.sleep(2)
        stack.restart(killed)  # back, on its old address
        time.sleep(4)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    assert not errors, errors
    with stack.requester.client() as client:
        records = [client.call("job.get", job_id=job_id) for job_id in ids]
        statuses: dict[str, int] = {}
        for record in records:
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        assert statuses == {"completed": len(ids)}, statuses
        retried = sum(1 for r in records if r.get("retry_count"))
    print(f"\nchurn: {len(ids)} jobs, all completed, {retried} moved to another executor")

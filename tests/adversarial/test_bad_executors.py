"""Misbehaving executors cannot hurt a requester: each loses its attempt, the job goes on.

Real node processes: the shared devstack (a requester and one honest compute
node, tests/adversarial/conftest.py) plus, per test, one compute node started
with `--misbehave KIND` (node/roles/misbehave.py). The bad node asks a lower
price, so it wins the auction; then, for every kind:

- the job completes on the honest node, and the bad node's attempt is in the
  job's events (`ExecutorLost` with its code, and `ReceiptRejected` where the
  receipt was the lie);
- the bad node is accepted once and never chosen again for that job;
- the requester process stays up and its resident memory grows by less
  than RSS_GROWTH_BOUND_KB over the attack.

A silent executor is given up after the requester's 5 s silence limit
(executors heartbeat every second), within SILENCE_SLACK of it. A replayed bid
counts once. A forwarded Accept changes nothing for the honest bidder it
reaches: it keeps its offer and takes the job when the requester fails over.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from node.dev.devstack import Devstack, NodeProcess
from protocol.policy import RequesterPolicy
from tests.adversarial.stack_helpers import (
    MiB_KB,
    accepted,
    job_bids,
    job_won_by,
    log_text,
    run_job,
    vmrss_kb,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# What the requester's resident set may grow by over one attack (its baseline is
# taken after an ordinary job, so imports and caches are already paid for).
RSS_GROWTH_BOUND_KB = 32 * MiB_KB
SILENCE = RequesterPolicy().silence  # 5 s
# The requester's driver wakes at the silence deadline; on a loaded 2-core
# machine the wake-up and the write of the event can lag a little.
SILENCE_SLACK = 1.0

# kind -> the code its attempt ends with in ExecutorLost, and the event that
# must precede it (None: none).
ATTACKS: dict[str, tuple[str, str | None]] = {
    "wrong-key-receipt": ("SIGNATURE_INVALID", None),
    "wrong-cids": ("VERIFICATION_MISMATCH", "ReceiptRejected"),
    "silent": ("EXECUTOR_LOST", None),
    "accept-forward": ("EXECUTOR_LOST", None),
    "dag-bomb-result": ("FETCH_FAILED", None),
}


@pytest.fixture
def bad_node(adversarial_stack: Devstack, request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    node = adversarial_stack.add_bad(request.param)
    try:
        with node.client() as client:
            assert client.node_info()["misbehave"] == request.param
        yield node
    finally:
        adversarial_stack.remove(node)


def _report(kind: str, **figures: Any) -> None:
    print(f"\n[{kind}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.mark.parametrize("bad_node", list(ATTACKS), indirect=True)
def test_a_bad_executor_loses_its_attempt_and_the_honest_node_completes_the_job(
    adversarial_stack: Devstack, bad_node: NodeProcess
) -> None:
    stack = adversarial_stack
    kind = bad_node.misbehave
    assert kind is not None
    code, before = ATTACKS[kind]
    honest = stack.honest_nodes[0]
    pid = stack.requester.process.pid
    rss_before = vmrss_kb(pid)
    started = time.monotonic()

    job, events = job_won_by(stack, bad_node)

    elapsed = time.monotonic() - started
    rss_after = vmrss_kb(pid)
    assert stack.alive(), log_text(stack.requester)[-3000:]
    assert job["status"] == "completed", (job, events)
    assert job["executor"] == honest.peer_id
    assert accepted(events) == [bad_node.peer_id, honest.peer_id], events

    lost = [e for e in events if e["type"] == "ExecutorLost"]
    assert [e["peer"] for e in lost] == [bad_node.peer_id], events
    assert lost[0]["data"]["code"] == code, lost[0]
    if before is not None:
        prior = [e for e in events if e["type"] == before and e["peer"] == bad_node.peer_id]
        assert prior and prior[0]["seq"] < lost[0]["seq"], events
    retried = [e for e in events if e["type"] == "Retried"]
    assert [e["peer"] for e in retried] == [honest.peer_id]

    figures: dict[str, Any] = {
        "lost": f"{code}: {lost[0]['data']['reason'][:120]}",
        "job_s": round(elapsed, 1),
        "requester_rss_mb": f"{rss_before // MiB_KB}->{rss_after // MiB_KB}",
    }
    if kind == "silent":
        accepted_at = next(
            e["at"] for e in events if e["type"] == "BidAccepted" and e["peer"] == bad_node.peer_id
        )
        detected = lost[0]["at"] - accepted_at
        figures["silence_detected_s"] = round(detected, 2)
        assert SILENCE - 0.05 <= detected <= SILENCE + SILENCE_SLACK, detected
    if kind == "accept-forward":
        # The honest node got the forwarded Accept while it still held its offer (before
        # the requester failed over to it) and refused it without touching that offer.
        refused = (
            f"refused accept for {job['job_id']} from {stack.requester.peer_id}: "
            "accept names another executor"
        )
        assert refused in log_text(honest)
        assert "forwarded the accept" in log_text(bad_node)
    if kind == "dag-bomb-result":
        assert "CONTENT_TOO_LARGE" in lost[0]["data"]["reason"] or "declares" in str(lost[0])
    _report(kind, **figures)
    assert rss_after - rss_before <= RSS_GROWTH_BOUND_KB, figures


@pytest.mark.parametrize("bad_node", ["bid-replay"], indirect=True)
def test_a_replayed_bid_counts_once(adversarial_stack: Devstack, bad_node: NodeProcess) -> None:
    stack = adversarial_stack
    pid = stack.requester.process.pid
    rss_before = vmrss_kb(pid)

    job, events = job_won_by(stack, bad_node)

    assert job["status"] == "completed", (job, events)
    bids = job_bids(stack, job["job_id"])
    providers = [b["provider"] for b in bids]
    assert sorted(providers) == sorted({*providers}), bids  # one entry per bidder
    assert bad_node.peer_id in providers and stack.honest_nodes[0].peer_id in providers
    received = [e["peer"] for e in events if e["type"] == "BidReceived"]
    assert received.count(bad_node.peer_id) == 1, events
    assert accepted(events) == [bad_node.peer_id]  # the replays changed nothing
    assert f"sent the bid for {job['job_id']} 5 times" in log_text(bad_node)
    rss_after = vmrss_kb(pid)
    _report(
        "bid-replay",
        bids=len(bids),
        bid_received_events=len(received),
        requester_rss_mb=f"{rss_before // MiB_KB}->{rss_after // MiB_KB}",
    )
    assert rss_after - rss_before <= RSS_GROWTH_BOUND_KB


def test_an_ordinary_job_still_runs_after_the_attacks(adversarial_stack: Devstack) -> None:
    """Whatever ran before (in this session), the requester still serves honest work."""
    job = run_job(adversarial_stack)
    assert job["status"] == "completed", job
    assert adversarial_stack.alive()

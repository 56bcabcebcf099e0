"""A compute node that floods the job topic with validly signed specs cannot hurt the network.

A devstack started with `bad={"spec-flood": 1}` (`meshrun devstack --bad
spec-flood`): a requester, an honest compute node and a compute node that,
on hearing its first real job, gossips FLOOD_SPECS job specs, each signed
(envelope and pubsub message alike) by a key made for it alone, so every
validator passes. The specs name a closed port as their requester.

The real job that set it off completes on the honest node, and so does one
submitted after the flood; every process stays up; the honest node answers
the flood only within its dial budget (and bans the flooder if it outruns its
gossip budget: on a busy 2-core machine the flooder, signing two messages a
spec, may not), logs it in a bounded number of lines, and it and the requester
(which does not subscribe to the job topic) grow by less than the bounds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.dev.devstack import Devstack
from node.roles.misbehave import FLOOD_SPECS
from tests.adversarial.stack_helpers import (
    MiB_KB,
    accepted,
    job_events,
    log_text,
    run_job,
    vmrss_kb,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REQUESTER_RSS_BOUND_KB = 32 * MiB_KB
COMPUTE_RSS_BOUND_KB = 64 * MiB_KB
LOG_LINES_BOUND = 150  # on the honest node, over the whole flood (aggregated logging)


@pytest.fixture(scope="module")
def flood_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    root: Path = tmp_path_factory.mktemp("spec-flood")
    with Devstack(root, compute=1, bad={"spec-flood": 1}) as stack:
        yield stack


def test_a_spec_flooding_node_cannot_hurt_the_requester_or_the_honest_node(
    flood_stack: Devstack,
) -> None:
    stack = flood_stack
    honest, flooder = stack.honest_nodes[0], stack.bad_nodes[0]
    assert flooder.misbehave == "spec-flood"
    assert flooder.name == "bad-spec-flood-1"
    with flooder.client() as client:
        assert client.node_info()["misbehave"] == "spec-flood"
    time.sleep(1.0)  # the nodes settle after start
    rss = {n.name: vmrss_kb(n.process.pid) for n in (stack.requester, honest)}
    log_lines = len(log_text(honest).splitlines())

    started = time.monotonic()
    first = run_job(stack)  # the flooder hears this job and starts flooding
    deadline = time.monotonic() + 60
    while "misbehave: flooded" not in log_text(flooder):
        assert time.monotonic() < deadline, log_text(flooder)[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # the honest node works through what it received
    second = run_job(stack)
    flood_s = time.monotonic() - started
    # Dropped bids are logged summed per 10 s window: wait for the first summary.
    summary = re.compile(r"dropped \d+ more bids to unconnected peers at ip4/127\.0\.0\.1")
    deadline = time.monotonic() + 15
    while not summary.search(log_text(honest)) and time.monotonic() < deadline:
        time.sleep(0.5)

    assert stack.alive(), log_text(honest)[-3000:]
    for job in (first, second):
        assert job["status"] == "completed", job
        assert job["executor"] == honest.peer_id
        assert accepted(job_events(stack, job["job_id"])) == [honest.peer_id]
    after = {n.name: vmrss_kb(n.process.pid) for n in (stack.requester, honest)}
    honest_log = log_text(honest)
    flood_lines = len(honest_log.splitlines()) - log_lines
    flooded = next(line for line in log_text(flooder).splitlines() if "flooded" in line)
    banned = f"banning peer {flooder.peer_id}" in honest_log
    print(
        f"\n[spec-flood] {flooded.split('misbehave: ')[-1]}; whole test {flood_s:.1f} s; RSS MB "
        + ", ".join(f"{k} {rss[k] // MiB_KB}->{after[k] // MiB_KB}" for k in rss)
        + f"; honest node: {flood_lines} log lines during the flood, flooder banned: {banned}"
    )
    assert f"{FLOOD_SPECS} job specs" in flooded
    # The honest node heard the flood (a fast flooder is banned past its gossip
    # budget first) and answered it only within its dial budget.
    assert summary.search(honest_log), honest_log[-3000:]
    assert flood_lines <= LOG_LINES_BOUND, honest_log[-3000:]
    assert "Traceback" not in honest_log
    assert "Traceback" not in log_text(stack.requester)
    assert after[stack.requester.name] - rss[stack.requester.name] <= REQUESTER_RSS_BOUND_KB
    assert after[honest.name] - rss[honest.name] <= COMPUTE_RSS_BOUND_KB

"""Helpers for adversarial tests against devstack node processes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.dev.devstack import Devstack, NodeProcess
from node.transport.mesh import Mesh, start_mesh
from storage.blockstore import MemoryBlockstore
from tests.node.lifecycle_helpers import submit_mlp

MiB_KB = 1024  # kB in a MiB, for VmRSS figures


def vmrss_kb(pid: int) -> int:
    """Resident memory of a live process, from /proc/<pid>/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1))


def run_job(stack: Devstack, timeout: float = 90.0, **kw: Any) -> dict[str, Any]:
    """Submit the small MLP job on the requester and wait for its end; the final record."""
    with stack.requester.client(timeout=timeout + 10) as client:
        job = submit_mlp(client, timeout_seconds=kw.pop("timeout_seconds", 30), **kw)
        return dict(client.wait_for_job(job["job_id"], timeout=timeout))


def job_events(stack: Devstack, job_id: str) -> list[dict[str, Any]]:
    with stack.requester.client() as client:
        return list(client.call("job.events", job_id=job_id)["events"])


def job_bids(stack: Devstack, job_id: str) -> list[dict[str, Any]]:
    with stack.requester.client() as client:
        return list(client.call("job.bids", job_id=job_id)["bids"])


def accepted(events: list[dict[str, Any]]) -> list[str]:
    """The executors the requester accepted, in order (one per attempt)."""
    return [e["peer"] for e in events if e["type"] == "BidAccepted"]


def job_won_by(
    stack: Devstack, bad: NodeProcess, tries: int = 3, **kw: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run jobs until one is first accepted by `bad`; that job's record and events.

    The bad node asks the lowest price, but a requester settles 0.1 s after the
    first acceptable bid: on a loaded machine the honest bid can land first
    and win alone. Such a job proves nothing about the attack, so it is run again.
    """
    seen: list[str] = []
    for _ in range(tries):
        job = run_job(stack, **kw)
        events = job_events(stack, job["job_id"])
        first = accepted(events)[:1]
        if first == [bad.peer_id]:
            return job, events
        seen.append(f"{job['job_id']}: first accepted {first}, status {job['status']}")
    raise AssertionError(f"{bad.name} never won a job: {seen}")


def log_text(node: NodeProcess) -> str:
    return node.log_path.read_text(errors="replace")


@asynccontextmanager
async def meshes(count: int) -> AsyncIterator[list[Mesh]]:
    """`count` in-process libp2p peers on loopback, each with a fresh identity."""
    async with AsyncExitStack() as stack:
        meshes = [
            await stack.enter_async_context(
                start_mesh(
                    Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], BitswapStore(MemoryBlockstore())
                )
            )
            for _ in range(count)
        ]
        yield meshes
        for mesh in meshes:
            mesh.nursery.cancel_scope.cancel()

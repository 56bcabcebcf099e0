"""Follow a job live with the async SDK (`node.client.AsyncClient`) under trio.

What it shows:
  - `AsyncClient` as an async context manager (httpx on anyio: trio or asyncio);
  - submitting a batched job (`params={"batch_chunk": N}` runs the batch in slices,
    so progress counts items done);
  - `async for event in client.stream_status(job_id)`: first a `Snapshot` of the
    job record, then every event (bids, assignment, progress, receipt…) with the
    job's status, substate and progress after it; the iteration ends by itself
    at the first terminal status.

With no node given (`--rpc URL --token T`, `--data-dir DIR`, or $MESHRUN_RPC) it
starts a throwaway local network (1 requester + 1 compute node) first.

Run it:
    .venv/bin/python examples/stream_status_async.py
    .venv/bin/python examples/stream_status_async.py --data-dir ./requester --batch 64 --chunk 8

Exit code 0 when the job completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import trio

from node.client import AsyncClient, Event, JobStatus, RpcError, discover


@contextmanager
def node_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The (RPC URL, token) of the node to use; a throwaway local network if none is given.

    Blocking (it may start processes), so it runs before `trio.run`, not inside it.
    """
    if args.rpc or args.data_dir or os.environ.get("MESHRUN_RPC"):
        data_dirs = [args.data_dir] if args.data_dir else []
        endpoint = discover(args.rpc, args.token, data_dirs=data_dirs)
        yield endpoint.url, endpoint.token
        return
    from node.dev.devstack import Devstack

    print("no node given: starting a local network (1 requester + 1 compute node)…")
    with (
        tempfile.TemporaryDirectory(prefix="meshrun-example-") as scratch,
        Devstack(Path(scratch), compute=1, bid_window=0.5) as stack,
    ):
        yield stack.requester.rpc_url, stack.requester.token


def describe(event: Event) -> str:
    parts = [f"{event.type:<18}", f"status={event.status}"]
    if event.substate:
        parts.append(f"substate={event.substate}")
    if event.progress is not None:
        parts.append(f"progress={event.progress:g}%")
    return " ".join(parts)


async def follow_one_job(url: str, token: str | None, batch: int, chunk: int) -> bool:
    from node.dev.models import build_mlp

    model = build_mlp(in_dim=16, hidden=64, out_dim=4, seed=11)
    buffer = io.BytesIO()
    x = np.random.default_rng(5).standard_normal((batch, 16)).astype(np.float32)
    np.savez(buffer, x=x)

    async with AsyncClient(url, token, timeout=60) as client:
        model_cid = await client.storage_add(model)
        inputs_cid = await client.storage_add(buffer.getvalue())
        submitted = await client.submit_job(
            model_cid, inputs_cid, timeout_seconds=60, params={"batch_chunk": chunk}
        )
        job_id = submitted.job_id
        print(f"submitted job {job_id} ({batch} items in slices of {chunk})")

        last: Event | None = None
        async for event in client.stream_status(job_id, timeout=120):
            print(describe(event))  # the loop ends by itself at a terminal status
            last = event

        final = await client.get_job(job_id)
        print(f"final status {final.status}; result CID {final.result_cid}")
        return last is not None and last.status is final.status is JobStatus.COMPLETED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", help="node JSON-RPC URL, e.g. http://127.0.0.1:7780/rpc")
    parser.add_argument("--token", help="the node's RPC token (default: from its data dir)")
    parser.add_argument("--data-dir", help="data dir of a running node (reads node.json)")
    parser.add_argument("--batch", type=int, default=32, help="input rows")
    parser.add_argument("--chunk", type=int, default=8, help="rows per slice (batch_chunk)")
    args = parser.parse_args()
    try:
        with node_endpoint(args) as (url, token):
            ok = trio.run(follow_one_job, url, token, args.batch, args.chunk)
    except RpcError as err:
        print(f"error {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    print("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run a whole meshrun network from Python, submit a job through it, check the receipt.

What it shows:
  - `Devstack(dir, compute=N)`: 1 requester + N compute nodes, each its own OS
    process on 127.0.0.1, wired by bootstrap; `with` starts it (waiting until every
    compute node has joined the job topic) and stops every process on exit;
  - `stack.requester.client()`: a blocking SDK client for the requester's JSON-RPC;
  - the job's event log (`job.events`): who bid, which bid was accepted;
  - checking the result without trusting the node: the receipt envelope's Ed25519
    signature (crypto.envelope), its signer = the accepted executor, and the
    fetched result files re-hashed to the result CID (storage.blockstore).

This is what `meshrun devstack` and `meshrun demo` do from the command line.

Run it:
    .venv/bin/python examples/local_network.py               # 2 compute nodes
    .venv/bin/python examples/local_network.py --compute 3 --keep ./stack

Exit code 0 when the job completed and every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crypto.envelope import open_envelope
from node.client import Client, JobStatus
from node.dev.devstack import Devstack
from node.dev.models import build_mlp
from protocol.messages import Receipt
from storage.blockstore import MemoryBlockstore
from storage.cid import Cid


def run_job(client: Client, names: dict[str, str]) -> bool:
    model_cid = client.storage_add(build_mlp(in_dim=8, hidden=16, out_dim=3, seed=1))
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((4, 8), dtype=np.float32))
    inputs_cid = client.storage_add(buffer.getvalue())

    submitted = client.submit_job(model_cid, inputs_cid, timeout_seconds=60)
    job = client.wait_for_job(submitted.job_id, timeout=90)
    print(f"job {job.job_id}: {job.status}")

    for event in client.job_events(job.job_id).events:
        if event.type in ("BidReceived", "NoBid", "BidAccepted", "Completed", "Failed"):
            who = names.get(event.peer or "", event.peer)
            print(f"  {event.type:<12} {who} {event.data}")
    if job.status is not JobStatus.COMPLETED or job.receipt_envelope_b64 is None:
        return False

    # The receipt is a signed envelope: check it here, not on the node's word.
    opened = open_envelope(base64.b64decode(job.receipt_envelope_b64), Receipt)
    receipt = opened.message
    assert isinstance(receipt, Receipt)
    files = client.storage_tree(receipt.result_cid).contents()
    checks = {
        "receipt signed by the accepted executor": opened.signer == job.executor,
        "executor is one of our compute nodes": opened.signer in names
        and names[opened.signer] != "requester",
        "receipt names this job and its inputs": (receipt.job_id, receipt.inputs_cid)
        == (job.job_id, inputs_cid),
        "result files re-hash to the result CID": MemoryBlockstore().add_tree(files)
        == Cid.decode(receipt.result_cid),
    }
    print(f"result CID {receipt.result_cid} ({', '.join(sorted(files))})")
    for check, ok in checks.items():
        print(f"  {'ok ' if ok else 'BAD'} {check}")
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute", type=int, default=2, help="number of compute nodes")
    parser.add_argument("--keep", help="put the nodes' data dirs here and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="meshrun-example-") as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        started = time.perf_counter()
        with Devstack(root, compute=args.compute, bid_window=1.0) as stack:
            print(f"network up in {time.perf_counter() - started:.1f}s ({root})")
            names = {node.peer_id: node.name for node in stack.nodes}
            for node in stack.nodes:
                print(f"  {node.name:<10} {node.peer_id} {node.rpc_url}")
            with stack.requester.client(timeout=60) as client:
                ok = run_job(client, names)
        print("network stopped")
    print("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

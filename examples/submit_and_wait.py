"""Submit one ONNX job with the blocking SDK (`node.client.Client`) and wait for its result.

What it shows:
  - connecting to your node: `--rpc URL --token T`, or `--data-dir DIR` of a running
    node (its node.json and rpc.token), or $MESHRUN_RPC / $MESHRUN_TOKEN;
  - storing a model and an .npz input bundle on the node (`storage_add` returns CIDs);
  - `submit_job`, then `wait_for_job` until the job is terminal (both return a
    typed `Job`: `job.status`, `job.result_cid`, `job.executor`, `job.error`…);
  - reading the result package (`storage_tree(cid).contents()`: `outputs/<name>.npy`)
    and checking the output against a local onnxruntime run.

With no node given it starts a throwaway local network (1 requester + 1 compute
node) for the duration of the script. Without `--model`/`--inputs` it uses a
small synthetic MLP (Gemm+ReLU, input `x` [batch, 16]) and random inputs.

Run it:
    .venv/bin/python examples/submit_and_wait.py                      # own local network
    .venv/bin/python examples/submit_and_wait.py --data-dir ./requester
    .venv/bin/python examples/submit_and_wait.py --rpc http://127.0.0.1:7780/rpc --token T \\
        --model model.onnx --inputs inputs.npz

Exit code 0 when the job completed and its outputs match the local run, 1 otherwise.
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
import onnxruntime as ort

from node.client import Client, JobStatus, RpcError, discover


@contextmanager
def node_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The (RPC URL, token) of the node to use; a throwaway local network if none is given."""
    if args.rpc or args.data_dir or os.environ.get("MESHRUN_RPC"):
        data_dirs = [args.data_dir] if args.data_dir else []
        endpoint = discover(args.rpc, args.token, data_dirs=data_dirs)
        yield endpoint.url, endpoint.token
        return
    from node.dev.devstack import Devstack  # only needed when we run the network ourselves

    print("no node given: starting a local network (1 requester + 1 compute node)…")
    with (
        tempfile.TemporaryDirectory(prefix="meshrun-example-") as scratch,
        Devstack(Path(scratch), compute=1, bid_window=0.5) as stack,
    ):
        yield stack.requester.rpc_url, stack.requester.token


def load_job_files(args: argparse.Namespace) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model bytes and the named input tensors: from files, or a synthetic MLP."""
    if args.model:
        model = Path(args.model).read_bytes()
    else:
        from node.dev.models import build_mlp

        model = build_mlp(in_dim=16, hidden=32, out_dim=4, seed=7)
    if args.inputs:
        with np.load(args.inputs, allow_pickle=False) as bundle:
            inputs = {name: bundle[name] for name in bundle.files}
    else:
        rng = np.random.default_rng(3)
        inputs = {"x": rng.standard_normal((8, 16)).astype(np.float32)}
    return model, inputs


def npz_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)  # type: ignore[arg-type]
    return buffer.getvalue()


def result_outputs(client: Client, result_cid: str) -> dict[str, np.ndarray]:
    """The output tensors of a result package (a UnixFS directory: outputs/<name>.npy)."""
    outputs = {}
    for path, data in client.storage_tree(result_cid).contents().items():
        if path.startswith("outputs/") and path.endswith(".npy"):
            name = path.removeprefix("outputs/").removesuffix(".npy")
            outputs[name] = np.load(io.BytesIO(data), allow_pickle=False)
    return outputs


def run(client: Client, model: bytes, inputs: dict[str, np.ndarray], timeout: float) -> bool:
    model_cid = client.storage_add(model)
    inputs_cid = client.storage_add(npz_bytes(inputs))
    print(f"model  {model_cid}")
    print(f"inputs {inputs_cid}")

    submitted = client.submit_job(model_cid, inputs_cid, timeout_seconds=timeout)
    print(f"submitted job {submitted.job_id}")
    job = client.wait_for_job(submitted.job_id, timeout=timeout + 30)
    print(f"status {job.status}")
    if job.status is not JobStatus.COMPLETED or job.result_cid is None:
        error = f"{job.error.code}: {job.error.message}" if job.error else "no error given"
        print(f"job did not complete: {error}", file=sys.stderr)
        return False
    print(f"result CID {job.result_cid}")
    print(f"executor   {job.executor}")

    remote = result_outputs(client, job.result_cid)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    local = dict(zip(names, session.run(names, inputs), strict=True))
    for name, expected in local.items():
        got = remote.get(name)
        if got is None or got.shape != expected.shape:
            print(f"output {name!r} missing or of the wrong shape", file=sys.stderr)
            return False
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            print(f"output {name!r} differs from the local run", file=sys.stderr)
            return False
        print(f"output {name} {list(got.shape)} matches a local onnxruntime run")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", help="node JSON-RPC URL, e.g. http://127.0.0.1:7780/rpc")
    parser.add_argument("--token", help="the node's RPC token (default: from its data dir)")
    parser.add_argument("--data-dir", help="data dir of a running node (reads node.json)")
    parser.add_argument("--model", help="an .onnx file (default: a synthetic MLP)")
    parser.add_argument("--inputs", help="an .npz bundle, one array per model input")
    parser.add_argument("--timeout", type=float, default=60.0, help="job timeout, seconds")
    args = parser.parse_args()

    model, inputs = load_job_files(args)
    try:
        with node_endpoint(args) as (url, token), Client(url, token, timeout=60) as client:
            print(f"node {url}")
            ok = run(client, model, inputs, args.timeout)
    except RpcError as err:
        print(f"error {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    print("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every script in examples/ runs, as a user would run it, and says it passed.

Each script runs as a subprocess with this interpreter (the venv's python). The
ones that talk to a node share one devstack (1 requester + 1 compute node),
given with `--rpc URL --token T`; local_network.py starts its own network, since
that is what it shows. A script exits 0 when its own checks pass, and 77 when
an optional package it needs is missing (the test is then skipped with the
script's reason).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXIT_SKIPPED = 77


def run_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == EXIT_SKIPPED:
        pytest.skip(proc.stderr.strip().removeprefix("skipped: "))
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("done"), proc.stdout
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("examples-stack"), compute=1, bid_window=0.5) as s:
        yield s


def node_args(stack: Devstack) -> list[str]:
    return ["--rpc", stack.requester.rpc_url, f"--token={stack.requester.token or ''}"]


def test_every_example_is_tested_and_documented() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = {"submit_and_wait.py", "stream_status_async.py", "local_network.py", "ocr_job.py"}
    assert set(scripts) == tested
    assert not (EXAMPLES / "__init__.py").exists()  # scripts, never an importable package
    for name in scripts:
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""'), f"{name} has no docstring"
        assert "Run it:" in source and f"examples/{name}" in source, name


def test_submit_and_wait_synthetic_model(stack: Devstack) -> None:
    out = run_example("submit_and_wait.py", *node_args(stack)).stdout
    assert "status completed" in out
    assert "result CID bafy" in out
    assert "output y [8, 4] matches a local onnxruntime run" in out


def test_submit_and_wait_files_from_a_data_dir(stack: Devstack, tmp_path: Path) -> None:
    import numpy as np

    model = tmp_path / "model.onnx"
    model.write_bytes(build_mlp(in_dim=16, hidden=8, out_dim=2, seed=4))
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **make_inputs(in_dim=16, batch=5, seed=2))  # type: ignore[arg-type]
    args = ["--data-dir", str(stack.requester.data_dir), "--model", str(model)]
    out = run_example("submit_and_wait.py", *args, "--inputs", str(inputs)).stdout
    assert "output y [5, 2] matches a local onnxruntime run" in out


def test_stream_status_async(stack: Devstack) -> None:
    out = run_example("stream_status_async.py", *node_args(stack), "--batch", "16").stdout
    lines = [line for line in out.splitlines() if "status=" in line]
    types = [line.split()[0] for line in lines]
    assert types[0] == "Snapshot"
    assert types[-1] == "Completed"
    # What happened before the stream opened is in the Snapshot's status (a fast
    # devstack may have assigned the job by then); everything after it is an event.
    before = re.search(r"status=(?:JobStatus\.)?(\w+)", lines[0])
    assert before is not None, lines[0]
    status = before.group(1).lower()
    assert status in ("pending", "bidding", "assigned", "running"), lines[0]
    if status in ("pending", "bidding"):
        assert "BidAccepted" in types, types
    assert "ReceiptVerified" in types, types
    assert "final status completed; result CID bafy" in out


def test_ocr_job(stack: Devstack) -> None:
    out = run_example("ocr_job.py", *node_args(stack)).stdout
    assert "matches a local run" in out
    assert out.count(" ok\n") == 3  # the three default lines read back as drawn


def test_local_network() -> None:
    out = run_example("local_network.py").stdout
    assert out.count("BidReceived") == 2  # both compute nodes bid
    assert "BidAccepted" in out
    assert "BAD" not in out and out.count("  ok  ") == 4
    assert "network stopped" in out

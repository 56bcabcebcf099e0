"""The whole loop across separate OS processes on loopback: a devstack of one
requester and two compute nodes, real libp2p, real onnxruntime, real CIDs."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from crypto.envelope import open_envelope
from node.client import Client, RpcError
from node.dev.devstack import Devstack
from node.dev.models import build_lookup_model, build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from node.roles.result_package import load_npy
from protocol.errors import ErrorCode
from protocol.messages import Receipt
from storage.blockstore import MemoryBlockstore
from storage.cid import Cid
from tests.node.lifecycle_helpers import event_types, submit_mlp, submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("devstack"), compute=2, bid_window=1.0) as devstack:
        yield devstack


@pytest.fixture()
def client(stack: Devstack) -> Iterator[Client]:
    with stack.requester.client(timeout=60) as c:
        yield c


def _local_run(model: bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], inputs)[0])


def test_job_runs_on_a_compute_node_and_verifies(stack: Devstack, client: Client) -> None:
    model = build_mlp(in_dim=16, hidden=64, out_dim=5, seed=11)
    inputs = make_inputs(in_dim=16, batch=32, seed=5)
    model_cid = client.storage_add(model)
    inputs_cid = client.storage_add(encode_tensors(inputs))

    job = client.submit_job(model_cid, inputs_cid, timeout_seconds=60)
    assert job["status"] in ("pending", "bidding")
    job = client.wait_for_job(job["job_id"], timeout=90)

    assert job["status"] == "completed", job.get("error")
    compute_ids = {n.peer_id for n in stack.compute_nodes}
    assert job["executor"] in compute_ids

    opened = open_envelope(base64.b64decode(job["receipt_envelope_b64"]), Receipt)
    receipt = opened.message
    assert isinstance(receipt, Receipt)
    assert opened.signer == job["executor"] == receipt.provider
    assert receipt.job_id == job["job_id"]
    assert (receipt.model_cid, receipt.inputs_cid) == (model_cid, inputs_cid)
    assert receipt.result_cid == job["result_cid"]

    files = {
        path: base64.b64decode(b64)
        for path, b64 in client.call("storage.tree", cid=job["result_cid"])["files"].items()
    }
    assert set(files) >= {"output.json", "outputs/y.npy", "logs/stdout.log", "logs/stderr.log"}
    assert MemoryBlockstore().add_tree(files) == Cid.decode(job["result_cid"])
    for path, digest in receipt.output_digests.items():
        assert hashlib.sha256(files[path]).hexdigest() == digest
    np.testing.assert_allclose(
        load_npy(files["outputs/y.npy"]), _local_run(model, inputs), rtol=1e-5, atol=1e-6
    )
    index = json.loads(files["output.json"])
    assert index["job_id"] == job["job_id"]
    assert index["outputs"][0]["shape"] == [32, 5]

    types = [e["type"] for e in client.call("job.events", job_id=job["job_id"])["events"]]
    for expected in (
        "Created",
        "Published",
        "BidReceived",
        "BidAccepted",
        "ReceiptVerified",
        "Completed",
    ):
        assert expected in types
    assert types.index("BidAccepted") < types.index("ReceiptVerified") < types.index("Completed")

    # The executor's own record agrees, and it can serve the result by CID too.
    executor = next(n for n in stack.compute_nodes if n.peer_id == job["executor"])
    with executor.client() as ex:
        mirrored = ex.get_job(job["job_id"])
        assert mirrored["status"] == "completed"
        assert mirrored["result_cid"] == job["result_cid"]


def test_unmeetable_requirements_get_reasons_not_silence(client: Client) -> None:
    model_cid = client.storage_add(build_mlp(seed=1))
    inputs_cid = client.storage_add(encode_tensors(make_inputs(batch=2)))
    job = client.call(
        "job.submit",
        model_cid=model_cid,
        inputs_cid=inputs_cid,
        timeout_seconds=10,
        requirements={"provider": "tensorrt"},
        bid_window_seconds=2.0,
    )
    job = client.wait_for_job(job["job_id"], timeout=30)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "NO_BIDS"
    assert len(job["error"]["details"]["refusals"]) == 2
    events = client.call("job.events", job_id=job["job_id"])["events"]
    refusals = [e for e in events if e["type"] == "NoBid"]
    assert {e["data"]["reason"] for e in refusals} == {"PROVIDER_UNAVAILABLE"}


def test_rpc_errors_have_stable_codes(client: Client) -> None:
    with pytest.raises(RpcError) as missing:
        client.get_job("bafkreidoesnotexist000000000000000000000000000000000000000")
    assert missing.value.code == ErrorCode.JOB_NOT_FOUND
    with pytest.raises(RpcError) as bad_cid:
        client.call("job.submit", model_cid="not-a-cid", inputs_cid="also-not")
    assert bad_cid.value.code == ErrorCode.INVALID_CID
    with pytest.raises(RpcError) as bad_params:
        client.call("job.submit", model_cid="x", inputs_cid="y", timeout_seconds=-1)
    assert bad_params.value.code == ErrorCode.INVALID_PARAMS
    absent = str(MemoryBlockstore().add_bytes(b"never stored here"))
    with pytest.raises(RpcError) as not_found:
        client.submit_job(absent, absent)
    assert not_found.value.code == ErrorCode.CID_NOT_FOUND
    assert client.node_info()["mode"] == "requester"


def test_cli_submit_wait_and_get(
    stack: Devstack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHRUN_TOKEN", str(stack.requester.token))  # the CLI's env fallback
    model, inputs = tmp_path / "model.onnx", tmp_path / "inputs.npz"
    model.write_bytes(build_mlp(seed=3))
    inputs.write_bytes(encode_tensors(make_inputs(batch=4, seed=9)))
    rpc = ["--rpc", stack.requester.rpc_url]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "client",
            "submit",
            str(model),
            "--input",
            str(inputs),
            "--wait",
            "--json",
            *rpc,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "completed"
    out = tmp_path / "result"
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "client",
            "get",
            job["result_cid"],
            "--output",
            str(out),
            "--json",
            *rpc,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 0, got.stderr
    assert (out / "outputs" / "y.npy").exists()
    assert load_npy((out / "outputs" / "y.npy").read_bytes()).shape == (4, 4)
    status = subprocess.run(
        [sys.executable, "-m", "cli", "client", "status", "no-such-job", "--json", *rpc],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode != 0
    assert json.loads(status.stdout)["error"]["code"] == "JOB_NOT_FOUND"


# ---- lifecycle on the same devstack -------------------------------------------------------


def test_cancel_reaches_the_executor_and_stops_the_run(stack: Devstack, client: Client) -> None:
    job = submit_spin(client, seconds=30, timeout_seconds=120)
    running = wait_status(client, job["job_id"], {"running"})
    executor = next(n for n in stack.compute_nodes if n.peer_id == running["executor"])
    canceled = client.call("job.cancel", job_id=job["job_id"], force=True)
    assert canceled["status"] == "canceled"
    types = event_types(client, job["job_id"])
    assert "CancelRequested" in types and types[-1] == "Canceled"
    with executor.client() as ex:
        mirrored = wait_status(ex, job["job_id"], {"canceled"}, timeout=10)
        assert mirrored["status"] == "canceled"
        used = ex.call("job.events", job_id=job["job_id"])["events"][-1]["data"]["resources"]
        assert 0 < used["wall_seconds"] < 30
    with pytest.raises(RpcError) as again:
        client.call("job.cancel", job_id=job["job_id"])
    assert again.value.code == ErrorCode.ILLEGAL_TRANSITION
    # The executor's worker was killed, not left spinning: the next job runs promptly.
    quick = client.wait_for_job(submit_mlp(client, seed=21)["job_id"], timeout=60)
    assert quick["status"] == "completed"


def test_timeout_ends_the_job_and_kills_the_run(client: Client) -> None:
    job = submit_spin(client, seconds=60, timeout_seconds=2)
    done = client.wait_for_job(job["job_id"], timeout=60)
    assert done["status"] == "timeout", done
    assert done["error"]["code"] == "TIMEOUT"


def test_cancel_while_bidding(client: Client) -> None:
    job = submit_mlp(client, requirements={"provider": "tensorrt"}, bid_window_seconds=20)
    wait_status(client, job["job_id"], {"bidding"})
    canceled = client.call("job.cancel", job_id=job["job_id"])
    assert canceled["status"] == "canceled"


def test_progress_substates_and_batched_progress(client: Client) -> None:
    model_cid = client.storage_add(build_mlp(seed=4))
    inputs_cid = client.storage_add(encode_tensors(make_inputs(batch=20, seed=4)))
    job = client.call(
        "job.submit",
        model_cid=model_cid,
        inputs_cid=inputs_cid,
        params={"batch_chunk": 5, "ort_log_level": "info"},
        output_config={"outputs": ["y"]},
    )
    assert job["estimated_time_seconds"] > 0
    done = client.wait_for_job(job["job_id"], timeout=60)
    assert done["status"] == "completed" and done["progress"] == 100.0
    progress = [
        e["data"]
        for e in client.call("job.events", job_id=job["job_id"])["events"]
        if e["type"] == "Progress"
    ]
    substates = [p["substate"] for p in progress]
    assert substates[0] == "warming_up"
    percents = [p["progress"] for p in progress]
    assert percents == sorted(percents) and all(p < 100.0 for p in percents)
    # Points closer together than PROGRESS_INTERVAL are coalesced (the newest is sent),
    # so how many of the per-chunk points show depends on how fast the chunks ran;
    # the executor's pool reports each chunk (tests/node/executor/test_pool.py).
    assert {"processing", "finalizing", "uploading"} >= set(substates[1:])
    detail = client.call("job.get", job_id=job["job_id"], include=["logs", "metrics", "resources"])
    assert set(detail["logs"]) == {"stdout", "stderr"}
    assert "Session successfully initialized" in detail["logs"]["stderr"]
    assert "bidding_s" in detail["metrics"]["phases"]
    assert detail["resources"]["wall_seconds"] > 0


def test_history_export_stats_results_delete(client: Client) -> None:
    ids = [client.wait_for_job(submit_mlp(client, seed=s)["job_id"])["job_id"] for s in (31, 32)]
    page1 = client.call("job.list", limit=1)
    assert page1["total"] >= 2 and page1["has_more"] and len(page1["jobs"]) == 1
    page2 = client.call("job.list", limit=1, cursor=page1["next_cursor"])
    assert page2["jobs"][0]["job_id"] != page1["jobs"][0]["job_id"]
    completed = client.call("job.list", status="completed", days=1, limit=1000)
    assert set(ids) <= {j["job_id"] for j in completed["jobs"]}
    assert client.call("job.list", from_time=time.time() + 60)["total"] == 0

    batch = client.call("job.get_batch", job_ids=[*ids, "bafkreinotajob"])
    assert [j["job_id"] for j in batch["jobs"]] == ids and batch["missing"] == ["bafkreinotajob"]

    csv_export = client.call("job.export", format="csv", status="completed")
    header, *rows = csv_export["content"].strip().splitlines()
    assert header.startswith("job_id,status,") and len(rows) == csv_export["count"] >= 2
    assert client.call("job.export", format="json")["content"][0]["job_id"]

    stats = client.call("job.stats")
    assert stats["total"] >= 2 and 0 < stats["success_rate"] <= 1
    assert stats["average_completion_seconds"] > 0 and stats["total_spent"] > 0

    results = client.call("job.results", job_id=ids[0])
    paths = {f["path"] for f in results["files"]}
    assert {"output.json", "outputs/y.npy"} <= paths

    deleted = client.call("job.delete", job_id=ids[0])
    assert deleted["deleted"] and deleted["blocks_removed"] > 0
    with pytest.raises(RpcError) as gone:
        client.get_job(ids[0])
    assert gone.value.code == ErrorCode.JOB_NOT_FOUND


def test_model_catalog_names_resolve_to_cids(client: Client) -> None:
    added = client.call(
        "model.add", name="mlp-small", data_b64=base64.b64encode(build_mlp(seed=8)).decode()
    )
    assert any(m["name"] == "mlp-small" for m in client.call("model.list")["models"])
    inputs_cid = client.storage_add(encode_tensors(make_inputs(batch=2)))
    job = client.call("job.submit", model="mlp-small", inputs_cid=inputs_cid)
    done = client.wait_for_job(job["job_id"], timeout=60)
    assert done["status"] == "completed" and done["model_cid"] == added["cid"]
    with pytest.raises(RpcError) as unknown:
        client.call("job.submit", model="no-such-model", inputs_cid=inputs_cid)
    assert unknown.value.code == ErrorCode.MODEL_NOT_FOUND


def test_a_failed_batch_keeps_the_items_it_finished(client: Client) -> None:
    model, table = build_lookup_model(rows=4, dim=3, seed=2)
    idx = np.array([0, 1, 2, 3, 0, 1, 99, 2], np.int64)
    model_cid = client.storage_add(model)
    inputs_cid = client.storage_add(encode_tensors({"idx": idx}))
    job = client.call(
        "job.submit", model_cid=model_cid, inputs_cid=inputs_cid, params={"batch_chunk": 2}
    )
    done = client.wait_for_job(job["job_id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "EXECUTION_FAILED"
    assert "items 6..7 of 8 failed" in done["error"]["message"]
    partial_cid = done["error"]["details"]["partial_result_cid"]
    files = {
        path: base64.b64decode(b64)
        for path, b64 in client.call("storage.tree", cid=partial_cid)["files"].items()
    }
    assert json.loads(files["output.json"])["status"] == "failed"
    np.testing.assert_array_equal(load_npy(files["outputs/y.npy"]), table[idx[:6]])
    assert "PartialResultsKept" in event_types(client, job["job_id"])

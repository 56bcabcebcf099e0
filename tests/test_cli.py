"""The `meshrun client` verbs as a user runs them: separate processes, real node."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from tests.node.lifecycle_helpers import submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("cli"), compute=1, bid_window=1.0) as devstack:
        yield devstack


def meshrun(stack: Devstack, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "client",
            args[0],
            "--rpc",
            stack.requester.rpc_url,
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MESHRUN_TOKEN": stack.requester.token or ""},
    )
    if ok:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def as_json(run: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def finished(stack: Devstack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("inputs")
    (work / "m.onnx").write_bytes(build_mlp(seed=12))
    (work / "x.npz").write_bytes(encode_tensors(make_inputs(batch=6, seed=2)))
    run = meshrun(stack, "submit", str(work / "m.onnx"), "--input", str(work / "x.npz"),
                  "--wait", "--batch-chunk", "2", "--json")  # fmt: skip
    job = as_json(run)
    assert job["status"] == "completed"
    return dict(job)


def test_status_watch_events(stack: Devstack, finished: dict[str, Any]) -> None:
    job_id = finished["job_id"]
    assert as_json(meshrun(stack, "status", job_id, "--json"))["status"] == "completed"
    assert (
        as_json(meshrun(stack, "watch", job_id, "--json"))["result_cid"] == finished["result_cid"]
    )
    events = as_json(meshrun(stack, "events", job_id, "--json"))["events"]
    assert events[0]["type"] == "Created" and events[-1]["type"] == "Completed"
    human = meshrun(stack, "status", job_id).stdout
    assert "completed" in human and finished["result_cid"] in human


def test_list_export_stats(stack: Devstack, finished: dict[str, Any], tmp_path: Path) -> None:
    listing = as_json(meshrun(stack, "list", "--status", "completed", "--json"))
    assert finished["job_id"] in {j["job_id"] for j in listing["jobs"]}
    assert meshrun(stack, "list", "--days", "1").returncode == 0
    out = tmp_path / "jobs.csv"
    meshrun(stack, "export", "--format", "csv", "--output", str(out))
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert finished["job_id"] in {r["job_id"] for r in rows}
    exported = json.loads(meshrun(stack, "export", "--format", "json").stdout)
    assert any(j["job_id"] == finished["job_id"] for j in exported)
    stats = as_json(meshrun(stack, "stats", "--json"))
    assert stats["total"] >= 1 and stats["by_status"]["completed"] >= 1
    assert "success rate" in meshrun(stack, "stats").stdout


def test_peers_show_the_executors_record(stack: Devstack, finished: dict[str, Any]) -> None:
    listing = as_json(meshrun(stack, "peers", "--json"))
    executor = finished["executor"]
    assert executor in listing["topic_peers"] and listing["known"] >= 1
    mine = [p for p in listing["reputation"] if p["peer"] == executor]
    assert [p["role"] for p in mine] == ["executor"]
    record = mine[0]
    assert record["counts"]["won"] >= 1
    assert record["counts"]["completed"] + record["counts"]["verified"] >= 1
    assert record["score"] > 0.5 and record["excluded_until"] is None and record["why"]
    none = as_json(meshrun(stack, "peers", "--role", "requester", "--json"))
    assert none["reputation"] == [] and none["known"] == 0
    human = meshrun(stack, "peers").stdout
    assert "known" in human and executor[-12:] in human and "won" in human


def test_download_verify(stack: Devstack, finished: dict[str, Any], tmp_path: Path) -> None:
    job_id = finished["job_id"]
    folder = tmp_path / "result"
    meshrun(stack, "download", job_id, "--output", str(folder))
    check = subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=folder,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert (folder / "outputs" / "y.npy").exists()
    archive = tmp_path / "result.zip"
    meshrun(stack, "download", job_id, "--output", str(archive))
    with zipfile.ZipFile(archive) as z:
        assert {"output.json", "outputs/y.npy", "output.sha256"} <= set(z.namelist())
        assert "meshrun/spec.cbor" in z.namelist()
    verdict = as_json(meshrun(stack, "verify", job_id, "--json"))
    assert verdict["verified"] is True and all(c["ok"] for c in verdict["checks"])
    assert "verified" in meshrun(stack, "verify", job_id).stdout
    for package in (folder, archive):  # the same checks offline, from the package alone
        offline = as_json(meshrun(stack, "verify", str(package), "--json"))
        assert offline["verified"] is True and offline["job_id"] == job_id


def test_cancel_and_delete(stack: Devstack) -> None:
    with stack.requester.client() as client:
        job = submit_spin(client, seconds=30, timeout_seconds=120)
        wait_status(client, job["job_id"], {"running"})
    canceled = as_json(meshrun(stack, "cancel", job["job_id"], "--force", "--json"))
    assert canceled["status"] == "canceled"
    deleted = as_json(meshrun(stack, "delete", job["job_id"], "--force", "--json"))
    assert deleted["deleted"] is True
    gone = meshrun(stack, "status", job["job_id"], "--json", ok=False)
    assert gone.returncode == 1 and as_json(gone)["error"]["code"] == "JOB_NOT_FOUND"


def test_errors_are_clear(stack: Devstack, tmp_path: Path) -> None:
    bad = meshrun(stack, "cancel", "nope", "--force", "--json", ok=False)
    assert as_json(bad)["error"]["code"] == "JOB_NOT_FOUND"
    unreachable = subprocess.run(
        [sys.executable, "-m", "cli", "client", "info", "--rpc", "http://127.0.0.1:9/rpc"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert "NODE_UNREACHABLE" in unreachable.stderr

"""The `meshrun client` verbs as a user runs them: separate processes, real node."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
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


# ------------------------------------------------------------- issue 12: CLI traps


def raw(
    stack: Devstack, *args: str, stdin: str | None = None, token: bool = True
) -> subprocess.CompletedProcess[str]:
    """`python -m cli ARGS` exactly as given (the caller places --rpc/--token/--json)."""
    env = {**os.environ}
    env.pop("MESHRUN_TOKEN", None)
    if token:
        env["MESHRUN_TOKEN"] = stack.requester.token or ""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin if stdin is not None else "",
        env=env,
    )


def test_hoisting_global_options() -> None:
    from cli import hoist_global_options

    assert hoist_global_options(["status", "J", "--rpc", "U", "--json", "--token=T"]) == [
        "--rpc", "U", "--json", "--token=T", "status", "J",
    ]  # fmt: skip
    assert hoist_global_options(["get", "--", "--json"]) == ["get", "--", "--json"]


def test_json_given_once_does_not_stick_to_the_next_invocation(tmp_path: Path) -> None:
    """One process may run the CLI many times; `--json` on one call must not turn
    the next call's human output into JSON (the group keeps options per call)."""
    from typer.testing import CliRunner

    import cli

    missing = str(tmp_path / "no-such-package")
    runner = CliRunner()
    first = runner.invoke(cli.app, ["client", "--json", "verify", missing])
    assert first.exit_code != 0 and json.loads(first.output)
    second = runner.invoke(cli.app, ["client", "verify", missing])
    assert second.exit_code == first.exit_code
    with pytest.raises(json.JSONDecodeError):
        json.loads(second.output)


def test_cancel_without_a_terminal_asks_stdin(stack: Devstack) -> None:
    with stack.requester.client() as client:
        job = submit_spin(client, seconds=30, timeout_seconds=120)
        wait_status(client, job["job_id"], {"running"})
    rpc = stack.requester.rpc_url
    for answer in ("n\n", "", "maybe\n"):  # `echo n |`, no stdin at all, nonsense
        refused = raw(stack, "client", "cancel", job["job_id"], "--rpc", rpc, stdin=answer)
        assert refused.returncode == 1 and "CANCELED" in refused.stderr, refused.stderr
        with stack.requester.client() as client:
            assert client.get_job(job["job_id"])["status"] == "running"
    refused_json = raw(stack, "client", "cancel", job["job_id"], "--rpc", rpc, "--json")
    assert json.loads(refused_json.stdout)["error"]["code"] == "CANCELED"
    confirmed = raw(stack, "client", "cancel", "--job-id", job["job_id"], "--rpc", rpc,
                    "--json", stdin="y\n")  # fmt: skip
    assert confirmed.returncode == 0, confirmed.stderr
    assert json.loads(confirmed.stdout)["status"] in ("canceling", "canceled")
    with stack.requester.client() as client:
        wait_status(client, job["job_id"], {"canceled"})
    deleted = raw(stack, "client", "delete", job["job_id"], "--yes", "--rpc", rpc, "--json")
    assert json.loads(deleted.stdout)["deleted"] is True


def test_global_options_before_or_after_the_verb(stack: Devstack, finished: dict[str, Any]) -> None:
    rpc, token, job_id = stack.requester.rpc_url, stack.requester.token or "", finished["job_id"]
    for args in (
        ["client", "--rpc", rpc, "--token", token, "--json", "status", job_id],
        ["client", "status", job_id, "--rpc", rpc, "--token", token, "--json"],
        ["client", "--json", "status", "--job-id", job_id, f"--rpc={rpc}", "--token", token],
    ):
        run = raw(stack, *args, token=False)
        assert run.returncode == 0, f"{args}: {run.stderr}"
        assert json.loads(run.stdout)["job_id"] == job_id
    wrong = raw(stack, "client", "status", job_id, "--rpc", rpc, "--token", "nope", token=False)
    assert wrong.returncode == 1 and "UNAUTHORIZED" in wrong.stderr
    both = meshrun(stack, "status", job_id, "--job-id", "other", ok=False)
    assert both.returncode == 2


def test_json_on_export_jobs_alias_and_models(
    stack: Devstack, finished: dict[str, Any], tmp_path: Path
) -> None:
    exported = as_json(meshrun(stack, "export", "--format", "csv", "--json"))
    assert exported["format"] == "csv" and finished["job_id"] in exported["content"]
    to_file = as_json(meshrun(stack, "export", "--output", str(tmp_path / "j.json"), "--json"))
    assert to_file["count"] >= 1 and (tmp_path / "j.json").exists()
    jobs = as_json(meshrun(stack, "jobs", "--json"))
    assert finished["job_id"] in {j["job_id"] for j in jobs["jobs"]}
    (tmp_path / "m.onnx").write_bytes(build_mlp(seed=12))
    added = as_json(meshrun(stack, "model", "add", "mlp:v1", str(tmp_path / "m.onnx"), "--json"))
    again = as_json(meshrun(stack, "model", "add", "mlp-alias", added["cid"], "--json"))
    assert again["cid"] == added["cid"]
    listed = as_json(meshrun(stack, "model", "list", "--json"))
    assert {"mlp:v1", "mlp-alias"} <= {m["name"] for m in listed["models"]}
    assert "mlp:v1" in meshrun(stack, "model", "list").stdout


def test_get_takes_a_job_id(stack: Devstack, finished: dict[str, Any], tmp_path: Path) -> None:
    job_id = finished["job_id"]
    got = as_json(meshrun(stack, "get", job_id, "--output", str(tmp_path / "r"), "--json"))
    assert got["cid"] == finished["result_cid"] and got["job_id"] == job_id
    assert (tmp_path / "r" / "outputs" / "y.npy").exists()
    details = meshrun(stack, "get", "--job-id", job_id)
    assert job_id in details.stdout and "completed" in details.stdout
    by_cid = as_json(meshrun(stack, "get", finished["result_cid"], "-o", str(tmp_path / "c"),
                             "--json"))  # fmt: skip
    assert by_cid["cid"] == finished["result_cid"] and "job_id" not in by_cid


def test_watch_prints_a_line_per_change_without_a_terminal(stack: Devstack) -> None:
    with stack.requester.client() as client:
        job = submit_spin(client, seconds=2, timeout_seconds=60)
    run = meshrun(stack, "watch", job["job_id"])
    changes = [line for line in run.stdout.splitlines() if line.split()[1:2] == [job["job_id"]]]
    assert len(changes) >= 2, run.stdout
    assert "completed" in changes[-1] and len(set(changes)) == len(changes)


def test_prompt_submission_is_refused_clearly(stack: Devstack) -> None:
    run = meshrun(stack, "submit", "Write a story", "--model", "llama3.2", "--max-tokens", "5",
                  "--json", ok=False)  # fmt: skip
    assert run.returncode == 1
    error = as_json(run)["error"]
    assert error["code"] == "UNSUPPORTED" and error["details"]["kind"] == "prompt"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_devstack_stops_its_nodes_on_signals(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "devstack", "--compute", "1", "--json",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        text = ""
        while not text.rstrip().endswith("}") or text.count("{") != text.count("}"):
            line = proc.stdout.readline()
            assert line, "devstack exited before printing its manifest"
            text += line
        pids = [n["pid"] for n in json.loads(text)["nodes"]]
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()

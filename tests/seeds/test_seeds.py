"""The five seed documents, request by request and CLI line by CLI line, against a devstack.

Every request and CLI line is the seed's own (tests/seeds/fixtures/, copied
verbatim); only the host is swapped for the devstack's and, where the seed leaves
an id out (`--job-id`, `<job_id>`, `{job_id}`), a real one is filled in. Each
answer is checked against the seed's documented shape, or, where meshrun cannot
do what the seed asks (prompt jobs, S3 destinations, Docker engines), against a
clear, stable error code.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crypto.keys import Identity
from node.api.seeds import canonical_payload
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from tests.node.lifecycle_helpers import submit_spin, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

FIXTURES = Path(__file__).parent / "fixtures"
TERMINAL = {"completed", "failed", "timeout", "canceled"}
ISO_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"


def fixture(name: str) -> Any:
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else text


def lines(name: str) -> list[str]:
    return [line for line in fixture(name).splitlines() if line.strip()]


def is_iso(value: Any) -> bool:
    import re

    return isinstance(value, str) and re.match(ISO_Z, value) is not None


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("seeds"), compute=1, bid_window=0.5) as devstack:
        yield devstack


@pytest.fixture(scope="module")
def base(stack: Devstack) -> str:
    return stack.requester.rpc_url.removesuffix("/rpc")


@pytest.fixture(scope="module")
def token(stack: Devstack) -> str:
    assert stack.requester.token
    return stack.requester.token


@pytest.fixture(scope="module")
def http(base: str, token: str) -> Iterator[httpx.Client]:
    """A client that sends the key as AITBC's seed does: `X-Api-Key`."""
    with httpx.Client(base_url=base, headers={"X-Api-Key": token}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stored(stack: Devstack) -> dict[str, str]:
    """The seed's model name `gpt2` bound, in the node's catalog, to a small ONNX MLP,
    and an .npz inputs bundle (the seed's "file_id")."""
    with stack.requester.client() as client:
        model = client.call(
            "model.add", name="gpt2", data_b64=base64.b64encode(build_mlp(seed=3)).decode()
        )
        inputs_cid = client.storage_add(encode_tensors(make_inputs(batch=4, seed=1)))
    return {"model_cid": model["cid"], "inputs_cid": inputs_cid}


@pytest.fixture(scope="module")
def done(http: httpx.Client, stored: dict[str, str], stack: Devstack) -> dict[str, Any]:
    """AITBC 003's submit body with its placeholders filled in: a local destination,
    the inputs' CID as the file id, and no GPU (this machine has none)."""
    body = fixture("003_submit.json")
    body["input"] = stored["inputs_cid"]
    body["output_config"]["destination"] = "local"
    body["requirements"] = {}
    body["timeout_seconds"] = 120
    answer = http.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    job = answer.json()
    with stack.requester.client() as client:
        client.wait_for_job(job["job_id"], timeout=90)
    final = http.get(f"/v1/jobs/{job['job_id']}").json()
    assert final["status"] == "completed", final
    return dict(final)


# ------------------------------------------------------------------ AITBC 003


def test_003_submit_verbatim_body_is_refused_clearly(http: httpx.Client) -> None:
    answer = http.post("/v1/jobs", json=fixture("003_submit.json"))
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "UNSUPPORTED"  # "local or s3://bucket/path": not a local destination
    assert "destination" in body["message"]


def test_003_submit_status_list_cancel_history(
    http: httpx.Client, stored: dict[str, str], done: dict[str, Any]
) -> None:
    shapes = fixture("003_responses.json")
    body = fixture("003_submit.json")
    body["input"] = stored["inputs_cid"]
    body["output_config"]["destination"] = "local"
    answer = http.post("/v1/jobs", json=body)  # gpu_type v100: no executor here has one
    assert answer.status_code == 201, answer.text
    submitted = answer.json()
    assert set(shapes["submit"]) <= set(submitted)
    job_id = submitted["job_id"]

    status = http.get(f"/v1/jobs/{job_id}").json()
    assert set(shapes["status"]) <= set(status)
    assert is_iso(status["created_at"]) and isinstance(status["created_at_unix"], float)
    assert status["model"] == "gpt2" and status["result"] is None

    listing = http.get("/v1/jobs?status=running&limit=10")
    assert listing.status_code == 200
    assert set(shapes["list"]) <= set(listing.json())
    everything = http.get("/v1/jobs?limit=10").json()
    assert {"job_id", "status", "model"} <= set(everything["jobs"][0])

    canceled = http.delete(f"/v1/jobs/{job_id}")
    assert canceled.status_code == 200 and canceled.json()["status"] in ("canceling", "canceled")

    history = http.get("/v1/jobs/history?from=2026-01-01&to=2026-01-31")
    assert history.status_code == 200 and set(shapes["list"]) <= set(history.json())

    completed = http.get(f"/v1/jobs/{done['job_id']}").json()
    assert completed["miner_id"] == completed["executor"] and completed["miner_id"]
    assert completed["result"] == completed["result_cid"] and completed["result"]
    assert is_iso(completed["started_at"]) and is_iso(completed["completed_at"])
    download = http.get(f"/v1/jobs/{done['job_id']}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"


def test_003_unknown_params_and_prompts_are_not_ignored(
    http: httpx.Client, stored: dict[str, str]
) -> None:
    body = {"model": "gpt2", "input": stored["inputs_cid"], "params": {"colour": "blue"}}
    unknown = http.post("/v1/jobs", json=body)
    assert unknown.status_code == 422 and unknown.json()["error"] == "INVALID_PARAMS"
    assert unknown.json()["details"]["unknown"] == ["colour"]
    missing = http.post("/v1/jobs", json={"model": "no-such-model", "input": stored["inputs_cid"]})
    assert missing.status_code == 404 and missing.json()["error"] == "MODEL_NOT_FOUND"
    s3 = {
        "model": "gpt2",
        "input": stored["inputs_cid"],
        "output_config": {"destination": "s3://b/p"},
    }
    assert http.post("/v1/jobs", json=s3).json()["error"] == "UNSUPPORTED"


# ------------------------------------------------------------------ AITBC 000


def test_000_api_with_x_api_key(http: httpx.Client, base: str, done: dict[str, Any]) -> None:
    requests_ = lines("000_api.txt")
    get_line, download_line = requests_[0], requests_[1]
    url = get_line.split()[1].replace("http://localhost:8000", base)
    got = httpx.get(
        url.format(job_id=done["job_id"]), headers={"X-Api-Key": http.headers["x-api-key"]}
    )
    assert got.status_code == 200
    assert {"job_id", "status", "progress", "miner_id", "created_at", "started_at"} <= set(
        got.json()
    )
    assert "estimated_completion" in got.json()
    url = download_line.split()[1].replace("http://localhost:8000", base)
    zipped = httpx.get(
        url.format(job_id=done["job_id"]), headers={"X-Api-Key": http.headers["x-api-key"]}
    )
    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
    wrong = httpx.get(url.format(job_id=done["job_id"]), headers={"X-Api-Key": "your-key"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "UNAUTHORIZED"


def cli(
    stack: Devstack, line: str, job_id: str | None, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a seed CLI line as `meshrun client …`, with --rpc after the verb."""
    words = shlex.split(line)
    assert words[0] in ("aitbc", "./aitbc-cli.sh"), line
    words = words[1:]
    if words[0] != "client":
        words.insert(0, "client")
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "<job_id>":
            assert job_id
            out.append(job_id)
            continue
        out.append(word)
        if word == "--job-id" and (i + 1 == len(words) or words[i + 1].startswith("--")):
            assert job_id
            out.append(job_id)
    return subprocess.run(
        [sys.executable, "-m", "cli", *out, "--rpc", stack.requester.rpc_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        env={**os.environ, "MESHRUN_TOKEN": stack.requester.token or "", "PYTHONPATH": os.getcwd()},
    )


def test_000_cli_lines(stack: Devstack, done: dict[str, Any], tmp_path: Path, token: str) -> None:
    job_id = done["job_id"]
    seen: list[str] = []
    for line in lines("000_cli.txt"):
        if line.startswith("sha256sum"):
            check = subprocess.run(
                shlex.split(line), cwd=tmp_path / f"job_{job_id}", capture_output=True, text=True,
                check=False,
            )  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
            seen.append(line)
            continue
        if "cancel" in line or "delete" in line:
            continue  # below, on a job of their own
        run = cli(stack, line, job_id, tmp_path)
        assert run.returncode == 0, f"{line}\n{run.stdout}{run.stderr}"
        seen.append(line)
        if " status " in line or " get " in line:
            assert job_id in run.stdout and "completed" in run.stdout
        if " watch " in line:
            assert "completed" in run.stdout
        if " share " in line:
            assert "/ipfs/" in run.stdout or "http" in run.stdout
    assert (tmp_path / "results" / "output.json").exists()
    assert (tmp_path / f"job_{job_id}" / "output.sha256").exists()
    assert json.loads((tmp_path / "jobs.json").read_text())
    assert (tmp_path / "jobs.csv").read_text().startswith("job_id,")

    with stack.requester.client() as client:
        spin = submit_spin(client, seconds=30, timeout_seconds=120)
        wait_status(client, spin["job_id"], {"running"})
    cancel_lines = [line for line in lines("000_cli.txt") if "cancel" in line]
    asked = cli(stack, cancel_lines[0], spin["job_id"], tmp_path)  # no terminal, no answer
    assert asked.returncode == 1 and "CANCELED" in asked.stderr
    with stack.requester.client() as client:
        assert client.get_job(spin["job_id"])["status"] == "running"
    forced = cli(stack, cancel_lines[1], spin["job_id"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    with stack.requester.client() as client:
        wait_status(client, spin["job_id"], {"canceled"})
    delete = next(line for line in lines("000_cli.txt") if "delete" in line)
    refused = cli(stack, delete, spin["job_id"], tmp_path, stdin="n\n")
    assert refused.returncode == 1
    deleted = cli(stack, delete, spin["job_id"], tmp_path, stdin="y\n")
    assert deleted.returncode == 0, deleted.stderr


# ------------------------------------------------------------------ AITBC 001


def test_001_cli_lines(stack: Devstack, tmp_path: Path) -> None:
    seed = lines("001_cli.txt")
    for line in seed[:3]:  # prompt jobs: refused, clearly
        run = cli(stack, line, None, tmp_path)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "UNSUPPORTED" in run.stderr and "prompt" in run.stderr
    with stack.requester.client() as client:
        spin = submit_spin(client, seconds=30, timeout_seconds=120)
        wait_status(client, spin["job_id"], {"running"})
    status = cli(stack, seed[3], spin["job_id"], tmp_path)
    assert status.returncode == 0 and "running" in status.stdout
    jobs = cli(stack, seed[4], None, tmp_path)
    assert jobs.returncode == 0 and "job(s)" in jobs.stdout
    cancel = cli(stack, seed[5], spin["job_id"], tmp_path, stdin="y\n")
    assert cancel.returncode == 0, cancel.stderr


def test_001_api_and_sdk(http: httpx.Client, base: str, stack: Devstack) -> None:
    requests_ = lines("001_api.txt")
    submit_url = requests_[0].split()[1].replace("https://aitbc.bubuit.net", base)
    refused = http.post(submit_url, json=fixture("001_submit.json"))
    assert refused.status_code == 422 and refused.json()["error"] == "UNSUPPORTED"
    assert refused.json()["details"]["kind"] == "prompt"
    with stack.requester.client() as client:
        with pytest.raises(Exception) as caught:
            client.submit_job(**fixture("001_sdk_params.json"))
        assert getattr(caught.value, "code", None) == "UNSUPPORTED"
        spin = submit_spin(client, seconds=30, timeout_seconds=120)
    job_id = spin["job_id"]
    got = http.get(requests_[1].split()[1].replace("https://aitbc.bubuit.net", base).replace(
        "<job_id>", job_id))  # fmt: skip
    assert got.status_code == 200 and got.json()["job_id"] == job_id
    cancel_url = requests_[2].split()[1].replace("https://aitbc.bubuit.net", base)
    canceled = http.post(cancel_url.replace("<job_id>", job_id))
    assert canceled.status_code == 200 and canceled.json()["status"] in ("canceling", "canceled")


# --------------------------------------------------------------- TensorOne 002


def test_002_status_routes(base: str, token: str, done: dict[str, Any]) -> None:
    seed = fixture("002_requests.json")
    swap = seed["basic"].split("/v2/")[0]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    missing = httpx.get(seed["basic"].replace(swap, base), headers=headers)
    assert missing.status_code == 404
    body = missing.json()
    assert set(seed["not_found"]) <= set(body) and body["error"] == "JOB_NOT_FOUND"
    assert body["details"]["jobId"] == "job_1234567890abcdef"
    assert body["details"]["possibleReasons"]

    job_id = done["job_id"]
    real = seed["detailed"].replace(swap, base).replace("job_1234567890abcdef", job_id)
    detailed = httpx.get(real, headers={"Authorization": token})  # the seed's bare key form
    assert detailed.status_code == 200, detailed.text
    status = detailed.json()
    assert set(seed["completed_keys"]) <= set(status) and status["status"] == "completed"
    assert set(seed["output_keys"]) <= set(status["output"])
    assert set(seed["resources_keys"]) <= set(status["resources"])
    assert is_iso(status["createdAt"]) and is_iso(status["completedAt"])
    assert "logs" in status and "metrics" in status
    summary = httpx.get(real.split("?")[0] + "?format=summary", headers=headers).json()
    assert list(summary) == seed["summary_keys"] and summary["result"] == done["result_cid"]
    bad = httpx.get(real.split("?")[0] + "?include=secrets", headers=headers)
    assert bad.status_code == 422 and bad.json()["error"] == "INVALID_PARAMS"

    batch_url = seed["batch_url"].replace(swap, base)
    batch = httpx.post(batch_url, headers=headers, json=seed["batch_body"])
    assert batch.status_code == 200
    assert [s["jobId"] for s in batch.json()] == seed["batch_body"]["jobIds"]
    assert all(s["error"] == "JOB_NOT_FOUND" for s in batch.json())
    mixed = {**seed["batch_body"], "jobIds": [job_id, "job_2345678901bcdefg"]}
    statuses = httpx.post(batch_url, headers=headers, json=mixed).json()
    assert statuses[0]["status"] == "completed" and statuses[1]["error"] == "JOB_NOT_FOUND"

    with httpx.stream(
        "GET",
        seed["stream"].replace(swap, base).replace("job_1234567890abcdef", job_id),
        headers={**headers, "Accept": "text/event-stream"},
        timeout=30,
    ) as stream:
        assert stream.status_code == 200
        text = "".join(stream.iter_text())
    assert '"Snapshot"' in text and "completed" in text


def test_002_running_job_states(base: str, token: str, stack: Devstack) -> None:
    seed = fixture("002_requests.json")
    headers = {"Authorization": f"Bearer {token}"}
    with stack.requester.client() as client:
        spin = submit_spin(client, seconds=30, timeout_seconds=120)
        wait_status(client, spin["job_id"], {"running"})
        running = httpx.get(f"{base}/v2/jobs/{spin['job_id']}/status", headers=headers).json()
        assert set(seed["running_keys"]) <= set(running)
        assert running["status"] in seed["states"] and running["status"] == "running"
        client.call("job.cancel", job_id=spin["job_id"])
        wait_status(client, spin["job_id"], {"canceled"})
    canceled = httpx.get(f"{base}/v2/jobs/{spin['job_id']}/status", headers=headers).json()
    assert canceled["status"] == "cancelled"


# ---------------------------------------------------------------- Bacalhau 004


def signed(identity: Identity, field: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "client_public_key": base64.b64encode(identity.public_key).decode(),
        "signature": base64.b64encode(identity.sign(canonical_payload(payload))).decode(),
        field: payload,
    }


def test_004_requester_routes(http: httpx.Client, stored: dict[str, str]) -> None:
    seed = fixture("004_requests.json")
    me = Identity.generate()
    payload = {
        "ClientID": me.peer_id,
        "APIVersion": "V1beta1",
        "Spec": {
            "Engine": "ONNX",
            "Model": "gpt2",
            "Inputs": [{"StorageSource": "IPFS", "CID": stored["inputs_cid"]}],
            "Timeout": 120,
        },
    }
    submitted = http.post("/requester/submit", json=signed(me, "job_create_payload", payload))
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()["job"]
    assert job["Metadata"]["ClientID"] == me.peer_id
    job_id = job["Metadata"]["ID"]

    forged = signed(me, "job_create_payload", payload)
    forged["job_create_payload"]["Spec"]["Timeout"] = 5  # changed after signing
    refused = http.post("/requester/submit", json=forged)
    assert refused.status_code == 422 and refused.json()["error"] == "SIGNATURE_INVALID"
    docker = {**payload, "Spec": {"Engine": "Docker", "Docker": {"Image": "ubuntu"}}}
    engine = http.post("/requester/submit", json=signed(me, "job_create_payload", docker))
    assert engine.status_code == 422 and engine.json()["error"] == "UNSUPPORTED"
    empty = http.post("/requester/submit", json=seed["example_body"])
    assert empty.status_code == 422 and empty.json()["error"] == "INVALID_PARAMS"

    deadline = time.monotonic() + 60
    while True:
        state = http.post("/requester/states", json={"client_id": me.peer_id, "job_id": job_id})
        assert state.status_code == 200, state.text
        if state.json()["state"]["State"] == "Completed":
            break
        assert time.monotonic() < deadline, state.json()
        time.sleep(0.5)
    nodes = state.json()["state"]["Nodes"]
    shard = next(iter(nodes.values()))["Shards"]["0"]
    assert set(seed["shard_example"]) <= set(shard)
    assert set(seed["shard_example"]["RunOutput"]) <= set(shard["RunOutput"])
    assert shard["RunOutput"]["exitCode"] == 0 and shard["VerificationResult"]["Result"] is True

    results = http.post("/requester/results", json={"job_id": job_id}).json()["results"]
    example = seed["results_example"]["results"][0]
    assert set(example) <= set(results[0]) and set(example["Data"]) <= set(results[0]["Data"])
    assert results[0]["Data"]["StorageSource"] == "IPFS"

    events = http.post("/requester/events", json={"job_id": job_id}).json()["events"]
    names = {e["EventName"] for e in events}
    assert {"Created", "Bid", "BidAccepted", "ResultsAccepted"} <= names

    listed = http.post("/requester/list", json={"id": job_id}).json()["jobs"]
    assert listed[0]["Metadata"]["ID"] == job_id
    assert http.post("/requester/list", json=seed["example_body"]).status_code == 200
    refused = http.post("/requester/list", json={"client_id": "someone"})
    assert refused.status_code == 422 and refused.json()["error"] == "UNSUPPORTED"
    every = http.post("/requester/list", json={"client_id": "x", "return_all": True}).json()
    assert job_id in [j["Metadata"]["ID"] for j in every["jobs"]]
    assert http.post("/requester/list", json={"sort_by": "size"}).status_code == 422
    gone = http.post("/requester/cancel", json={"job_id": job_id})
    assert gone.status_code == 409 and gone.json()["error"] == "ILLEGAL_TRANSITION"
    assert http.post("/requester/cancel", json=seed["example_body"]).status_code == 422


def test_openapi_and_unauthenticated(base: str) -> None:
    for path in ("/v2/jobs/x/status", "/requester/list", "/api/v1/jobs/x"):
        method = "POST" if path.startswith("/requester") else "GET"
        refused = httpx.request(method, base + path, json={})
        assert refused.status_code == 401


def test_000_websocket_with_x_api_key(base: str, token: str, done: dict[str, Any]) -> None:
    import trio
    from trio_websocket import open_websocket_url

    url = (
        lines("000_api.txt")[2]
        .split()[1]
        .replace("ws://localhost:8000", base.replace("http", "ws"))
    )

    async def main() -> list[dict[str, Any]]:
        async with open_websocket_url(url, extra_headers=[(b"x-api-key", token.encode())]) as ws:
            await ws.send_message(json.dumps({"action": "subscribe", "job_ids": [done["job_id"]]}))
            with trio.fail_after(20):
                return [json.loads(await ws.get_message()) for _ in range(2)]

    messages = trio.run(main)
    assert messages[0]["kind"] == "subscribed"
    assert messages[1]["kind"] == "event" and messages[1]["status"] == "completed"

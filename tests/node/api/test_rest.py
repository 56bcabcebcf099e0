"""The REST shapes (/v1/jobs…) and the SSE status stream against a real node:
each route is the JSON-RPC method behind it, with its errors mapped to HTTP."""

from __future__ import annotations

import io
import subprocess
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.api.rest import HTTP_STATUS, build_zip, http_status, parse_time
from node.client import AsyncClient, Client
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from protocol.errors import ErrorCode, MeshrunError
from protocol.package import is_meta
from storage.blockstore import MemoryBlockstore
from storage.cid import Cid

TERMINAL = {"completed", "failed", "timeout", "canceled"}


# ----------------------------------------------------------------- no node needed


def test_every_error_code_has_an_http_status() -> None:
    for code in ErrorCode:
        assert 400 <= http_status(code) <= 599
    assert http_status(ErrorCode.UNAUTHORIZED) == 401
    assert http_status(ErrorCode.RATE_LIMITED) == 429
    assert http_status(ErrorCode.JOB_NOT_FOUND) == 404
    assert http_status(ErrorCode.INVALID_PARAMS) == 422
    assert http_status(ErrorCode.PARSE_ERROR) == 400
    assert http_status(ErrorCode.INTERNAL_ERROR) == 500
    assert all(status < 500 for code, status in HTTP_STATUS.items() if code.name.startswith("INV"))


def test_parse_time_takes_iso_and_unix() -> None:
    assert parse_time("from", "1700000000") == 1700000000.0
    assert parse_time("from", "2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_time("from", "2023-11-14T23:13:20+01:00") == 1700000000.0
    assert parse_time("from", "2023-11-14") == datetime(2023, 11, 14, tzinfo=UTC).timestamp()
    for bad in ("yesterday", "nan", "inf", ""):
        with pytest.raises(MeshrunError) as caught:
            parse_time("from", bad)
        assert caught.value.code is ErrorCode.INVALID_PARAMS


def test_zip_is_deterministic_and_checksummed() -> None:
    files = {"output.json": b"{}", "outputs/y.npy": b"\x93NUMPY", "logs/stdout.log": b""}
    first = build_zip(files, "bafy-result")
    assert first == build_zip(dict(reversed(list(files.items()))), "bafy-result")
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        sums = archive.read("output.sha256").decode().splitlines()
    assert names == ["logs/stdout.log", "output.json", "outputs/y.npy", "output.sha256"]
    assert len(sums) == 3 and all("  " in line for line in sums)


# ------------------------------------------------------------------- a real node


@pytest.fixture(scope="module")
def node(api_stack: Devstack) -> Devstack:
    return api_stack


@pytest.fixture()
def http(node: Devstack) -> Iterator[httpx.Client]:
    base = node.requester.rpc_url.removesuffix("/rpc")
    headers = {"Authorization": f"Bearer {node.requester.token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stored(node: Devstack) -> dict[str, str]:
    with node.requester.client() as client:
        return {
            "model_cid": client.storage_add(build_mlp(seed=5)),
            "inputs_cid": client.storage_add(encode_tensors(make_inputs(batch=3, seed=5))),
        }


@pytest.fixture(scope="module")
def finished(node: Devstack, stored: dict[str, str]) -> dict[str, Any]:
    """One job submitted over REST and run to the end."""
    base = node.requester.rpc_url.removesuffix("/rpc")
    headers = {"Authorization": f"Bearer {node.requester.token}"}
    submitted = httpx.post(f"{base}/v1/jobs", json=stored, headers=headers, timeout=30)
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/jobs/{job['job_id']}"
    with node.requester.client() as client:
        done = client.wait_for_job(job["job_id"], timeout=60)
    assert done["status"] == "completed", done
    return done


def live(test: Any) -> Any:
    """Marks a test that needs the devstack's node processes."""
    return pytest.mark.multiprocess(pytest.mark.slow(test))


@live
def test_submit_get_and_list(http: httpx.Client, finished: dict[str, Any]) -> None:
    job_id = finished["job_id"]
    got = http.get(f"/v1/jobs/{job_id}")
    assert got.status_code == 200 and got.json()["result_cid"] == finished["result_cid"]
    detailed = http.get(f"/v1/jobs/{job_id}", params={"include": "logs,metrics"})
    assert detailed.status_code == 200 and "logs" in detailed.json()
    page = http.get("/v1/jobs", params={"status": "completed", "limit": 1})
    assert page.status_code == 200
    body = page.json()
    assert len(body["jobs"]) == 1 and body["jobs"][0]["status"] == "completed"
    if body.get("has_more"):
        more = http.get("/v1/jobs", params={"limit": 1, "cursor": body["next_cursor"]})
        assert more.status_code == 200


@live
def test_history_takes_iso_and_unix_times(http: httpx.Client, finished: dict[str, Any]) -> None:
    created = finished["created_at"]
    iso = datetime.fromtimestamp(created - 60, tz=UTC).isoformat()
    hits = http.get("/v1/jobs/history", params={"from": iso, "to": str(created + 60)})
    assert hits.status_code == 200
    assert finished["job_id"] in {j["job_id"] for j in hits.json()["jobs"]}
    later = http.get("/v1/jobs/history", params={"from": str(time.time() + 3600)})
    assert later.status_code == 200 and later.json()["jobs"] == []
    bad = http.get("/v1/jobs/history", params={"from": "last tuesday"})
    assert bad.status_code == 422 and bad.json()["error"] == "INVALID_PARAMS"


@live
def test_batch_status(http: httpx.Client, finished: dict[str, Any]) -> None:
    batch = http.post("/v1/jobs/status/batch", json={"job_ids": [finished["job_id"], "nope"]})
    assert batch.status_code == 200
    assert [j["job_id"] for j in batch.json()["jobs"]] == [finished["job_id"]]
    assert batch.json()["missing"] == ["nope"]
    empty = http.post("/v1/jobs/status/batch", json={"job_ids": []})
    assert empty.status_code == 422


@live
def test_download_is_a_zip_sha256sum_accepts(
    http: httpx.Client, finished: dict[str, Any], tmp_path: Path
) -> None:
    response = http.get(f"/v1/jobs/{finished['job_id']}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["x-meshrun-result-cid"] == finished["result_cid"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path)
        names = archive.namelist()
        files = {n: archive.read(n) for n in names if not is_meta(n)}
    assert "meshrun/spec.cbor" in names  # the proofs `meshrun client verify result.zip` reads
    check = subprocess.run(
        ["sha256sum", "--strict", "-c", "output.sha256"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "outputs/y.npy: OK" in check.stdout
    # Beside those, the zip holds exactly the result package: it re-hashes to the result CID.
    assert MemoryBlockstore().add_tree(files) == Cid.decode(finished["result_cid"])


@live
def test_errors_are_one_shape_with_mapped_statuses(
    http: httpx.Client, finished: dict[str, Any], stored: dict[str, str]
) -> None:
    cases = [
        (http.get("/v1/jobs/no-such-job"), 404, "JOB_NOT_FOUND"),
        (http.get("/v1/jobs", params={"limit": "many"}), 422, "INVALID_PARAMS"),
        (http.get("/v1/jobs", params={"colour": "blue"}), 422, "INVALID_PARAMS"),
        (http.post("/v1/jobs", json={**stored, "model_cid": "not-a-cid"}), 422, "INVALID_CID"),
        (http.post("/v1/jobs", content=b"{nope", headers={}), 400, "PARSE_ERROR"),
        (http.post("/v1/jobs", json=[stored]), 400, "INVALID_REQUEST"),
        (http.delete(f"/v1/jobs/{finished['job_id']}"), 409, "ILLEGAL_TRANSITION"),
        (http.delete("/v1/jobs/no-such-job"), 404, "JOB_NOT_FOUND"),
        (http.get("/v1/jobs/no-such-job/download"), 404, "JOB_NOT_FOUND"),
        (http.get("/v1/nothing/here"), 404, "METHOD_NOT_FOUND"),
        (http.get("/v1/jobs/"), 404, "METHOD_NOT_FOUND"),
        (http.put("/v1/jobs"), 405, "INVALID_REQUEST"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = response.json()
        assert set(body) == {"error", "message", "details"}
        assert body["error"] == code, body
    assert http.get("/health").status_code == 200  # and the node keeps serving


@live
def test_sse_stream_follows_a_job_to_its_end(node: Devstack, stored: dict[str, str]) -> None:
    with node.requester.client() as client:
        job = client.submit_job(stored["model_cid"], stored["inputs_cid"])
        events = list(client.stream_status(job["job_id"], timeout=60))
    assert events[0]["type"] == "Snapshot" and events[0]["data"]["job"]["job_id"] == job["job_id"]
    assert events[-1]["status"] in TERMINAL
    assert all(e["status"] not in TERMINAL for e in events[:-1])
    live_events = [e for e in events if e["type"] != "Snapshot"]
    seqs = [e["seq"] for e in live_events]
    assert seqs == sorted(set(seqs))
    assert live_events[-1]["type"] == "Completed"
    # A finished job's stream is one snapshot, and ends.
    with node.requester.client() as client:
        again = list(client.stream_status(job["job_id"], timeout=10))
    assert [e["type"] for e in again] == ["Snapshot"] and again[0]["status"] == "completed"


@live
async def test_async_stream_and_last_event_id_replay(
    node: Devstack, stored: dict[str, str], finished: dict[str, Any]
) -> None:
    async with AsyncClient(node.requester.rpc_url, node.requester.token) as client:
        job = await client.submit_job(stored["model_cid"], stored["inputs_cid"])
        events = [e async for e in client.stream_status(job["job_id"], timeout=60)]
    assert events[0]["type"] == "Snapshot" and events[-1]["status"] == "completed"

    # Resuming with Last-Event-ID replays what came after it, then the snapshot.
    base = node.requester.rpc_url.removesuffix("/rpc")
    headers = {"Authorization": f"Bearer {node.requester.token}", "Last-Event-ID": "0"}
    with Client(node.requester.rpc_url, node.requester.token) as sync:
        logged = sync.call("job.events", job_id=finished["job_id"])["events"]
    text = httpx.get(
        f"{base}/v1/jobs/{finished['job_id']}/status/stream", headers=headers, timeout=30
    ).text
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [e["seq"] for e in logged]
    assert text.rstrip().splitlines()[-1].startswith("data: ")
    assert '"type":"Snapshot"' in text.rstrip().splitlines()[-1]


@live
def test_stream_of_an_unknown_job_is_a_404(http: httpx.Client) -> None:
    response = http.get("/v1/jobs/no-such-job/status/stream")
    assert response.status_code == 404 and response.json()["error"] == "JOB_NOT_FOUND"
    with (
        pytest.raises(MeshrunError) as caught,
        Client(str(http.base_url) + "/rpc", http.headers["authorization"].split()[1]) as client,
    ):
        list(client.stream_status("no-such-job"))
    assert caught.value.code is ErrorCode.JOB_NOT_FOUND

"""A downloaded result proves itself with no node: a real job on the shared devstack,
downloaded by the CLI to a directory, a zip and over REST, then verified with the node
out of reach; one flipped byte fails it, naming the file. Verification policies reach
the signed spec from the CLI, the SDK and REST, and a wrong one is refused clearly."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

import cli
from crypto.envelope import open_envelope
from node.client import Client, RpcError
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from node.service import NodeConfig
from protocol.errors import ErrorCode
from protocol.messages import JobSpec
from protocol.package import INDEX_PATH, SPEC_PATH

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

NOWHERE = "http://127.0.0.1:9/rpc"  # nothing listens: offline checks must not need a node


def meshrun(stack: Devstack, *args: str, rpc: str | None = None) -> Result:
    return CliRunner().invoke(
        cli.app,
        ["client", args[0], "--rpc", rpc or stack.requester.rpc_url, *args[1:]],
        env={"MESHRUN_TOKEN": stack.requester.token or ""},
    )


def verify_offline(stack: Devstack, target: Path) -> tuple[int, dict[str, Any]]:
    run = meshrun(stack, "verify", str(target), "--json", rpc=NOWHERE)
    return run.exit_code, json.loads(run.output)


def failing(report: dict[str, Any]) -> dict[str, str]:
    return {c["check"]: c["detail"] for c in report["checks"] if not c["ok"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("offline-inputs")
    (work / "m.onnx").write_bytes(build_mlp(seed=21))
    (work / "x.npz").write_bytes(encode_tensors(make_inputs(batch=4, seed=21)))
    return work / "m.onnx", work / "x.npz"


@pytest.fixture(scope="module")
def finished(api_stack: Devstack, inputs: tuple[Path, Path]) -> dict[str, Any]:
    model, data = inputs
    run = meshrun(api_stack, "submit", str(model), "--input", str(data), "--wait", "--json",
                  "--verify", "receipt")  # fmt: skip
    assert run.exit_code == 0, run.output
    job = json.loads(run.output)
    assert job["status"] == "completed"
    return dict(job)


@pytest.fixture()
def client(api_stack: Devstack) -> Iterator[Client]:
    with api_stack.requester.client(timeout=60) as c:
        yield c


def test_a_downloaded_directory_verifies_offline(
    api_stack: Devstack, finished: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "result"
    run = meshrun(api_stack, "download", finished["job_id"], "-o", str(folder), "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["verifiable_offline"] is True
    assert (folder / SPEC_PATH).is_file()
    assert (folder / "meshrun" / "receipts" / f"{finished['executor']}.cbor").is_file()
    assert json.loads((folder / INDEX_PATH).read_text())["job_id"] == finished["job_id"]

    code, report = verify_offline(api_stack, folder)
    assert code == 0 and report["verified"] is True, failing(report)
    assert report["job_id"] == finished["job_id"]
    human = meshrun(api_stack, "verify", str(folder), rpc=NOWHERE)
    assert human.exit_code == 0 and human.output.rstrip().endswith("verified")

    npy = folder / "outputs" / "y.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0x01
    npy.write_bytes(bytes(data))
    code, report = verify_offline(api_stack, folder)
    assert code == 1 and report["verified"] is False
    bad = failing(report)
    assert "sha256 outputs/y.npy" in bad and "result re-hashes to its CID" in bad
    assert "outputs/y.npy" in bad["files match output.sha256"]
    human = meshrun(api_stack, "verify", str(folder), rpc=NOWHERE)
    assert human.exit_code == 1 and "NOT verified" in human.output

    # Another job's package is not mixed into this one's directory.
    other = tmp_path / "other"
    other.mkdir()
    (other / "stray.txt").write_text("x")
    mixed = meshrun(api_stack, "download", finished["job_id"], "-o", str(other), "--json")
    assert mixed.exit_code == 2
    assert json.loads(mixed.output)["error"]["code"] == "INVALID_PARAMS"


def test_a_downloaded_zip_verifies_offline(
    api_stack: Devstack, finished: dict[str, Any], tmp_path: Path
) -> None:
    archive = tmp_path / "result.zip"
    run = meshrun(api_stack, "download", finished["job_id"], "-o", str(archive))
    assert run.exit_code == 0, run.output
    code, report = verify_offline(api_stack, archive)
    assert code == 0, failing(report)

    with zipfile.ZipFile(archive) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    npy = bytearray(entries["outputs/y.npy"])
    npy[len(npy) // 2] ^= 0x80
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(tampered, "w") as z:
        for name, data in {**entries, "outputs/y.npy": bytes(npy)}.items():
            z.writestr(name, data)
    code, report = verify_offline(api_stack, tampered)
    assert code == 1 and "sha256 outputs/y.npy" in failing(report)

    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        z.writestr("../escaped.txt", b"x")
    code, report = verify_offline(api_stack, slip)
    assert code == 1 and "../escaped.txt" in failing(report)["package readable"]
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_the_rest_download_verifies_offline(
    api_stack: Devstack, finished: dict[str, Any], tmp_path: Path
) -> None:
    base = api_stack.requester.rpc_url.removesuffix("/rpc")
    got = httpx.get(
        f"{base}/v1/jobs/{finished['job_id']}/download",
        headers={"Authorization": f"Bearer {api_stack.requester.token}"},
        timeout=60,
    )
    assert got.status_code == 200, got.text
    with zipfile.ZipFile(io.BytesIO(got.content)) as z:
        assert SPEC_PATH in z.namelist()
    (tmp_path / "rest.zip").write_bytes(got.content)
    code, report = verify_offline(api_stack, tmp_path / "rest.zip")
    assert code == 0, failing(report)


def test_verify_by_job_id_still_asks_the_node(
    api_stack: Devstack, finished: dict[str, Any]
) -> None:
    run = meshrun(api_stack, "verify", finished["job_id"], "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["verified"] is True
    status = meshrun(api_stack, "status", finished["job_id"])
    assert status.exit_code == 0 and "completed" in status.output


def _signed_spec(client: Client, job_id: str) -> JobSpec:
    job = client.get_job(job_id)
    assert job.spec_envelope_b64 is not None
    opened = open_envelope(base64.b64decode(job.spec_envelope_b64), JobSpec)
    assert isinstance(opened.message, JobSpec)
    return opened.message


def _cancel(client: Client, job_id: str) -> None:
    try:
        client.cancel_job(job_id)
    except RpcError as err:  # it may have finished already
        assert err.code in (ErrorCode.ILLEGAL_TRANSITION, ErrorCode.WRONG_MODE), err


def test_a_policy_and_tolerance_reach_the_signed_spec(
    api_stack: Devstack, client: Client, inputs: tuple[Path, Path]
) -> None:
    model, data = inputs
    run = meshrun(api_stack, "submit", str(model), "--input", str(data), "--json",
                  "--verify", "sample:0.5", "--compare", "topk", "--top-k", "3",
                  "--atol", "0.01")  # fmt: skip
    assert run.exit_code == 0, run.output
    job_id = json.loads(run.output)["job_id"]
    spec = _signed_spec(client, job_id)
    assert spec.verification == "sample:0.5"
    assert (spec.tolerance.mode, spec.tolerance.k, spec.tolerance.atol) == ("topk", 3, 0.01)
    _cancel(client, job_id)

    model_cid = client.storage_add(model.read_bytes())
    inputs_cid = client.storage_add(data.read_bytes())
    job = client.submit_job(model_cid, inputs_cid, verification="redundant:3",
                            tolerance={"mode": "argmax"})  # fmt: skip
    spec = _signed_spec(client, job.job_id)
    assert (spec.verification, spec.tolerance.mode) == ("redundant:3", "argmax")
    _cancel(client, job.job_id)

    job = client.submit_job(model_cid, inputs_cid)
    assert _signed_spec(client, job.job_id).verification == "receipt"  # the node's default
    _cancel(client, job.job_id)


def test_a_wrong_policy_is_refused_clearly(
    api_stack: Devstack, client: Client, inputs: tuple[Path, Path]
) -> None:
    model, data = inputs
    run = meshrun(api_stack, "submit", str(model), "--input", str(data), "--json",
                  "--verify", "bogus")  # fmt: skip
    assert run.exit_code == 2, run.output
    error = json.loads(run.output)["error"]
    assert error["code"] == "INVALID_PARAMS"
    assert "'bogus'" in error["message"] and "redundant:K" in error["message"]

    model_cid = client.storage_add(model.read_bytes())
    inputs_cid = client.storage_add(data.read_bytes())
    for knob in ("redundancy", "verify"):
        with pytest.raises(RpcError) as refused:
            client.submit_job(model_cid, inputs_cid, params={knob: 2})
        assert refused.value.code is ErrorCode.INVALID_PARAMS
        assert "`verification`" in str(refused.value)
    with pytest.raises(RpcError) as refused:
        client.submit_job(model_cid, inputs_cid, tolerance={"mode": "cosine"})
    assert refused.value.code is ErrorCode.INVALID_PARAMS

    base = api_stack.requester.rpc_url.removesuffix("/rpc")
    rest = httpx.post(
        f"{base}/v1/jobs",
        json={"model_cid": model_cid, "inputs_cid": inputs_cid, "verification": "redundant:1"},
        headers={"Authorization": f"Bearer {api_stack.requester.token}"},
        timeout=30,
    )
    assert rest.status_code == 422 and rest.json()["error"] == "INVALID_PARAMS"
    schema = httpx.get(
        f"{base}/openapi.json",
        headers={"Authorization": f"Bearer {api_stack.requester.token}"},
        timeout=30,
    ).json()
    assert "verification" in json.dumps(schema)


def test_a_node_default_policy_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redundant:K"):
        NodeConfig(mode="requester", data_dir=tmp_path, default_verification="redundant:10")
    assert NodeConfig(mode="requester", data_dir=tmp_path, default_verification="sample:0.1")
    run = CliRunner().invoke(
        cli.app, ["node", "--mode", "requester", "--data-dir", str(tmp_path), "--verify", "x"]
    )
    assert run.exit_code == 2 and "unknown verification policy" in run.output


def test_a_redundant_job_packages_every_agreeing_receipt(
    tmp_path_factory: pytest.TempPathFactory, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = inputs
    with Devstack(tmp_path_factory.mktemp("redundant"), compute=2, bid_window=1.0) as stack:
        run = meshrun(stack, "submit", str(model), "--input", str(data), "--wait", "--json",
                      "--verify", "redundant:2")  # fmt: skip
        assert run.exit_code == 0, run.output
        job = json.loads(run.output)
        summary = job["verification"]
        assert summary["policy"] == "redundant:2" and len(summary["agreed"]) == 2
        status = meshrun(stack, "status", job["job_id"])
        assert "verification redundant:2" in status.output and "2 agreed" in status.output
        archive = tmp_path / "redundant.zip"
        assert meshrun(stack, "download", job["job_id"], "-o", str(archive)).exit_code == 0
        code, report = verify_offline(stack, archive)
    assert code == 0, failing(report)
    with zipfile.ZipFile(archive) as z:
        receipts = {n for n in z.namelist() if n.startswith("meshrun/receipts/")}
    assert receipts == {f"meshrun/receipts/{peer}.cbor" for peer in summary["agreed"]}
    policy = next(c for c in report["checks"] if c["check"] == "verification policy")
    assert "agreed by 2 signed receipts" in policy["detail"]

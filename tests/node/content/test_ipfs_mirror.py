"""meshrun as an IPFS citizen, across real processes: a devstack of node processes and a
real IPFS daemon (js-ipfs, tests/storage/jsipfs_daemon.py).

The requester runs with `--ipfs-api` pointing at the daemon through a link the
tests can cut (SwitchableLink), so an outage is real refused connections, not a
stub. Compute nodes bootstrap to the requester only, so compute-2 reaches
compute-1's content solely through its provider announcement.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ipfshttpclient
import pytest
from typer.testing import CliRunner

import cli
from node.client import Client, RpcError
from node.dev.devstack import Devstack, NodeProcess
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from protocol.errors import ErrorCode
from storage.blockstore import MemoryBlockstore
from storage.car import import_car, iter_car
from storage.cid import Cid
from storage.kubo import KuboBackend
from tests.storage.jsipfs_daemon import JsIpfsDaemon, SwitchableLink

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:.*'strict' parameter:FutureWarning"),
]

RETENTION_DAYS = 2.0 / 86400  # compute-2 forgets after two seconds
T = TypeVar("T")


class Net:
    def __init__(self, stack: Devstack, daemon: JsIpfsDaemon, link: SwitchableLink) -> None:
        self.stack = stack
        self.daemon = daemon
        self.link = link
        self.kubo = KuboBackend(daemon.api)
        self.ipfs = ipfshttpclient.Client(daemon.api, timeout=(3, 60))

    @property
    def requester(self) -> NodeProcess:
        return self.stack.requester

    def node(self, name: str) -> NodeProcess:
        return next(n for n in self.stack.nodes if n.name == name)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("ipfs-net")
    daemon = JsIpfsDaemon(root / "jsipfs").start()  # boots while the nodes start
    link = SwitchableLink(daemon.port)
    link.up()
    stack = Devstack(
        root / "stack",
        compute=2,
        bid_window=1.0,
        extra_args={
            "requester": ["--ipfs-api", link.api],
            "compute-2": ["--retention-days", repr(RETENTION_DAYS)],
        },
    )
    try:
        stack.start()
        daemon.wait_ready()
        yield Net(stack, daemon, link)
    finally:
        stack.stop()
        link.down()
        daemon.stop()


def _eventually(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


def _gateway(node: NodeProcess, path: str, **headers: str) -> httpx.Response:
    base = node.rpc_url.rsplit("/rpc", 1)[0]
    token = node.token
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(base + path, headers={**auth, **headers}, timeout=30)


def _cli(node: NodeProcess, *args: str) -> Any:
    result = CliRunner().invoke(
        cli.app,
        ["client", *args, "--rpc", node.rpc_url, "--json"],
        env={"MESHRUN_TOKEN": node.token or ""},
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _tree_car(files: dict[str, bytes]) -> tuple[Cid, bytes]:
    store = MemoryBlockstore()
    root = store.add_tree(files)
    return root, b"".join(iter_car(store.get, [root]))


def test_a_job_result_lands_on_the_daemon_and_leaves_when_the_job_goes(net: Net) -> None:
    with net.requester.client(timeout=90) as client:
        model_cid = client.storage_add(build_mlp(in_dim=8, hidden=16, out_dim=3, seed=4))
        inputs_cid = client.storage_add(encode_tensors(make_inputs(in_dim=8, batch=4, seed=1)))
        job = client.submit_job(model_cid, inputs_cid, timeout_seconds=60)
        job = client.wait_for_job(job["job_id"], timeout=90)
        assert job["status"] == "completed", job.get("error")
        result = Cid.decode(job["result_cid"])

        # Result, model and inputs are pinned on the daemon under meshrun's CIDs.
        for cid in (result, Cid.decode(model_cid), Cid.decode(inputs_cid)):
            _eventually(lambda c=cid: net.kubo.is_pinned(c), what=f"{cid} pinned on the daemon")
        ours = client.call("storage.get", cid=str(result), path="output.json")
        assert net.ipfs.cat(f"/ipfs/{result}/output.json") == base64.b64decode(ours["data_b64"])
        labels = {p["label"] for p in client.call("storage.pins", cid=str(result))["pins"]}
        assert labels == {f"job:{job['job_id']}"}

        # What job deletion does (Content.forget_job): unpin the job's label, collect.
        client.call("storage.unpin", label=f"job:{job['job_id']}")
        gc = client.call("storage.gc", grace_seconds=0)
        assert gc["removed_blocks"] >= 3
        with pytest.raises(RpcError) as err:
            client.call("storage.get", cid=str(result), path="output.json")
        assert err.value.code is ErrorCode.CID_NOT_FOUND
        assert client.call("storage.get", cid=model_cid)["size"] > 0  # still pinned ("added")
        _eventually(lambda: not net.kubo.is_pinned(result), what="result unpinned on the daemon")


def test_client_get_falls_back_to_the_daemon(net: Net, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(700_000)
    text = net.ipfs.add_bytes(data, opts={"cid-version": 1, "raw-leaves": True})
    cid = Cid.decode(text)
    out = _cli(net.requester, "get", str(cid), "--output", str(tmp_path))
    assert [Path(f).read_bytes() for f in out["files"]] == [data]
    with net.requester.client() as client:
        again = client.call("storage.fetch", cid=str(cid))
        assert again["source"] == "local"
        # A node without a daemon says clearly where it looked.
        with net.node("compute-1").client() as other, pytest.raises(RpcError) as err:
            other.call("storage.fetch", cid=str(Cid.decode(net.ipfs.add_bytes(b"daemon only"))),
                       timeout=2)  # fmt: skip
        assert err.value.code is ErrorCode.CID_NOT_FOUND
        assert "could not be fetched" in err.value.message


def test_any_node_fetches_content_from_its_provider(net: Net) -> None:
    one, two = net.node("compute-1"), net.node("compute-2")
    data = random.Random(8).randbytes(1_500_000)
    with one.client() as c1, two.client() as c2:
        assert one.peer_id not in c2.call("node.peers")["peers"]  # only via the requester
        cid = c1.storage_add(data)
        providers = _eventually(
            lambda: c2.call("storage.providers", cid=cid)["providers"], what="announcement"
        )
        assert providers[0]["peer_id"] == one.peer_id
        fetched = c2.call("storage.fetch", cid=cid)
        assert (fetched["source"], fetched["provider"]) == ("mesh", one.peer_id)
        assert fetched["via"] == "exchange"  # a named provider gets the fast path
        assert c2.storage_get(cid) == data


def test_car_export_and_import_interoperate_with_the_daemon(net: Net, tmp_path: Path) -> None:
    files = {"a.txt": b"alpha\n", "nested/b.bin": random.Random(3).randbytes(300_000)}
    root, car = _tree_car(files)
    path = tmp_path / "in.car"
    path.write_bytes(car)
    imported = _cli(net.node("compute-1"), "import-car", str(path))
    assert imported["complete"] == {str(root): True}

    out = tmp_path / "out.car"
    exported = _cli(net.node("compute-1"), "export-car", str(root), "--output", str(out))
    assert out.read_bytes() == car and exported["blocks"] == 6
    # A standard tool reads it: the daemon's own `dag import`.
    form_car = {"file": ("out.car", out.read_bytes(), "application/vnd.ipld.car")}
    reply = httpx.post(f"{net.daemon.url}/dag/import", files=form_car, timeout=30)
    assert reply.status_code == 200, reply.text
    assert net.ipfs.cat(f"/ipfs/{root}/nested/b.bin") == files["nested/b.bin"]

    # And the daemon's CAR of its own content imports into meshrun.
    theirs = net.ipfs.add_bytes(b"exported by the daemon", opts={"cid-version": 1})
    their_car = b"".join(net.ipfs._client.request("/dag/export", (theirs,), stream=True))
    with net.node("compute-1").client() as c:
        got = c.call("storage.import_car", car_b64=base64.b64encode(their_car).decode())
        assert [Cid.decode(r) for r in got["roots"]] == [Cid.decode(theirs)]
        assert c.storage_get(str(Cid.decode(theirs))) == b"exported by the daemon"
        bad = bytearray(car)
        bad[-1] ^= 1
        with pytest.raises(RpcError) as err:
            c.call("storage.import_car", car_b64=base64.b64encode(bytes(bad)).decode())
        assert err.value.code is ErrorCode.VERIFICATION_MISMATCH


def test_gateway_serves_files_listings_and_ranges(net: Net) -> None:
    big = random.Random(4).randbytes(700_000)
    files = {
        "output.json": b'{"ok": true}',
        "logs/stdout.log": b"line one\n",
        "outputs/y.npy": big,
        "site/index.html": b"<!doctype html><p>hi</p>",
    }
    root, car = _tree_car(files)
    node = net.node("compute-1")
    with node.client() as c:
        c.call("storage.import_car", car_b64=base64.b64encode(car).decode())

    r = _gateway(node, f"/ipfs/{root}/output.json")
    assert (r.status_code, r.content) == (200, files["output.json"])
    assert r.headers["content-type"] == "application/json"
    assert r.headers["etag"] == f'"{c_of(root, "output.json", files)}"'
    assert "immutable" in r.headers["cache-control"]
    assert r.headers["content-security-policy"] == "sandbox"
    assert _gateway(node, f"/ipfs/{root}/logs/stdout.log").headers["content-type"] == (
        "text/plain; charset=utf-8"
    )

    r = _gateway(node, f"/ipfs/{root}/outputs/y.npy", Range="bytes=300000-300099")
    assert r.status_code == 206 and r.content == big[300_000:300_100]
    assert r.headers["content-range"] == f"bytes 300000-300099/{len(big)}"
    r = _gateway(node, f"/ipfs/{root}/outputs/y.npy", Range="bytes=-10")
    assert r.status_code == 206 and r.content == big[-10:]
    r = _gateway(node, f"/ipfs/{root}/outputs/y.npy", Range="bytes=800000-")
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(big)}"
    r = _gateway(node, f"/ipfs/{root}/outputs/y.npy")
    assert r.content == big and r.headers["content-length"] == str(len(big))
    assert r.headers["content-type"] == "application/octet-stream"

    r = _gateway(node, f"/ipfs/{root}")
    assert r.status_code == 301 and r.headers["location"].endswith(f"/ipfs/{root}/")
    r = _gateway(node, f"/ipfs/{root}/")
    assert r.headers["content-type"].startswith("text/html")
    for name in ("output.json", "logs", "outputs", "site"):
        assert f'href="{name}"' in r.text
    listing = _gateway(node, f"/ipfs/{root}/", Accept="application/json").json()
    assert {e["name"] for e in listing["entries"]} == {"output.json", "logs", "outputs", "site"}
    r = _gateway(node, f"/ipfs/{root}/site/")
    assert r.content == files["site/index.html"]

    r = _gateway(node, f"/ipfs/{root}?format=car")
    assert r.headers["content-type"] == "application/vnd.ipld.car"
    assert import_car(MemoryBlockstore(), io.BytesIO(r.content)).roots == [root]
    assert r.content == car
    assert _gateway(node, f"/ipfs/{root}/nope.txt").status_code == 404
    assert _gateway(node, "/ipfs/not-a-cid").status_code == 400


def c_of(root: Cid, path: str, files: dict[str, bytes]) -> Cid:
    store = MemoryBlockstore()
    return store.resolve_path(store.add_tree(files), path)


def test_daemon_outage_loses_nothing(net: Net) -> None:
    with net.requester.client() as client:
        net.link.down()
        try:
            cid = client.storage_add(b"made while the daemon was away")
            status = _eventually(
                lambda: (s := client.call("storage.status"))["ipfs"]["reachable"] is False and s,
                what="the outage to be noticed",
            )
            assert status["ipfs"]["pending"] >= 1
            assert "not reachable" in status["ipfs"]["last_error"]
            started = time.monotonic()
            with pytest.raises(RpcError) as err:
                client.call("storage.publish", cid=cid)
            assert err.value.code is ErrorCode.IPFS_UNAVAILABLE
            assert time.monotonic() - started < 10
            assert client.storage_get(cid) == b"made while the daemon was away"
        finally:
            net.link.up()
        assert client.call("storage.publish", cid=cid)["method"] == "add"
        _eventually(
            lambda: client.call("storage.status")["ipfs"]["pending"] == 0, what="queue drained"
        )
        assert net.ipfs.cat(cid) == b"made while the daemon was away"


def test_retention_expires_pins_and_gc_reclaims(net: Net) -> None:
    with net.node("compute-2").client() as client:
        cid = client.storage_add(b"short-lived upload")
        time.sleep(2.5)
        gc = client.call("storage.gc", grace_seconds=0)
        assert cid in {p["cid"] for p in gc["expired_pins"]}
        assert gc["retention_days"] == pytest.approx(RETENTION_DAYS)
        with pytest.raises(RpcError) as err:
            client.call("storage.get", cid=cid)
        assert err.value.code is ErrorCode.CID_NOT_FOUND


def test_storage_methods_are_in_the_openrpc_document(net: Net) -> None:
    with Client(net.requester.rpc_url, net.requester.token) as client:
        names = {m["name"] for m in client.call("rpc.discover")["methods"]}
    assert {
        "storage.fetch",
        "storage.export_car",
        "storage.import_car",
        "storage.pin",
        "storage.unpin",
        "storage.pins",
        "storage.gc",
        "storage.publish",
        "storage.providers",
        "storage.status",
    } <= names

"""storage.kubo and storage.car against a real IPFS daemon (js-ipfs, see jsipfs_daemon.py).

The daemon is an independent implementation: when it gives the CID meshrun gives,
for files and for the result package's directory layout, the CIDs are right;
when it reads meshrun's CARs and meshrun reads its CARs byte for byte, the CAR
format is right.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterator
from pathlib import Path

import ipfshttpclient
import pytest

from node.dev.models import build_mlp
from node.roles.result_package import build_files, npy_bytes
from storage.blockstore import Blockstore, MemoryBlockstore
from storage.car import import_car, iter_car
from storage.cid import Cid
from storage.kubo import IpfsError, IpfsUnavailable, KuboBackend
from storage.unixfs import CHUNK_SIZE, MAX_LINKS, import_bytes
from tests.storage.jsipfs_daemon import JsIpfsDaemon, free_port

pytestmark = [
    pytest.mark.slow,
    # ipfshttpclient 0.7.0 passes urllib3 a deprecated argument on every connection.
    pytest.mark.filterwarnings("ignore:.*'strict' parameter:FutureWarning"),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsIpfsDaemon]:
    d = JsIpfsDaemon(tmp_path_factory.mktemp("jsipfs")).start()
    try:
        yield d.wait_ready()
    finally:
        d.stop()


@pytest.fixture(scope="module")
def kubo(daemon: JsIpfsDaemon) -> KuboBackend:
    return KuboBackend(daemon.api, timeout=30)


@pytest.fixture(scope="module")
def ipfs(daemon: JsIpfsDaemon) -> ipfshttpclient.Client:
    """The daemon through the plain library, as an independent witness."""
    return ipfshttpclient.Client(daemon.api, timeout=(3, 60))


def _result_files() -> dict[str, bytes]:
    import numpy as np

    rng = np.random.default_rng(3)
    outputs = {"y": rng.standard_normal((300, 400)).astype("float32"), "z": np.arange(5)}
    files, _ = build_files("bafkreijobid", outputs, {"model_cid": "bafkreimodel"}, "ok\n", "")
    files["model.onnx"] = build_mlp(seed=2)
    return files


def _same(a: Cid | str, b: Cid | str) -> bool:
    """CIDs compared as bytes: js-ipfs prints base58btc, Kubo base32."""
    left = a if isinstance(a, Cid) else Cid.decode(a)
    right = b if isinstance(b, Cid) else Cid.decode(b)
    return left.to_bytes() == right.to_bytes()


def test_result_published_by_meshrun_is_catable_by_the_same_cid(
    kubo: KuboBackend, ipfs: ipfshttpclient.Client, tmp_path: Path
) -> None:
    store = Blockstore(tmp_path)
    files = _result_files()
    root = store.add_tree(files)
    published = kubo.publish(store, root)
    assert published.method == "add", "the daemon re-derived a different CID"
    assert _same(published.cid, root)
    for path, data in files.items():
        assert ipfs.cat(f"/ipfs/{root}/{path}") == data
    assert kubo.is_pinned(root)
    single = store.add_bytes(b"a result that is one small file")
    assert kubo.publish(store, single).method == "add"
    assert ipfs.cat(str(single)) == b"a result that is one small file"


def test_daemon_add_recursive_gives_the_result_package_cid(
    ipfs: ipfshttpclient.Client, tmp_path: Path
) -> None:
    """`ipfs add -r --cid-version=1 --raw-leaves` of the package on disk, through the
    library's own directory upload: the daemon's root CID is meshrun's."""
    files = _result_files()
    files["logs/empty-dir-sibling.txt"] = b""
    top = tmp_path / "result"
    for rel, data in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
    added = ipfs.add(str(top), recursive=True, cid_version=1, raw_leaves=True, pin=False)
    by_name = {entry["Name"]: entry["Hash"] for entry in added}
    store = MemoryBlockstore()
    ours = store.add_tree(files)
    assert _same(by_name["result"], ours)
    assert _same(by_name["result/outputs"], store.resolve_path(ours, "outputs"))
    assert _same(Blockstore(tmp_path / "bs").add_directory(top), ours)


def test_file_added_to_the_daemon_is_fetched_by_its_cid(
    kubo: KuboBackend, ipfs: ipfshttpclient.Client, tmp_path: Path
) -> None:
    # Two levels of the balanced DAG: MAX_LINKS + 1 chunks plus a tail.
    data = random.Random(5).randbytes((MAX_LINKS + 1) * CHUNK_SIZE + 1234)
    text = ipfs.add_bytes(data, opts={"cid-version": 1, "raw-leaves": True})
    cid = Cid.decode(text)
    assert _same(cid, import_bytes(data, lambda c, b: None).cid)
    store = Blockstore(tmp_path)
    blocks = kubo.fetch(store, cid)
    assert blocks == len(list(store.iter_cids()))
    assert store.cat(cid) == data
    assert store.missing_blocks(cid) == []


def test_cars_round_trip_through_the_daemon_byte_for_byte(
    kubo: KuboBackend, ipfs: ipfshttpclient.Client
) -> None:
    store = MemoryBlockstore()
    files = {"a.bin": random.Random(9).randbytes(3 * CHUNK_SIZE + 7), "d/b.txt": b"bee"}
    root = store.add_tree(files)
    ours = b"".join(iter_car(store.get, [root]))
    # The daemon reads our CAR (dag import verifies and pins the roots) ...
    assert [r.to_bytes() for r in kubo.import_car(iter([ours]))] == [root.to_bytes()]
    assert ipfs.cat(f"/ipfs/{root}/d/b.txt") == b"bee"
    # ... and exports exactly the same bytes for the same DAG.
    theirs = b"".join(ipfs._client.request("/dag/export", (str(root),), stream=True))
    assert theirs == ours
    fresh = MemoryBlockstore()
    imported = import_car(fresh, io.BytesIO(theirs))
    assert imported.roots == [root]
    assert fresh.read_tree(root) == files


def test_a_dag_the_daemon_would_chunk_differently_keeps_its_cid(
    kubo: KuboBackend, ipfs: ipfshttpclient.Client
) -> None:
    """Imported content with another chunker: `add` would name it differently, so the
    exact blocks go over instead and the CID the user holds still resolves."""
    store = MemoryBlockstore()
    data = random.Random(11).randbytes(50_000)
    odd = import_bytes(data, store.put, chunk_size=4096).cid
    published = kubo.publish(store, odd)
    assert published.method == "dag-import"
    assert ipfs.cat(str(odd)) == data
    assert kubo.is_pinned(odd)
    kubo.unpin(odd)
    assert not kubo.is_pinned(odd)
    kubo.unpin(odd)  # unpinning twice is not an error


def test_missing_cid_on_the_daemon_fails_fast(kubo: KuboBackend) -> None:
    absent = import_bytes(b"never added anywhere " * 3, lambda c, b: None).cid
    started = time.monotonic()
    with pytest.raises(IpfsError):
        kubo.fetch(MemoryBlockstore(), absent, timeout=1)
    assert time.monotonic() - started < 10


def test_daemon_down_is_a_clear_error_not_a_hang() -> None:
    down = KuboBackend(f"/ip4/127.0.0.1/tcp/{free_port()}", connect_timeout=1)
    store = MemoryBlockstore()
    cid = store.add_bytes(npy_bytes(__import__("numpy").zeros(3)))
    started = time.monotonic()
    with pytest.raises(IpfsUnavailable, match="not reachable"):
        down.publish(store, cid)
    with pytest.raises(IpfsUnavailable, match="not reachable"):
        down.version()
    assert time.monotonic() - started < 5


def test_bad_daemon_address_is_refused_early() -> None:
    with pytest.raises(ValueError, match="bad IPFS API address"):
        KuboBackend("not-a-multiaddr")

"""Bitswap with a real IPFS peer on the wire: js-ipfs 0.66 (tests/storage/jsipfs_daemon.py).

The daemon runs online, listening on 127.0.0.1 only with no bootstrap list,
and is connected to a meshrun node (`swarm/connect` to the node's multiaddr):
noise and mplex, bitswap 1.2.0. Both directions are fetched by CID over
libp2p only, never through the daemon's HTTP API (that is only how the test
asks js-ipfs to do things):

- js-ipfs fetches a meshrun result (a directory with multi-block files) and a
  multi-block file: `block/get`, `cat` and `get` give the same bytes;
- meshrun fetches a multi-block file and a directory that only js-ipfs holds,
  with the peer named (the block exchange is refused, bitswap takes over) and
  without (every connected peer is asked), through the content layer;
- a CID neither holds fails at once: js-ipfs answers DONT_HAVE.

The meshrun node runs in the test's process (its mesh, blockstore and Content),
so the daemon is the only other process. No timing is asserted; the timeouts
are generous.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from crypto.keys import Identity
from node.content.bitswap import Bitswap
from node.content.blocks import BitswapStore, fetch_dag, serve_block_exchange
from node.content.service import Content, ContentConfig
from node.jobs.bus import EventBus
from node.jobs.store import JobDB
from node.roles.result_package import build_files
from node.transport.mesh import Mesh, start_mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import Blockstore
from storage.cid import Cid
from storage.unixfs import CHUNK_SIZE
from tests.storage.jsipfs_daemon import JsIpfsDaemon

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HTTP_TIMEOUT = 60.0
FETCH_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsIpfsDaemon]:
    d = JsIpfsDaemon(tmp_path_factory.mktemp("jsipfs"), online=True).start()
    try:
        yield d.wait_ready()
    finally:
        d.stop()


@dataclass
class Node:
    mesh: Mesh
    store: Blockstore
    content: Content

    @property
    def bitswap(self) -> Bitswap:
        assert isinstance(self.mesh.bitswap, Bitswap)
        return self.mesh.bitswap

    @property
    def addr(self) -> str:
        addr = self.mesh.listen_addrs()[0]
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.mesh.peer_id}"


@asynccontextmanager
async def _node(data_dir: Path) -> AsyncIterator[Node]:
    store = Blockstore(data_dir / "blocks")
    db = JobDB(data_dir / "jobs.sqlite", EventBus())
    async with (
        start_mesh(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh,
        trio.open_nursery() as nursery,
    ):
        serve_block_exchange(mesh, store)
        content = Content(data_dir, store, mesh, db, ContentConfig())
        await nursery.start(content.run)
        yield Node(mesh, store, content)
        nursery.cancel_scope.cancel()
    content.close()
    db.close()


async def _api(daemon: JsIpfsDaemon, command: str, **kwargs: Any) -> httpx.Response:
    """One daemon API call, on a worker thread so the node keeps serving meanwhile."""

    def call() -> httpx.Response:
        response = httpx.post(f"{daemon.url}/{command}", timeout=HTTP_TIMEOUT, **kwargs)
        if response.status_code != 200:
            raise AssertionError(f"{command}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    return await trio.to_thread.run_sync(call)


async def _connect(daemon: JsIpfsDaemon, node: Node) -> str:
    """Connect the daemon to the node; the daemon's peer id."""
    await _api(daemon, "swarm/connect", params={"arg": node.addr})
    ident = (await _api(daemon, "id")).json()
    with trio.fail_after(30):
        while ident["ID"] not in node.mesh.connected_peers():
            await trio.sleep(0.05)
    return str(ident["ID"])


def _result_files() -> dict[str, bytes]:
    """A result package as a compute node stores it, with two multi-block files."""
    import numpy as np

    rng = np.random.default_rng(7)
    outputs = {"y": rng.standard_normal((400, 400)).astype("float32"), "z": np.arange(5)}
    files, _ = build_files("bafkreijobid", outputs, {"model_cid": "bafkreimodel"}, "ok\n", "")
    files["extra/blob.bin"] = random.Random(3).randbytes(3 * CHUNK_SIZE + 123)
    return files


def _untar(data: bytes, top: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                name = member.name.split("/", 1)[1] if "/" in member.name else ""
                assert member.name.startswith(top)
                files[name] = extracted.read()
    return files


def _same(a: Cid, b: str) -> bool:
    return a.to_bytes() == Cid.decode(b).to_bytes()


async def test_jsipfs_fetches_a_meshrun_result_by_cid(daemon: JsIpfsDaemon, tmp_path: Path) -> None:
    async with _node(tmp_path) as node:
        files = _result_files()
        root = await node.content.add_tree(files, "job:interop")
        big = files["extra/blob.bin"]
        single = await node.content.add_bytes(big[: 2 * CHUNK_SIZE + 5])
        assert len(node.store.list_directory(root)) > 1
        await _connect(daemon, node)

        # One block: the directory's root node, byte for byte.
        got = await _api(daemon, "block/get", params={"arg": str(root)})
        assert got.content == node.store.get(root)
        # A multi-block file on its own, and one inside the directory.
        got = await _api(daemon, "cat", params={"arg": str(single)})
        assert got.content == big[: 2 * CHUNK_SIZE + 5]
        got = await _api(daemon, "cat", params={"arg": f"/ipfs/{root}/extra/blob.bin"})
        assert got.content == big
        # The whole directory as a tar: every file, the same bytes.
        got = await _api(daemon, "get", params={"arg": str(root)})
        assert _untar(got.content, str(root)) == files

        listed = (await _api(daemon, "ls", params={"arg": str(root)})).json()
        names = {link["Name"] for obj in listed["Objects"] for link in obj["Links"]}
        assert names == {path.split("/")[0] for path in files}
        assert node.bitswap.stats["blocks_sent"] > 3


async def test_meshrun_fetches_a_dag_only_jsipfs_has(daemon: JsIpfsDaemon, tmp_path: Path) -> None:
    data = random.Random(11).randbytes(4 * CHUNK_SIZE + 999)
    # Defaults: CIDv0, dag-pb leaves (what a plain `ipfs add` makes).
    added = await _api(daemon, "add", files={"file": ("data.bin", data)})
    file_cid = Cid.decode(added.json()["Hash"])
    tree = {
        "a.bin": random.Random(12).randbytes(2 * CHUNK_SIZE + 1),
        "sub/b.txt": b"bee\n",
        "sub/deeper/c.bin": random.Random(13).randbytes(CHUNK_SIZE + 7),
    }
    parts = [("file", (f"result/{path}", body)) for path, body in tree.items()]
    added = await _api(
        daemon,
        "add",
        files=parts,
        params={"cid-version": "1", "raw-leaves": "true", "pin": "true"},
    )
    entries = [json.loads(line) for line in added.text.splitlines() if line.strip()]
    dir_cid = Cid.decode(next(e["Hash"] for e in entries if e["Name"] == "result"))

    async with _node(tmp_path) as node:
        peer = await _connect(daemon, node)
        # The peer named: it does not speak the block exchange, so bitswap fetches.
        fetched = await node.content.fetch(file_cid, peer=peer, timeout=FETCH_TIMEOUT)
        assert fetched["source"] == "mesh", fetched
        assert node.store.cat(file_cid) == data
        assert node.store.missing_blocks(file_cid) == []
        # No peer named and no provider known: every connected peer is asked.
        fetched = await node.content.fetch(dir_cid, timeout=FETCH_TIMEOUT)
        assert fetched["source"] == "mesh" and fetched["provider"] is None, fetched
        assert fetched["blocks"] >= 7, fetched
        assert node.store.read_tree(dir_cid) == tree
        assert _same(dir_cid, str(node.store.add_tree(tree)))  # the same DAG meshrun builds

        # A CID neither holds: js-ipfs says DONT_HAVE, so it fails without waiting.
        absent = node.store.add_bytes(b"only meshrun ever saw this")
        node.store.delete(absent)
        with pytest.raises(MeshrunError) as failed:
            await fetch_dag(node.mesh, node.store, absent, peer, FETCH_TIMEOUT)
        assert failed.value.code == ErrorCode.FETCH_FAILED
        assert "do not have" in failed.value.message, failed.value.message

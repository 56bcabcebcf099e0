"""node.content in one process: the job-deletion hook, GC roots, announcements.

Real parts throughout: an on-disk blockstore, the SQLite job database and a
libp2p host with gossipsub (alone on loopback; the multi-node and daemon paths
are in test_ipfs_content.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from crypto.keys import Identity
from node.blocks import BitswapStore
from node.bus import EventBus
from node.content import Content, ContentConfig
from node.jobdb import JobDB
from node.mesh import start_mesh
from storage.blockstore import Blockstore
from storage.cid import Cid

LOGS = {"logs/stdout.log": b"", "logs/stderr.log": b""}


@pytest.fixture()
async def content(tmp_path: Path) -> AsyncIterator[Content]:
    store = Blockstore(tmp_path / "blocks")
    db = JobDB(tmp_path / "jobs.sqlite", EventBus())
    identity = Identity.load_or_create(tmp_path)
    async with (
        start_mesh(identity, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh,
        trio.open_nursery() as nursery,
    ):
        c = Content(tmp_path, store, mesh, db, ContentConfig(retention_days=1.0))
        await nursery.start(c.run)
        yield c
        nursery.cancel_scope.cancel()
    c.close()
    db.close()


async def test_forget_job_collects_only_what_that_job_kept(content: Content) -> None:
    a = await content.add_tree({"output.json": b'{"a": 1}', **LOGS}, "job:a")
    b = await content.add_tree({"output.json": b'{"b": 2}', **LOGS}, "job:b")
    same_as_a = await content.add_bytes(b'{"a": 1}')  # a user upload equal to a's file
    blocks_before = len(list(content.store.iter_cids()))

    result = await content.forget_job("a", str(a))

    assert result["unpinned"] == [str(a)]
    assert result["removed_blocks"] == 1  # a's directory node; its leaves are shared
    assert len(list(content.store.iter_cids())) == blocks_before - 1
    assert content.store.read_tree(b) == {"output.json": b'{"b": 2}', **LOGS}
    assert content.store.cat(same_as_a) == b'{"a": 1}'
    assert content.pins.pins(label="job:a") == []
    # Unknown and already-forgotten jobs are no-ops.
    assert (await content.forget_job("a"))["removed_blocks"] == 0


async def test_forget_job_also_collects_a_result_that_was_never_pinned(content: Content) -> None:
    legacy = content.store.add_tree({"output.json": b"old", **LOGS})  # before pins existed
    result = await content.forget_job("legacy", str(legacy))
    assert result["unpinned"] == [str(legacy)]
    assert result["removed_blocks"] == 4  # the root, logs/, output.json, the empty log
    assert content.store.missing_blocks(legacy) == [legacy]


async def test_gc_spares_running_jobs_and_the_model_catalog(content: Content) -> None:
    store = content.store
    model = store.add_bytes(b"onnx model bytes")
    inputs = store.add_bytes(b"npz inputs")
    catalogued = store.add_bytes(b"a model named in the catalog")
    stray = store.add_bytes(b"nobody wants this")
    content.db.create(
        "bafkreijob", "requester", {"model_cid": str(model), "inputs_cid": str(inputs)},
        b"envelope", content.mesh.peer_id, None,
    )  # fmt: skip
    content.db.add_model("mlp", str(catalogued))
    result = await content.gc(grace_seconds=0)
    assert result["removed_blocks"] == 1
    assert not store.has(stray)
    assert all(store.has(c) for c in (model, inputs, catalogued))


async def test_keep_announces_and_status_reports(content: Content) -> None:
    cid = await content.add_bytes(b"announce me")
    status = content.status()
    assert status["pins"] == 1 and status["ipfs"] is None
    assert status["providers"]["announcements_sent"] >= 1
    assert status["retention_days"] == 1.0
    fetched = await content.fetch(Cid.decode(str(cid)))
    assert fetched["source"] == "local"

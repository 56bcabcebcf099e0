"""node.content.service in one process: the job-deletion hook, GC roots, announcements.

Real parts throughout: an on-disk blockstore, the SQLite job database and a
libp2p host with gossipsub (alone on loopback; the multi-node and daemon paths
are in test_ipfs_mirror.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from crypto.keys import Identity
from node.content.blocks import BitswapStore, serve_block_exchange
from node.content.service import Content, ContentConfig
from node.jobs.bus import EventBus
from node.jobs.store import JobDB
from node.transport.mesh import start_mesh
from protocol.jobstate import JobStatus
from protocol.lifecycle import LogEvent, Move, Role, Trigger
from storage.blockstore import Blockstore
from storage.cid import Cid

LOGS = {"logs/stdout.log": b"", "logs/stderr.log": b""}


@asynccontextmanager
async def _content_node(data_dir: Path) -> AsyncIterator[Content]:
    store = Blockstore(data_dir / "blocks")
    db = JobDB(data_dir / "jobs.sqlite", EventBus())
    identity = Identity.load_or_create(data_dir)
    async with (
        start_mesh(identity, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh,
        trio.open_nursery() as nursery,
    ):
        serve_block_exchange(mesh, store)
        c = Content(data_dir, store, mesh, db, ContentConfig(retention_days=1.0))
        await nursery.start(c.run)
        yield c
        nursery.cancel_scope.cancel()
    c.close()
    db.close()


@pytest.fixture()
async def content(tmp_path: Path) -> AsyncIterator[Content]:
    async with _content_node(tmp_path) as c:
        yield c


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
        b"envelope", content.mesh.peer_id,
        Move(Role.REQUESTER, Trigger.SUBMITTED, None, JobStatus.PENDING, LogEvent.CREATED, None),
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
    # Announced a moment later, with whatever else was kept meanwhile.
    assert status["providers"]["announcements_pending"] == 1
    with trio.fail_after(10):
        while content.status()["providers"]["announcements_sent"] < 1:
            await trio.sleep(0.05)
    status = content.status()
    assert status["providers"]["announcements_pending"] == 0
    assert status["retention_days"] == 1.0
    fetched = await content.fetch(Cid.decode(str(cid)))
    assert fetched["source"] == "local"


async def test_results_kept_together_go_out_in_one_announcement(content: Content) -> None:
    """One gossip message for many results kept at once, not one per result."""
    before = content.status()["providers"]["announcements_sent"]
    for i in range(5):
        await content.add_bytes(f"result {i}".encode())
    assert content.status()["providers"]["announcements_pending"] == 5
    with trio.fail_after(10):
        while content.status()["providers"]["announcements_pending"]:
            await trio.sleep(0.05)
    assert content.status()["providers"]["announcements_sent"] == before + 1


async def test_fetch_from_a_named_provider_uses_the_block_exchange(tmp_path: Path) -> None:
    async with (
        _content_node(tmp_path / "one") as one,
        _content_node(tmp_path / "two") as two,
    ):
        cid = await one.add_bytes(bytes(range(256)) * 4096)  # 1 MiB: several blocks
        await two.mesh.connect(f"{one.mesh.listen_addrs()[0]}/p2p/{one.mesh.peer_id}")
        fetched = await two.fetch(cid, peer=one.mesh.peer_id, timeout=20)
        assert (fetched["source"], fetched["provider"]) == ("mesh", one.mesh.peer_id)
        assert fetched["via"] == "exchange"
        assert fetched["blocks"] > 1
        assert two.store.cat(cid) == bytes(range(256)) * 4096

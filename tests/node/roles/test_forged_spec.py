"""A compute node fed forged, tampered and garbage job specs over real gossip
drops them, logs who sent them, never bids on them, and keeps serving."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import cbor2
import pytest
import trio

from crypto.envelope import domain_tag, open_envelope, seal
from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.dev.devstack import Devstack
from node.roles.context import job_id_of
from node.transport.frames import Frames
from node.transport.mesh import start_mesh
from protocol import encoding
from protocol.messages import BID_PROTOCOL, JOBS_TOPIC, Bid, JobSpec, NoBid
from storage.blockstore import MemoryBlockstore

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SOME_CID = str(MemoryBlockstore().add_bytes(b"model bytes that are never fetched"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("forged"), compute=1) as devstack:
        yield devstack


def _spec(attacker: Identity, addrs: list[str], timeout: float = 30.0) -> JobSpec:
    now = time.time()
    return JobSpec(
        model_cid=SOME_CID,
        inputs_cid=SOME_CID,
        requester=attacker.peer_id,
        requester_addrs=addrs,
        nonce=os.urandom(16),
        created_at=now,
        expires_at=now + 60,
        timeout_seconds=timeout,
        model_bytes=10,
        inputs_bytes=10,
    )


def _tampered(envelope: bytes) -> bytes:
    outer = cbor2.loads(envelope)
    fields = cbor2.loads(outer["p"])
    fields["timeout_seconds"] = 9999.0
    outer["p"] = encoding.encode(fields)
    return encoding.encode(outer)


def _forged(spec: JobSpec, impostor: Identity) -> bytes:
    payload = encoding.encode(spec.to_wire())
    return encoding.encode(
        {
            "v": 1,
            "t": "jobspec",
            "p": payload,
            "k": impostor.public_key,
            "s": impostor.sign(domain_tag("jobspec") + payload),
        }
    )


async def test_bad_specs_are_dropped_and_logged(stack: Devstack) -> None:
    compute = stack.compute_nodes[0]
    attacker = Identity.generate()
    replies: list[Bid | NoBid] = []

    async with start_mesh(
        attacker, ["/ip4/127.0.0.1/tcp/0"], BitswapStore(MemoryBlockstore())
    ) as mesh:

        async def on_bid(frames: Frames) -> None:
            opened = open_envelope(await frames.read())
            assert isinstance(opened.message, (Bid, NoBid))
            replies.append(opened.message)

        mesh.handle(BID_PROTOCOL, on_bid)
        await mesh.connect(compute.info["listen_addrs"][0])
        with trio.fail_after(15):
            while compute.peer_id not in mesh.topic_peers(JOBS_TOPIC):
                await trio.sleep(0.05)
        await trio.sleep(1.5)  # let the gossip mesh form (heartbeat 1 s)

        addrs = mesh.listen_addrs()
        bad = [
            _tampered(seal(attacker, _spec(attacker, addrs))),
            _forged(_spec(attacker, addrs), Identity.generate()),
            b"\xff\x00 definitely not cbor",
            encoding.encode({"v": 99, "t": "jobspec", "p": b"", "k": b"", "s": b""}),
        ]
        for message in bad:
            await mesh.publish(JOBS_TOPIC, message)
        control = seal(attacker, _spec(attacker, addrs))
        await mesh.publish(JOBS_TOPIC, control)

        with trio.fail_after(15):
            while not replies:
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # any bid on a bad spec would have arrived by now

    assert len(replies) == 1, replies
    assert isinstance(replies[0], Bid)
    assert replies[0].job_id == job_id_of(control)

    log = compute.log_path.read_text()
    dropped = [
        line for line in log.splitlines() if f"dropped job spec from {attacker.peer_id}" in line
    ]
    assert len(dropped) >= 4, log[-3000:]
    assert any("SIGNATURE_INVALID" in line for line in dropped)
    assert any("MALFORMED_MESSAGE" in line for line in dropped)
    assert any("UNSUPPORTED_VERSION" in line for line in dropped)

    assert stack.alive()
    with compute.client() as c:
        assert c.node_info()["peer_id"] == compute.peer_id

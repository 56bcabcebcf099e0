"""Compute nodes that misbehave on purpose, so tests can show hostile peers cannot hurt a node.

Started only by `meshrun devstack --bad KIND[:N],…` (or `Devstack(bad=...)`),
which runs `meshrun node --misbehave KIND` with MESHRUN_ALLOW_MISBEHAVE=1 in
the child's environment; without that variable the node refuses to start
(:func:`check_misbehave`), so nobody runs one by accident, and `node.info`
shows the kind in its `misbehave` field.

Each kind is a subclass of :class:`~node.roles.compute.Compute` that overrides
the narrowest method it needs and is honest everywhere else:

- `wrong-key-receipt` (`_send`): signs its receipt with another key, naming
  that key's PeerID;
- `wrong-cids` (`_feed`): its receipt names a wrong inputs CID;
- `silent` (`_run_job`, `_heartbeat`): accepts, then says nothing while it
  keeps the stream open;
- `bid-replay` (`_answer`): sends its signed Bid 5 times;
- `accept-forward` (`_on_job_stream`): forwards the Accept it won to every
  other peer on the jobs topic, then drops the job;
- `spec-flood` (`_answer`): on hearing its first job, gossips many validly
  signed specs, each from a fresh key; it never bids;
- `dag-bomb-result` (`_feed`): its receipt names a result DAG whose links all
  point at one block, with lying sizes.

The result-correctness attackers publish a validly signed wrong answer, which
no receipt check can see (docs/design.md, trust model); only comparing it with
another executor's (protocol/compare.py) can. They override `_outputs`:

- `zeros`: all-zero outputs, same names, shapes and dtypes;
- `perturb`: every float element moved 3 times the job's tolerance
  (protocol/compare.py, `|a - b| <= atol + rtol*|b|`) away: honest-looking,
  but beyond what honest noise reaches;
- `replay`: a lazy node, honest on the first job for a model, then publishing
  that job's outputs for every later job for the same model, whatever its inputs.

And one honest kind that must never be flagged:

- `noise` (`_run_options`): an honest node on "other hardware": 1 intra-op
  thread and graph optimisation off, so its floats may differ from the other
  nodes' in their last bits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from crypto.envelope import open_envelope, seal
from crypto.keys import Identity
from node.roles.compute import ACCEPT_TIMEOUT, Compute, Run
from node.roles.context import job_id_of
from node.transport.frames import Frames
from node.transport.mesh import OUTBOUND_HIGH_WATER
from protocol.compare import tolerance_for
from protocol.errors import MeshrunError
from protocol.lifecycle import ComputeEvent, RequesterGone, RunSucceeded, SendFrame
from protocol.messages import BID_PROTOCOL, JOB_PROTOCOL, JOBS_TOPIC, Accept, JobSpec, Receipt
from storage.cid import DAG_PB, Cid, cid_for_raw, sha256_multihash
from storage.unixfs import (
    CHUNK_SIZE,
    FT_DIRECTORY,
    FT_FILE,
    PBLink,
    UnixFSData,
    encode_pbnode,
    encode_unixfs,
)

log = logging.getLogger("meshrun.misbehave")

ALLOW_ENV = "MESHRUN_ALLOW_MISBEHAVE"
BID_REPLAYS = 5  # the same signed Bid, sent this many times in all
FLOOD_SPECS = 2000  # specs a spec-flood node gossips, each signed by a fresh key
# Where the flooded specs say their requester listens: a closed port on loopback,
# so an honest node's answer costs it one refused dial at most (within its budget).
FLOOD_ADDR = "/ip4/127.0.0.1/tcp/9"
BOMB_LINKS = 4096  # links of the bomb's file node, all to one 256 KiB leaf
FORWARD_TIMEOUT = 5.0
PERTURB_TOLERANCES = 3.0  # how many tolerances a `perturb` node moves each float
REPLAY_MODELS = 16  # models whose first outputs a `replay` node keeps


class _Misbehaving(Compute):
    kind = ""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        log.warning("this compute node MISBEHAVES ON PURPOSE (%s); for tests only", self.kind)
        await super().run(task_status=task_status)

    async def _write(self, run: Run, data: bytes) -> None:
        """Write raw bytes on the job stream, with Compute._send's error handling."""
        try:
            async with run.send_lock:
                with trio.fail_after(ACCEPT_TIMEOUT):
                    await run.frames.write(data)
        except (BaseLibp2pError, OSError, EOFError, trio.TooSlowError) as exc:
            if not run.machine.finished:
                await self._feed(run, RequesterGone(type(exc).__name__))


class WrongKeyReceipt(_Misbehaving):
    """Its receipt is signed by a key that is not the one the requester accepted."""

    kind = "wrong-key-receipt"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._impostor = Identity.generate()

    async def _send(self, run: Run, effect: SendFrame) -> None:
        message = effect.message
        if not isinstance(message, Receipt):
            await super()._send(run, effect)
            return
        forged = message.model_copy(update={"provider": self._impostor.peer_id})
        log.warning(
            "misbehave: job %s: receipt signed by %s", run.machine.job_id, self._impostor.peer_id
        )
        await self._write(run, seal(self._impostor, forged))


class WrongCids(_Misbehaving):
    """Its receipt names an inputs CID that is not the job's."""

    kind = "wrong-cids"
    WRONG_INPUTS = str(cid_for_raw(b"meshrun misbehave: not the inputs of any job"))

    async def _feed(self, run: Run, event: ComputeEvent) -> None:
        if isinstance(event, RunSucceeded):
            receipt = event.receipt.model_copy(update={"inputs_cid": self.WRONG_INPUTS})
            log.warning("misbehave: job %s: receipt names wrong inputs", run.machine.job_id)
            event = RunSucceeded(receipt)
        await super()._feed(run, event)


class Silent(_Misbehaving):
    """Takes the job, then says nothing at all (no progress, no heartbeat), stream kept open.

    It still stops when the requester cancels or hangs up, as the honest node does.
    """

    kind = "silent"

    async def _run_job(self, run: Run) -> None:
        log.warning("misbehave: job %s: accepted, now silent", run.machine.job_id)
        await trio.sleep_forever()

    async def _heartbeat(self, run: Run) -> None:
        await trio.sleep_forever()


class BidReplay(_Misbehaving):
    """Sends its signed Bid (the very same bytes) BID_REPLAYS times."""

    kind = "bid-replay"

    async def _answer(self, envelope: bytes) -> None:
        await super()._answer(envelope)
        offer = self._offers.get(job_id_of(envelope))
        if offer is None:
            return  # declined, already seen, or the bid could not be sent
        data = seal(self.ctx.identity, offer.bid)  # Ed25519 is deterministic: same bytes
        spec = offer.spec
        for _ in range(BID_REPLAYS - 1):
            await self.ctx.mesh.answer(
                spec.requester, spec.requester_addrs, BID_PROTOCOL, data, "bid"
            )
        log.warning("misbehave: sent the bid for %s %d times", offer.bid.job_id, BID_REPLAYS)


class AcceptForward(_Misbehaving):
    """Forwards the Accept it won to every other peer on the jobs topic, then drops the job."""

    kind = "accept-forward"

    async def _on_job_stream(self, frames: Frames) -> None:
        try:
            with trio.fail_after(ACCEPT_TIMEOUT):
                data = await frames.read()
            opened = open_envelope(data, Accept)
        except (MeshrunError, trio.TooSlowError, BaseLibp2pError, EOFError):
            await frames.reset()
            return
        accept = opened.message
        assert isinstance(accept, Accept)
        self._forget_offer(accept.job_id)
        me = self.ctx.peer_id
        for peer in self.ctx.mesh.topic_peers(JOBS_TOPIC):
            if peer in (me, accept.requester):
                continue
            answer = await self._forward(peer, data)
            log.warning(
                "misbehave: forwarded the accept for %s to %s; it answered: %s",
                accept.job_id,
                peer,
                answer,
            )
        await frames.reset()  # the job is dropped: the requester must fail over

    async def _forward(self, peer: str, data: bytes) -> str:
        try:
            with trio.fail_after(FORWARD_TIMEOUT):
                frames = await self.ctx.mesh.open(peer, JOB_PROTOCOL)
                await frames.write(data)
                try:
                    reply = open_envelope(await frames.read()).message
                finally:
                    await frames.close()
        except (MeshrunError, trio.TooSlowError, BaseLibp2pError, EOFError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        message = getattr(reply, "message", "")
        return f"{reply.KIND} {getattr(reply, 'code', '')} {message}".strip()


class SpecFlood(_Misbehaving):
    """On hearing its first job, gossips FLOOD_SPECS validly signed specs from fresh keys.

    Each spec and the pubsub message carrying it are signed by a key made for
    it alone, so the gossip origin equals the spec's signer and every
    validator passes: only budgets stand between the flood and its victims.
    It never bids.
    """

    kind = "spec-flood"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flooding = False
        self._model = str(cid_for_raw(b"meshrun misbehave: a model that is never fetched"))

    async def _answer(self, envelope: bytes) -> None:
        if not self._flooding:
            self._flooding = True
            assert self._nursery is not None
            self._nursery.start_soon(self._flood)

    async def _flood(self) -> None:
        mesh = self.ctx.mesh
        sent = 0
        started = time.monotonic()
        for _ in range(FLOOD_SPECS):
            message = fresh_key_spec_message(self._model, FLOOD_ADDR)
            with trio.move_on_after(1.0):
                while mesh._fullest_queue(JOBS_TOPIC) >= OUTBOUND_HIGH_WATER:
                    await trio.sleep(0.002)
            try:
                await mesh.pubsub.push_msg(mesh.pubsub.my_id, message)
            except Exception as exc:  # peers hanging up on us is the expected end
                log.info("misbehave: flood push failed: %s", exc)
                continue
            sent += 1
            if sent % 50 == 0:
                await trio.sleep(0)
        log.warning(
            "misbehave: flooded %d job specs from fresh keys in %.1f s",
            sent,
            time.monotonic() - started,
        )


class DagBombResult(_Misbehaving):
    """Its receipt names a result DAG that is small on the wire and huge when read.

    A result directory whose `outputs/y.npy` is one UnixFS file node with
    BOMB_LINKS links, all to the same 256 KiB leaf, each link claiming a
    size of 1: ~190 KiB of blocks that declare a 1 GiB file.
    """

    kind = "dag-bomb-result"

    async def _feed(self, run: Run, event: ComputeEvent) -> None:
        if isinstance(event, RunSucceeded):
            root = await trio.to_thread.run_sync(self._plant_bomb)
            receipt = event.receipt.model_copy(update={"result_cid": str(root)})
            log.warning("misbehave: job %s: result is a DAG bomb %s", run.machine.job_id, root)
            event = RunSucceeded(receipt)
        await super()._feed(run, event)

    def _plant_bomb(self) -> Cid:
        blocks = dag_bomb()
        for cid, block in blocks.items():
            self.ctx.store.put(cid, block)
        return next(reversed(blocks))


class Zeros(_Misbehaving):
    """Publishes all-zero outputs (names, shapes and dtypes kept), validly signed."""

    kind = "zeros"

    def _outputs(self, spec: JobSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        log.warning("misbehave: publishing all-zero outputs")
        return {name: np.zeros_like(value) for name, value in outputs.items()}


class Perturb(_Misbehaving):
    """Moves every float element PERTURB_TOLERANCES times the job's tolerance away.

    Non-float outputs are left alone: exact comparison would catch any change.
    The move is monotone, so argmax and top-k answers survive it (rightly: it
    is wrong only where values are compared).
    """

    kind = "perturb"

    def _outputs(self, spec: JobSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        log.warning("misbehave: publishing outputs %g tolerances off", PERTURB_TOLERANCES)
        return {name: perturbed(value, spec) for name, value in outputs.items()}


class Replay(_Misbehaving):
    """Honest on a model's first job; every later job for it gets that job's outputs.

    It still runs the model (the hook sees the fresh outputs and drops them):
    nothing a requester can observe differs from a node that skipped the work.
    """

    kind = "replay"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first: dict[str, dict[str, np.ndarray]] = {}

    def _outputs(self, spec: JobSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = self._first.get(spec.model_cid)
        if kept is not None:
            log.warning("misbehave: replaying the first outputs of model %s", spec.model_cid)
            return dict(kept)
        if len(self._first) < REPLAY_MODELS:
            self._first[spec.model_cid] = {k: v.copy() for k, v in outputs.items()}
        return outputs


class Noise(_Misbehaving):
    """Honest, on "other hardware": 1 intra-op thread, no graph optimisation.

    Not an attack: the control that shows verification does not flag honest
    floating-point differences.
    """

    kind = "noise"

    def _run_options(self, spec: JobSpec) -> dict[str, Any]:
        return {"threads": 1, "optimize": False}


def perturbed(value: np.ndarray, spec: JobSpec) -> np.ndarray:
    """`value` moved just beyond the tolerance the job's outputs are compared with."""
    if value.dtype.kind != "f":
        return value
    atol, rtol = tolerance_for(value.dtype, spec.tolerance)
    wide = value.astype(np.float64)
    moved = wide + PERTURB_TOLERANCES * (atol + rtol * np.abs(wide))
    return moved.astype(value.dtype)


def fresh_key_spec_message(
    model_cid: str, requester_addr: str, ttl: float = 120.0
) -> rpc_pb2.Message:
    """A gossip message carrying a job spec, both signed by a key made for it alone.

    The pubsub origin equals the spec's signer, so every validator passes: the
    flood a Sybil attacker sends for free. The spec names `requester_addr` as
    where to answer (a victim, or a trap that counts the dials it provokes).
    """
    signer = Identity(os.urandom(32))
    now = time.time()
    spec = JobSpec(
        model_cid=model_cid,
        inputs_cid=model_cid,
        requester=signer.peer_id,
        requester_addrs=[requester_addr],
        nonce=os.urandom(16),
        created_at=now,
        expires_at=now + ttl,
        timeout_seconds=30.0,
        model_bytes=10,
        inputs_bytes=10,
    )
    keys = create_new_key_pair(signer.seed)
    message = rpc_pb2.Message(
        data=seal(signer, spec),
        topicIDs=[JOBS_TOPIC],
        from_id=ID.from_pubkey(keys.public_key).to_bytes(),
        seqno=os.urandom(8),
    )
    message.signature = keys.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + message.SerializeToString()
    )
    message.key = keys.public_key.serialize()
    return message


def dag_bomb(links: int = BOMB_LINKS) -> dict[Cid, bytes]:
    """The blocks of a bomb result package, the root directory last."""
    pattern = bytes((i * 131 + (i >> 8)) & 0xFF for i in range(4096))
    leaf = (pattern * (CHUNK_SIZE // len(pattern) + 1))[:CHUNK_SIZE]
    leaf_cid = cid_for_raw(leaf)
    data = encode_unixfs(
        UnixFSData(FT_FILE, filesize=len(leaf) * links, blocksizes=(len(leaf),) * links)
    )
    file_block = encode_pbnode([PBLink(leaf_cid, "", 1)] * links, data)
    file_cid = Cid(1, DAG_PB, sha256_multihash(file_block))
    file_tsize = len(file_block) + links  # what its own links claim
    outputs_block = encode_pbnode(
        [PBLink(file_cid, "y.npy", file_tsize)], encode_unixfs(UnixFSData(FT_DIRECTORY))
    )
    outputs_cid = Cid(1, DAG_PB, sha256_multihash(outputs_block))
    root_block = encode_pbnode(
        [PBLink(outputs_cid, "outputs", len(outputs_block) + file_tsize)],
        encode_unixfs(UnixFSData(FT_DIRECTORY)),
    )
    root_cid = Cid(1, DAG_PB, sha256_multihash(root_block))
    return {
        leaf_cid: leaf,
        file_cid: file_block,
        outputs_cid: outputs_block,
        root_cid: root_block,
    }


KINDS: Mapping[str, type[Compute]] = {
    cls.kind: cls
    for cls in (
        WrongKeyReceipt,
        WrongCids,
        Silent,
        BidReplay,
        AcceptForward,
        SpecFlood,
        DagBombResult,
        Zeros,
        Perturb,
        Replay,
        Noise,
    )
}


def check_misbehave(kind: str | None, mode: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a misbehaving node unless a devstack asked for it (ValueError says why)."""
    if kind is None:
        return
    if kind not in KINDS:
        raise ValueError(f"--misbehave: unknown kind {kind!r} (one of: {', '.join(KINDS)})")
    if mode != "compute":
        raise ValueError("--misbehave is for compute nodes only")
    env = os.environ if environ is None else environ
    if env.get(ALLOW_ENV) != "1":
        raise ValueError(
            f"--misbehave {kind} makes this node attack its peers on purpose; it is for tests "
            f"and `meshrun devstack --bad` only, and refused unless {ALLOW_ENV}=1 is set in "
            "the environment"
        )


def compute_class(kind: str | None) -> type[Compute]:
    """The compute role to build: the honest one, or the named misbehaving one."""
    return Compute if kind is None else KINDS[kind]


__all__ = ["ALLOW_ENV", "KINDS", "check_misbehave", "compute_class", "dag_bomb"]

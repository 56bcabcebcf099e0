"""The compute role: hear job specs, bid (or say why not), run accepted jobs in
the executor pool, publish the result package and send a signed receipt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio
from libp2p.exceptions import BaseLibp2pError

from crypto.envelope import open_envelope, seal
from node.blocks import fetch_dag
from node.context import NodeContext, job_id_of, open_gossip, spec_cid_of
from node.executor.pool import ExecutorPool
from node.mesh import Frames
from node.result_package import build_files
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.market import bid_delay
from protocol.messages import (
    BID_PROTOCOL,
    JOB_PROTOCOL,
    JOBS_TOPIC,
    Accept,
    Bid,
    Cancel,
    Failure,
    JobSpec,
    NoBid,
    Progress,
    Receipt,
)
from storage.cid import Cid

log = logging.getLogger("meshrun.compute")

ACCEPT_TIMEOUT = 10.0
MAX_MODEL_BYTES = 2 * 1024**3
MAX_INPUT_BYTES = 1024**3


@dataclass
class Offer:
    spec: JobSpec
    envelope: bytes
    spec_cid: str
    bid: Bid


class Compute:
    def __init__(
        self,
        ctx: NodeContext,
        pool: ExecutorPool,
        price: float = 1.0,
        device: str = "cpu",
        max_model_bytes: int = MAX_MODEL_BYTES,
        gpus: list[dict[str, Any]] | None = None,
    ) -> None:
        self.gpus = gpus or []
        self.ctx = ctx
        self.pool = pool
        self.price = price
        self.device = device
        self.max_model_bytes = max_model_bytes
        self._seen: dict[str, float] = {}
        self._offers: dict[str, Offer] = {}
        self._running = 0
        self.model_dir = ctx.data_dir / "models"
        self.model_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.ctx.mesh.handle(JOB_PROTOCOL, self._on_job_stream)
        subscription = await self.ctx.mesh.subscribe(JOBS_TOPIC, self._validate)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                message = await subscription.get()
                nursery.start_soon(self._consider, bytes(message.data))

    # ---- gossip -----------------------------------------------------------------

    def _validate(self, forwarder: str, origin: bytes, data: bytes) -> bool:
        """Gossip validator: only well-formed, correctly signed, unexpired specs pass.

        Rejecting here means gossipsub neither delivers nor forwards the message and
        scores the forwarder down; the log line names who sent it.
        """
        spec = open_gossip(data, JobSpec, forwarder, origin, "job spec")
        if spec is None:
            return False
        now = time.time()
        if spec.expires_at < now:
            log.info("dropped expired job spec from %s (requester %s)", forwarder, spec.requester)
            return False
        if spec.created_at > now + 300:
            log.warning("dropped job spec from %s: created in the future", forwarder)
            return False
        return True

    async def _consider(self, envelope: bytes) -> None:
        try:
            opened = open_envelope(envelope, JobSpec)
        except MeshrunError:
            return  # the validator already logged it
        spec = opened.message
        assert isinstance(spec, JobSpec)
        job_id = job_id_of(envelope)
        now = time.time()
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        if job_id in self._seen or spec.requester == self.ctx.peer_id:
            return
        self._seen[job_id] = spec.expires_at
        refusal = self._refusal(spec)
        if refusal is not None:
            reason, text = refusal
            reply: Bid | NoBid = NoBid(
                job_id=job_id, provider=self.ctx.peer_id, reason=reason, message=text
            )
            log.info("declining job %s: %s", job_id, text)
        else:
            eta = max(0.05, 0.5 * (1 + self._running))
            reply = Bid(
                job_id=job_id,
                provider=self.ctx.peer_id,
                price=self.price,
                eta_seconds=eta,
                execution_providers=self.pool.providers,
                device=self.device,
                created_at=now,
            )
            self._offers[job_id] = Offer(spec, envelope, spec_cid_of(opened), reply)
        await trio.sleep(
            bid_delay(job_id, self.ctx.peer_id, len(self.ctx.mesh.topic_peers(JOBS_TOPIC)))
        )
        try:
            self.ctx.mesh.remember_addrs(spec.requester, spec.requester_addrs)
            await self.ctx.mesh.send(spec.requester, BID_PROTOCOL, seal(self.ctx.identity, reply))
        except Exception as exc:
            log.warning(
                "could not send %s for %s to %s: %s", reply.KIND, job_id, spec.requester, exc
            )
            self._offers.pop(job_id, None)

    def _refusal(self, spec: JobSpec) -> tuple[str, str] | None:
        req = spec.requirements
        providers = self.pool.providers
        if req.provider == "cuda" and "CUDAExecutionProvider" not in providers:
            return "PROVIDER_UNAVAILABLE", "this node has no working CUDA provider"
        if req.provider == "tensorrt" and "TensorrtExecutionProvider" not in providers:
            return "PROVIDER_UNAVAILABLE", "this node has no working TensorRT provider"
        if req.gpu_count > len(self.gpus):
            have = f"{len(self.gpus)} GPU(s)" if self.gpus else "no GPU"
            return "NO_GPU", f"job needs {req.gpu_count} GPU(s); this node has {have}"
        if req.gpu_type and not any(
            req.gpu_type.lower() in str(g.get("name", "")).lower() for g in self.gpus
        ):
            return (
                "GPU_TYPE_MISMATCH",
                f"job needs a {req.gpu_type} GPU; this node has {self.device}",
            )
        if req.min_vram_gb > 0:
            vram = max((int(g.get("vram_bytes", 0)) for g in self.gpus), default=0) / 1024**3
            if vram < req.min_vram_gb:
                return (
                    "INSUFFICIENT_VRAM",
                    f"job needs {req.min_vram_gb:g} GB of GPU memory; this node has {vram:.1f} GB",
                )
        if spec.max_price is not None and self.price > spec.max_price:
            return "PRICE_TOO_LOW", f"max price {spec.max_price} is below this node's {self.price}"
        limit = min(self.max_model_bytes, req.max_model_bytes or self.max_model_bytes)
        if spec.model_bytes > limit:
            return "MODEL_TOO_LARGE", f"model of {spec.model_bytes} bytes exceeds {limit}"
        if spec.inputs_bytes > MAX_INPUT_BYTES:
            return (
                "INPUT_TOO_LARGE",
                f"inputs of {spec.inputs_bytes} bytes exceed {MAX_INPUT_BYTES}",
            )
        return None

    # ---- execution --------------------------------------------------------------

    async def _on_job_stream(self, frames: Frames) -> None:
        try:
            with trio.fail_after(ACCEPT_TIMEOUT):
                data = await frames.read()
            opened = open_envelope(data, Accept)
        except (MeshrunError, trio.TooSlowError, BaseLibp2pError) as exc:
            log.warning("dropped job stream from %s: %s", frames.remote_peer, exc)
            await frames.reset()
            return
        accept = opened.message
        assert isinstance(accept, Accept)
        offer = self._offers.pop(accept.job_id, None)
        if offer is None or accept.requester != offer.spec.requester:
            reason = "unknown job" if offer is None else "accept not signed by the job's requester"
            log.warning("refused accept for %s from %s: %s", accept.job_id, opened.signer, reason)
            await self._send(frames, self._failure(accept.job_id, ErrorCode.INVALID_SPEC, reason))
            await frames.close()
            return
        if accept.provider != self.ctx.peer_id:
            await frames.close()
            return
        self._running += 1
        try:
            await self._execute(frames, offer, accept)
        finally:
            self._running -= 1
            await frames.close()

    async def _send(self, frames: Frames, message: Progress | Receipt | Failure) -> None:
        await frames.write(seal(self.ctx.identity, message))

    def _failure(
        self,
        job_id: str,
        code: ErrorCode,
        message: str,
        retryable: bool = False,
        resources: dict[str, float] | None = None,
    ) -> Failure:
        return Failure(
            job_id=job_id,
            provider=self.ctx.peer_id,
            code=code.value,
            message=message,
            retryable=retryable,
            resources=resources or {},
        )

    async def _execute(self, frames: Frames, offer: Offer, accept: Accept) -> None:
        """Run an accepted job while watching its stream for a Cancel or a vanished requester."""
        spec, job_id = offer.spec, accept.job_id
        db = self.ctx.db
        db.create(job_id, "compute", spec.to_wire(), offer.envelope, spec.requester, spec.requester)
        db.move(job_id, JobStatus.BIDDING, "BidSent", self.ctx.peer_id, {"price": offer.bid.price})
        db.move(
            job_id, JobStatus.ASSIGNED, "BidAccepted", spec.requester, executor=self.ctx.peer_id
        )
        started = time.monotonic()
        stop_reason: list[str] = []

        async def watch(scope: trio.CancelScope) -> None:
            while True:
                try:
                    data = await frames.read()
                    opened = open_envelope(data, Cancel)
                except MeshrunError as exc:
                    log.warning("ignoring bad frame on job %s: %s", job_id, exc)
                    continue
                except (BaseLibp2pError, EOFError):
                    stop_reason.append("the requester went away")
                    scope.cancel()
                    return
                if opened.signer == spec.requester:
                    assert isinstance(opened.message, Cancel)
                    stop_reason.append(opened.message.reason or "canceled by the requester")
                    scope.cancel()
                    return

        async with trio.open_nursery() as nursery:
            work = trio.CancelScope()
            nursery.start_soon(watch, work)
            with work:
                await self._run_job(frames, offer, job_id)
            nursery.cancel_scope.cancel()

        if work.cancelled_caught:
            reason = stop_reason[0] if stop_reason else "stopped"
            used = {"wall_seconds": round(time.monotonic() - started, 3)}
            record = db.get(job_id)
            if not record.status.terminal:
                if record.status != JobStatus.CANCELING:
                    db.move(
                        job_id,
                        JobStatus.CANCELING,
                        "CancelRequested",
                        spec.requester,
                        {"reason": reason},
                    )
                db.move(
                    job_id,
                    JobStatus.CANCELED,
                    "Canceled",
                    spec.requester,
                    {"reason": reason, "resources": used},
                )
            log.info("job %s stopped: %s", job_id, reason)
            with trio.move_on_after(2.0), contextlib.suppress(BaseLibp2pError, OSError, EOFError):
                await self._send(
                    frames, self._failure(job_id, ErrorCode.CANCELED, reason, resources=used)
                )

    async def _run_job(self, frames: Frames, offer: Offer, job_id: str) -> None:
        spec = offer.spec
        db = self.ctx.db

        async def progress(substate: str, percent: float) -> None:
            db.update(job_id, substate=substate, progress=percent)
            await self._send(
                frames,
                Progress(
                    job_id=job_id,
                    provider=self.ctx.peer_id,
                    substate=substate,  # type: ignore[arg-type]
                    progress=percent,
                    at=time.time(),
                ),
            )

        started_at = time.time()
        timings: dict[str, float] = {}
        try:
            db.move(job_id, JobStatus.RUNNING, "ExecutionStarted", self.ctx.peer_id)
            await progress("warming_up", 0.0)
            t0 = time.perf_counter()
            model_cid, inputs_cid = Cid.decode(spec.model_cid), Cid.decode(spec.inputs_cid)
            for cid in (model_cid, inputs_cid):
                await fetch_dag(
                    self.ctx.mesh, self.ctx.store, cid, spec.requester, spec.timeout_seconds
                )
            model_path = await trio.to_thread.run_sync(self._model_file, model_cid)
            inputs = await trio.to_thread.run_sync(self.ctx.store.cat, inputs_cid)
            timings["fetch_ms"] = (time.perf_counter() - t0) * 1000
            await progress("processing", 5.0)

            async def on_progress(done: int, total: int) -> None:
                await progress("processing", 5.0 + 85.0 * done / max(total, 1))

            chunk = spec.params.get("batch_chunk")
            remaining = spec.timeout_seconds - (time.time() - started_at)
            result = await self.pool.run(
                spec.model_cid,
                model_path,
                inputs,
                max(remaining, 0.1),
                on_progress=on_progress,
                batch_chunk=int(chunk) if isinstance(chunk, (int, float)) and chunk else None,
                deterministic=bool(spec.params.get("deterministic", False)),
                log_level=str(spec.params.get("ort_log_level", "error")),
            )
            timings.update(result.timings)
            await progress("finalizing", 92.0)
            outputs = result.outputs
            if spec.output_names:
                unknown = sorted(set(spec.output_names) - set(outputs))
                if unknown:
                    raise MeshrunError(
                        ErrorCode.EXECUTION_FAILED,
                        f"the model has no output(s) {unknown}; it has {sorted(outputs)}",
                    )
                outputs = {name: outputs[name] for name in spec.output_names}
            files, digests = build_files(
                job_id,
                outputs,
                {
                    "model_cid": spec.model_cid,
                    "inputs_cid": spec.inputs_cid,
                    "executor": self.ctx.peer_id,
                    "execution_provider": result.provider,
                    "cold_start": result.cold_start,
                    "timings_ms": timings,
                },
                stderr=result.stderr,
            )
            await progress("uploading", 95.0)
            t1 = time.perf_counter()
            result_cid = await self.ctx.content.add_tree(files, f"job:{job_id}")
            timings["publish_ms"] = (time.perf_counter() - t1) * 1000
            resources = dict(result.resources)
            resources["wall_seconds"] = round(time.time() - started_at, 3)
            receipt = Receipt(
                job_id=job_id,
                spec_cid=offer.spec_cid,
                model_cid=spec.model_cid,
                inputs_cid=spec.inputs_cid,
                result_cid=str(result_cid),
                provider=self.ctx.peer_id,
                execution_provider=result.provider,
                device=self.device,
                output_digests=digests,
                timings_ms=timings,
                resources=resources,
                started_at=started_at,
                finished_at=time.time(),
            )
            await self._send(frames, receipt)
            db.move(
                job_id,
                JobStatus.COMPLETED,
                "ResultsPublished",
                self.ctx.peer_id,
                {"result_cid": str(result_cid)},
                result_cid=str(result_cid),
                receipt=receipt.to_wire(),
                progress=100.0,
            )
        except MeshrunError as exc:
            status = JobStatus.TIMEOUT if exc.code == ErrorCode.TIMEOUT else JobStatus.FAILED
            # A dead worker says nothing about the job: another node may well run it.
            retryable = exc.code == ErrorCode.EXECUTION_FAILED and "exit_code" in exc.details
            partial_cid = await self._publish_partial(job_id, spec, exc)
            details = {
                **exc.details,
                **({"partial_result_cid": partial_cid} if partial_cid else {}),
            }
            error = {"code": exc.code.value, "message": exc.message, "details": details}
            db.move(job_id, status, "Failed", self.ctx.peer_id, error, error=error)
            log.info("job %s failed here: %s", job_id, exc)
            failure = self._failure(job_id, exc.code, exc.message, retryable=retryable)
            if partial_cid:
                failure = failure.model_copy(update={"partial_result_cid": partial_cid})
            with contextlib.suppress(BaseLibp2pError, OSError, EOFError):
                await self._send(frames, failure)
        except (BaseLibp2pError, EOFError) as exc:
            error = {"code": ErrorCode.NODE_UNREACHABLE.value, "message": f"requester gone: {exc}"}
            db.move(job_id, JobStatus.FAILED, "Failed", self.ctx.peer_id, error, error=error)
            log.info("job %s abandoned: requester stream broke (%s)", job_id, exc)

    async def _publish_partial(self, job_id: str, spec: JobSpec, exc: MeshrunError) -> str | None:
        """Keep what a failed batched run finished, as a result package marked failed."""
        if not exc.partial_outputs:
            return None
        outputs = {k: v for k, v in exc.partial_outputs.items() if isinstance(v, np.ndarray)}
        files, _ = build_files(
            job_id,
            outputs,
            {
                "model_cid": spec.model_cid,
                "inputs_cid": spec.inputs_cid,
                "executor": self.ctx.peer_id,
                "error": exc.message,
            },
            status="failed",
        )
        return str(await self.ctx.content.add_tree(files, f"job:{job_id}"))

    def _model_file(self, cid: Cid) -> Path:
        """Models are run from files (onnxruntime maps them); one file per model CID."""
        path = self.model_dir / f"{cid}.onnx"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(self.ctx.store.cat(cid))
            os.replace(tmp, path)
        return path

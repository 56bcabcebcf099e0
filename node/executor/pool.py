"""The node-side handle on an executor worker process.

onnxruntime cannot be interrupted from Python and can take the whole process
down, so the node never runs a model itself: it talks to a child process over
trio pipes and, when a job overruns, is cancelled or the child dies, kills the
child and starts a fresh one for the next job. The price is a few hundred
milliseconds of worker start and the loss of warm sessions after a kill.

Memory is bounded the same way: the pool samples the worker's resident memory
while it lives and kills it past the per-job limit (RESOURCE_EXHAUSTED), and a
worker left holding more than half the limit after a job (onnxruntime's arena
keeps a job's peak) is replaced, so every job starts with at least half the
limit free. Inputs are checked against the limit from their headers before
the worker sees them. While a job runs on a GPU provider, the pool also samples
the device through NVML (node.executor.gpu) and adds its utilisation and memory
to the job's resources.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import trio

from node.aio import inline_if_small
from node.executor import gpu
from node.executor.framing import (
    END_OF_JOB_STDERR,
    HEADER,
    FrameError,
    decode_payload,
    encode_parts,
)
from node.executor.memory import (
    IDLE_POLL_S,
    POLL_S,
    check_job_memory,
    default_max_job_memory,
    rss_bytes,
)
from node.executor.providers import CPU, PREFERENCE, child_env, normalize_provider, probe_providers
from node.executor.tensors import TensorsTooLarge, decode_tensors, inspect_tensors
from protocol.errors import ErrorCode, MeshrunError

log = logging.getLogger(__name__)
worker_log = logging.getLogger("meshrun.executor.worker")

ProgressCallback = Callable[[int, int], Awaitable[None]]

_STDERR_TAIL_LINES = 20
_STOP_GRACE_S = 2.0
_STDERR_DRAIN_S = 1.0
_CAPTURE_LIMIT = 1 << 20
# onnxruntime's own log levels; a job may ask for its session's log in logs/stderr.log.
ORT_LOG_LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}
# Error codes a worker may name in its error reply (anything else is EXECUTION_FAILED).
_WORKER_CODES = {ErrorCode.RESOURCE_EXHAUSTED.value, ErrorCode.INPUT_TOO_LARGE.value}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Tensor bundles this small are checked and decoded on the event loop: for a few
# KiB a worker thread's hand-off costs more than the work (two per tiny job).
INLINE_TENSOR_BYTES = 64 * 1024


@dataclass
class ExecutionResult:
    """Outputs both decoded and as the worker's exact bytes.

    The bytes are what gets published and hashed for the receipt; re-encoding
    the decoded arrays could differ byte for byte and so change the result CID.
    """

    outputs: dict[str, np.ndarray]
    outputs_npz: bytes
    provider: str
    timings: dict[str, float]
    cold_start: bool
    resources: dict[str, float] = field(default_factory=dict)
    worker_pid: int = 0
    stderr: str = ""


class _WorkerGone(Exception):
    """The pipe broke or closed: the worker died (or was killed) under us."""


class _FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            want = max(65536, min(size - len(self._buffer), 16 << 20))
            try:
                chunk = await self._stream.receive_some(want)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _WorkerGone(str(exc)) from exc
            if not chunk:
                raise _WorkerGone("worker closed its output")
            self._buffer += chunk

    async def receive(self) -> dict[str, Any]:
        await self._fill(HEADER.size)
        (length,) = HEADER.unpack_from(self._buffer)
        end = HEADER.size + length
        await self._fill(end)
        if len(self._buffer) == end:
            # The usual case, a reply and nothing after it: decoded in place
            # rather than sliced out (two more copies of a 96 MB output).
            frame, self._buffer = self._buffer, bytearray()
            return decode_payload(memoryview(frame)[HEADER.size :])
        payload = bytes(memoryview(self._buffer)[HEADER.size : end])
        del self._buffer[:end]
        return decode_payload(payload)


PIPE_BYTES = 1 << 20


def _widen_pipes(process: trio.Process) -> None:
    """Pipes of 1 MiB instead of Linux's 64 KiB, where the system allows: a 96 MB
    output then crosses in ~100 reads instead of ~1,500, each a wake-up of the
    node's event loop. Best effort; elsewhere the default pipe is used."""
    setter = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setter is None:
        return
    for stream in (process.stdin, process.stdout):
        fileno = getattr(stream, "fileno", None)
        if fileno is None:
            continue
        with contextlib.suppress(OSError):
            fcntl.fcntl(fileno(), setter, PIPE_BYTES)


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdout is not None and process.stdin is not None
        self.reader = _FrameReader(process.stdout)
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.stderr_done = trio.Event()
        # While a job runs, what the model prints is also kept for its logs/stderr.log.
        self.capture: list[str] | None = None
        self.captured_bytes = 0
        self.job_stderr_done = trio.Event()
        # The resident memory at which the memory watch killed this worker.
        self.killed_at_rss: int | None = None
        # Starting (loading onnxruntime) or running a job: the memory watch samples
        # every POLL_S then, every IDLE_POLL_S otherwise, and wakes when work begins.
        self.busy = 1
        self.woke = trio.Event()

    def begin(self) -> None:
        self.busy += 1
        self.woke.set()

    def end(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self.woke = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            for part in encode_parts(message):
                await self.process.stdin.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _WorkerGone(str(exc)) from exc

    async def forward_stderr(self) -> None:
        """Worker stderr goes to the log line by line and the tail into crash reports."""
        stream = self.process.stderr
        pending = b""
        try:
            while stream is not None:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log_line(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if pending:
                self._log_line(pending)
            self.stderr_done.set()

    def _log_line(self, raw: bytes) -> None:
        text = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
        if text == END_OF_JOB_STDERR:
            self.job_stderr_done.set()
            return
        if text:
            self.stderr_tail.append(text)
            worker_log.warning("[worker %d] %s", self.pid, text)
            if self.capture is not None and self.captured_bytes < _CAPTURE_LIMIT:
                self.capture.append(text)
                self.captured_bytes += len(text) + 1

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "worker is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            text = f"worker process {self.pid} was killed by {name} (exit code {code})"
        else:
            text = f"worker process {self.pid} exited with code {code}"
        if self.stderr_tail:
            text += "; last stderr: " + " | ".join(list(self.stderr_tail)[-5:])
        return text


class _GpuWatch:
    """Samples a job's GPU every POLL_S seconds (the memory watch's cadence) until stopped."""

    def __init__(self, providers: list[str], device_id: int, pid: int) -> None:
        self._where = (providers, device_id, pid)
        self.sampler: gpu.GpuSampler | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    async def run(self) -> None:
        try:
            with self._scope:
                # NVML calls block (loading it, briefly each sample): off the event loop.
                sampler = await trio.to_thread.run_sync(gpu.sampler_for, *self._where)
                self.sampler = sampler
                while sampler is not None:
                    await trio.to_thread.run_sync(sampler.sample)
                    await trio.sleep(POLL_S)
        except Exception as exc:  # a figure is never worth a job
            log.debug("GPU sampling stopped: %s", exc)
        finally:
            self._done.set()

    def stop(self) -> None:
        self._scope.cancel()

    async def figures(self) -> dict[str, float]:
        """Stop, take one last sample (it covers the job's final moments) and sum up."""
        self.stop()
        await self._done.wait()
        if self.sampler is None:
            return {}
        await trio.to_thread.run_sync(self.sampler.sample)
        return self.sampler.resources()


class ExecutorPool:
    """Runs jobs on one device through one worker process, one job at a time.

    One pool per device: a GPU runs one model well, and a second worker would
    only fight over its memory. ``providers`` defaults to the quiet probe's
    answer; the worker starts on the first job (or :meth:`start`), so a node
    that never gets a job never pays for onnxruntime.
    """

    def __init__(
        self,
        providers: list[str] | None = None,
        threads: int | None = None,
        *,
        device_id: int = 0,
        cache_size: int = 4,
        start_timeout: float = 60.0,
        max_job_memory: int | None = None,
        max_input_bytes: int | None = None,
    ) -> None:
        self._providers = None if providers is None else [normalize_provider(p) for p in providers]
        self._threads = threads
        self._device_id = device_id
        self._cache_size = cache_size
        self._start_timeout = start_timeout
        # Bytes of resident memory the worker may hold while a job runs; inputs
        # are held to max_input_bytes uncompressed (by default the same).
        self._max_job_memory = check_job_memory(
            default_max_job_memory() if max_job_memory is None else max_job_memory
        )
        self._max_input_bytes = min(max_input_bytes or self._max_job_memory, self._max_job_memory)
        self._lock = trio.Lock()
        self._worker: _Worker | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self.last_start_ms: float | None = None
        # Worker processes started so far; every one after the first is a restart
        # (a crash, a kill past a limit, a recycle), which /metrics reports.
        self.worker_starts = 0

    async def __aenter__(self) -> ExecutorPool:
        if self._providers is None:
            self._providers = await trio.to_thread.run_sync(probe_providers)
        self._stack = AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with trio.CancelScope(shield=True):
            await self._stop_worker()
        assert self._stack is not None
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = None

    @property
    def providers(self) -> list[str]:
        return list(self._providers or [CPU])

    @property
    def max_job_memory(self) -> int:
        """The per-job memory limit in bytes, as advertised in bids."""
        return self._max_job_memory

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None and worker.process.returncode is None else None

    async def start(self) -> None:
        """Start the worker now, so the first job does not pay for it."""
        async with self._lock:
            await self._ensure_worker()

    async def run(
        self,
        model_cid: str,
        model_path: Path | str,
        inputs: bytes,
        timeout: float,
        on_progress: ProgressCallback | None = None,
        batch_chunk: int | None = None,
        provider: str | None = None,
        deterministic: bool = False,
        log_level: str = "error",
        threads: int | None = None,
        optimize: bool = True,
    ) -> ExecutionResult:
        """Run one job; ``timeout`` counts from when a ready worker gets the job.

        Worker start has its own ``start_timeout`` so a cold node is not blamed
        for the requester's tight limit. ``deterministic`` forces CPU with one
        thread, for results that must match bit for bit across runs.
        ``threads`` (intra-op threads) and ``optimize=False`` (no graph
        optimisation) change this job's session only: honest runs that differ
        in their last bits, as another executor's would.
        """
        if not timeout > 0 or math.isinf(timeout) or math.isnan(timeout):
            raise ValueError("timeout must be a positive finite number of seconds")
        if batch_chunk is not None and batch_chunk < 1:
            raise ValueError("batch_chunk must be at least 1")
        chain = self._provider_chain(provider, deterministic)
        await self._check_inputs(model_cid, inputs)
        request: dict[str, Any] = {
            "op": "run",
            "model_cid": model_cid,
            "model_path": str(model_path),
            "inputs": inputs,
            "providers": chain,
            "threads": 1 if deterministic else threads or self._threads,
            "deterministic": deterministic,
            "optimize": optimize,
            "log_severity": ORT_LOG_LEVELS.get(log_level, 3),
            "batch_chunk": batch_chunk,
            "max_input_bytes": self._max_input_bytes,
        }
        async with self._lock:
            started = time.perf_counter()
            worker, start_ms = await self._ensure_worker()
            worker.capture, worker.captured_bytes = [], 0
            worker.job_stderr_done = trio.Event()
            gpu_watch = self._watch_gpu(chain, worker)
            try:
                with trio.move_on_after(timeout) as deadline:
                    reply = await self._exchange(worker, request, on_progress)
            except _WorkerGone:
                with trio.CancelScope(shield=True):
                    await self._reap(worker)
                if worker.killed_at_rss is not None:
                    raise self._exhausted(model_cid, worker.killed_at_rss) from None
                raise MeshrunError(
                    ErrorCode.EXECUTION_FAILED,
                    f"{worker.describe_exit()} while running model {model_cid}",
                    {"model_cid": model_cid, "exit_code": worker.process.returncode},
                ) from None
            except BaseException:
                # Cancelled, or the progress callback raised: the worker is mid-job
                # and its stream out of step, so it cannot serve another job.
                with trio.CancelScope(shield=True):
                    await self._kill_worker()
                raise
            finally:
                if gpu_watch is not None:
                    gpu_watch.stop()
            if deadline.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await self._kill_worker()
                raise MeshrunError(
                    ErrorCode.TIMEOUT,
                    f"model {model_cid} ran past its {timeout:g} s limit; worker killed",
                    {"model_cid": model_cid, "timeout_s": timeout},
                )
            total_ms = (time.perf_counter() - started) * 1000.0
            gpu_figures: dict[str, float] = {}
            if gpu_watch is not None and reply.get("provider") in gpu.GPU_PROVIDERS:
                gpu_figures = await gpu_watch.figures()
            with trio.move_on_after(_STDERR_DRAIN_S):
                await worker.job_stderr_done.wait()
            captured, worker.capture = worker.capture or [], None
            await self._recycle_if_bloated(worker, reply)
        if reply.get("type") == "error":
            code = reply.get("code")
            error = MeshrunError(
                ErrorCode(code) if code in _WORKER_CODES else ErrorCode.EXECUTION_FAILED,
                # onnxruntime names the model file; peers get its name, not our path.
                str(reply.get("message", "unknown worker error")).replace(
                    str(model_path), Path(model_path).name
                ),
                {"model_cid": model_cid, "stage": reply.get("stage", "run")},
            )
            if error.code is ErrorCode.RESOURCE_EXHAUSTED:
                error.details["limit_bytes"] = self._max_job_memory
            partial = reply.get("partial")
            if isinstance(partial, bytes):
                done = await trio.to_thread.run_sync(decode_tensors, partial)
                error.partial_outputs = dict(done)
                error.details["partial_items"] = int(next(iter(done.values())).shape[0])
            raise error
        npz = reply["outputs"]
        try:
            outputs = await inline_if_small(len(npz), INLINE_TENSOR_BYTES, decode_tensors, npz)
        except ValueError as exc:
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED, f"worker sent bad outputs: {exc}"
            ) from None
        timings = {k: float(v) for k, v in reply.get("timings", {}).items()}
        timings["worker_start_ms"] = start_ms
        timings["total_ms"] = total_ms
        return ExecutionResult(
            outputs=outputs,
            outputs_npz=npz,
            provider=str(reply["provider"]),
            timings=timings,
            cold_start=bool(reply["cold_start"]),
            resources={k: float(v) for k, v in reply.get("resources", {}).items()} | gpu_figures,
            worker_pid=worker.pid,
            stderr="\n".join(captured) + ("\n" if captured else ""),
        )

    async def _check_inputs(self, model_cid: str, inputs: bytes) -> None:
        """Refuse a malformed or oversized bundle from its headers, before any worker sees it."""
        try:
            await inline_if_small(
                len(inputs), INLINE_TENSOR_BYTES, inspect_tensors, inputs, self._max_input_bytes
            )
        except TensorsTooLarge as exc:
            raise MeshrunError(
                ErrorCode.INPUT_TOO_LARGE,
                f"{exc} (this node's per-job limit); refused before loading",
                {"model_cid": model_cid, "inputs_bytes": exc.total, "limit_bytes": exc.limit},
            ) from None
        except ValueError as exc:
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED, str(exc), {"model_cid": model_cid, "stage": "inputs"}
            ) from None

    def _exhausted(self, model_cid: str, rss: int) -> MeshrunError:
        return MeshrunError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"model {model_cid} used {rss / 2**20:.0f} MiB, over this node's per-job memory "
            f"limit of {self._max_job_memory / 2**20:.0f} MiB; worker killed",
            {"model_cid": model_cid, "rss_bytes": rss, "limit_bytes": self._max_job_memory},
        )

    async def _watch_memory(self, worker: _Worker) -> None:
        """Kill ``worker`` as soon as its resident memory passes the per-job limit.

        Sampled every POLL_S seconds while the worker starts or runs a job, so a
        job can overshoot by what it allocates and touches in one interval (tens
        of MB per core at a few GB/s of page faults) before it is stopped. An
        idle worker allocates nothing, so between jobs it is sampled every
        IDLE_POLL_S and the watch wakes as soon as a job is handed over: sampling
        at 20 Hz for the worker's whole life cost an idle compute node half of its
        event loop's wake-ups, 32 idle nodes on one machine 28 % of a core.
        """
        while worker.process.returncode is None:
            rss = rss_bytes(worker.pid)
            if rss is not None and rss > self._max_job_memory:
                worker.killed_at_rss = rss
                log.warning(
                    "worker %d holds %d MiB, over the %d MiB job limit: killing it",
                    worker.pid,
                    rss >> 20,
                    self._max_job_memory >> 20,
                )
                worker.process.kill()
                return
            if worker.busy:
                await trio.sleep(POLL_S)
            else:
                with trio.move_on_after(IDLE_POLL_S):
                    await worker.woke.wait()

    def _watch_gpu(self, chain: list[str], worker: _Worker) -> _GpuWatch | None:
        """Start sampling the worker's GPU for one job run with ``chain``; None off the GPU."""
        if not gpu.runs_on_gpu(chain) or self._nursery is None:
            return None
        watch = _GpuWatch(chain, self._device_id, worker.pid)
        self._nursery.start_soon(watch.run)
        return watch

    async def _recycle_if_bloated(self, worker: _Worker, reply: dict[str, Any]) -> None:
        """Replace a worker that ran out of memory or still holds over half the limit.

        onnxruntime's CPU arena keeps a job's peak allocation for the session's
        life, so without this a worker would carry one job's high-water mark
        into the next (and idle with it).
        """
        rss = rss_bytes(worker.pid) or 0
        if reply.get("code") == ErrorCode.RESOURCE_EXHAUSTED.value:
            reason = "its job ran out of memory"
        elif rss > self._max_job_memory // 2:
            reason = f"it holds {rss >> 20} MiB after its job"
        else:
            return
        log.info("replacing executor worker %d: %s", worker.pid, reason)
        with trio.CancelScope(shield=True):
            await self._kill_worker()

    def _provider_chain(self, provider: str | None, deterministic: bool) -> list[str]:
        available = self.providers
        if deterministic:
            return [CPU]
        if provider is None:
            return available
        try:
            wanted = normalize_provider(provider)
        except ValueError as exc:
            raise MeshrunError(ErrorCode.EXECUTION_FAILED, str(exc)) from None
        if wanted not in available:
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED,
                f"provider {wanted} does not work on this node (working: {', '.join(available)})",
            )
        return [
            p
            for p in PREFERENCE
            if p in available and PREFERENCE.index(p) >= PREFERENCE.index(wanted)
        ]

    async def _exchange(
        self, worker: _Worker, request: dict[str, Any], on_progress: ProgressCallback | None
    ) -> dict[str, Any]:
        worker.begin()
        try:
            await worker.send(request)
            while True:
                try:
                    message = await worker.reader.receive()
                except FrameError as exc:
                    raise _WorkerGone(f"garbled frame from worker: {exc}") from exc
                kind = message.get("type")
                if kind == "progress":
                    if on_progress is not None:
                        await on_progress(int(message["done"]), int(message["total"]))
                elif kind in ("result", "error"):
                    return message
                else:
                    log.warning("ignoring unexpected worker frame %r", kind)
        finally:
            worker.end()

    async def _ensure_worker(self) -> tuple[_Worker, float]:
        """The live worker, starting one if needed; returns it and the start cost in ms."""
        worker = self._worker
        if worker is not None:
            if worker.process.returncode is None:
                return worker, 0.0
            log.warning("%s between jobs; starting a new one", worker.describe_exit())
            await self._reap(worker)
        if self._nursery is None:
            raise RuntimeError("use ExecutorPool inside 'async with'")
        command = [
            sys.executable,
            "-m",
            "node.executor.worker",
            "--device-id",
            str(self._device_id),
            "--cache-size",
            str(self._cache_size),
        ]
        started = time.perf_counter()
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        _widen_pipes(process)
        worker = _Worker(process)
        self._worker = worker
        self.worker_starts += 1
        self._nursery.start_soon(worker.forward_stderr)
        self._nursery.start_soon(self._watch_memory, worker)
        try:
            with trio.fail_after(self._start_timeout):
                ready = await worker.reader.receive()
        except (_WorkerGone, FrameError, trio.TooSlowError) as exc:
            with trio.CancelScope(shield=True):
                await self._kill_worker()
            reason = (
                worker.describe_exit()
                if not isinstance(exc, trio.TooSlowError)
                else (f"no ready signal within {self._start_timeout:g} s")
            )
            if worker.killed_at_rss is not None:
                reason = (
                    f"it used {worker.killed_at_rss >> 20} MiB starting, over the per-job "
                    f"memory limit of {self._max_job_memory >> 20} MiB"
                )
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED, f"executor worker failed to start: {reason}"
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._kill_worker()
            raise
        if ready.get("type") != "ready":
            with trio.CancelScope(shield=True):
                await self._kill_worker()
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED, f"executor worker sent {ready.get('type')!r} first"
            )
        worker.end()
        start_ms = (time.perf_counter() - started) * 1000.0
        self.last_start_ms = start_ms
        log.info("executor worker %d ready in %.0f ms", worker.pid, start_ms)
        return worker, start_ms

    async def _kill_worker(self) -> None:
        worker = self._worker
        if worker is None:
            return
        if worker.process.returncode is None:
            worker.process.kill()
        await self._reap(worker)

    async def _reap(self, worker: _Worker) -> None:
        """Wait for a dead (or dying) worker and release its pipes; must run shielded."""
        with trio.move_on_after(_STOP_GRACE_S):
            await worker.process.wait()
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
        for stream in (worker.process.stdin, worker.process.stdout):
            if stream is not None:
                await stream.aclose()
        with trio.move_on_after(_STDERR_DRAIN_S):
            await worker.stderr_done.wait()
        if worker.process.stderr is not None:
            await worker.process.stderr.aclose()
        if self._worker is worker:
            self._worker = None

    async def _stop_worker(self) -> None:
        """Let the worker finish cleanly on EOF, killing it only if it lingers."""
        worker = self._worker
        if worker is None:
            return
        if worker.process.stdin is not None:
            await worker.process.stdin.aclose()
        with trio.move_on_after(_STOP_GRACE_S):
            await worker.process.wait()
        await self._kill_worker()

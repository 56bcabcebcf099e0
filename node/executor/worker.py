"""The executor worker: a child process that runs models for one device.

It exists so that a model which crashes onnxruntime, spins forever or eats all
memory costs the node one process restart, never the node itself.
It speaks length-prefixed CBOR frames (``framing``) on stdin/stdout, one job at
a time, and keeps recently used sessions so a repeated model is a warm start.

Start: ``python -m node.executor.worker [--device-id N] [--cache-size N]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from node.executor.framing import END_OF_JOB_STDERR, FrameError, read_frame, write_frame
from node.executor.providers import CPU, CUDA, TENSORRT
from node.executor.tensors import TensorsTooLarge, decode_tensors, encode_tensors

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

Progress = Callable[[int, int], None]

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


# How onnxruntime and the C++ runtime word an allocation that failed.
_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "Cannot allocate memory")


class JobError(Exception):
    """A job failed for a reason the requester should read; the worker is fine."""

    def __init__(
        self, stage: str, message: str, partial: bytes | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        # Outputs of the batch items that finished before the failure (an .npz bundle).
        self.partial = partial
        # An ErrorCode name when the failure is not plain EXECUTION_FAILED.
        self.code = code


def _out_of_memory(message: str) -> bool:
    return any(marker in message for marker in _OUT_OF_MEMORY)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _describe_arg(arg: Any) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in (arg.shape or []))
    return f"{arg.name}: {_ORT_DTYPES.get(arg.type, arg.type)}[{dims}]"


class Runner:
    """Session cache plus one job's validate / chunk / run / encode cycle."""

    def __init__(self, cache_size: int, device_id: int) -> None:
        import onnxruntime

        self._ort = onnxruntime
        self._cache_size = max(1, cache_size)
        self._device_id = device_id
        self._sessions: OrderedDict[tuple[Any, ...], ort.InferenceSession] = OrderedDict()

    def handle(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        try:
            return self._run(request, progress)
        except JobError as exc:
            reply: dict[str, Any] = {"type": "error", "stage": exc.stage, "message": exc.message}
            if exc.partial is not None:
                reply["partial"] = exc.partial
            code = exc.code or ("RESOURCE_EXHAUSTED" if _out_of_memory(exc.message) else None)
        except MemoryError:
            reply = {"type": "error", "stage": "run", "message": "out of memory"}
            code = "RESOURCE_EXHAUSTED"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            reply = {"type": "error", "stage": "run", "message": message}
            code = "RESOURCE_EXHAUSTED" if _out_of_memory(message) else None
        if code is not None:
            reply["code"] = code
        return reply

    def _run(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        try:
            inputs = decode_tensors(request["inputs"], request.get("max_input_bytes"))
        except TensorsTooLarge as exc:
            raise JobError("inputs", str(exc), code="INPUT_TOO_LARGE") from None
        except ValueError as exc:
            raise JobError("inputs", str(exc)) from None
        timings["decode_ms"] = _ms(start)

        start = time.perf_counter()
        session, cold = self._session(request)
        timings["load_ms"] = _ms(start) if cold else 0.0

        self._validate(session, inputs, request["model_cid"])
        batch = self._batch_size(session, inputs)
        total = batch if batch is not None else 1
        chunk = request.get("batch_chunk")
        if chunk is not None and batch is None:
            raise JobError(
                "inputs",
                "batch_chunk needs every input to have a dynamic leading (batch) dimension "
                "of the same size",
            )
        progress(0, total)

        start = time.perf_counter()
        names = [out.name for out in session.get_outputs()]
        if chunk is None or batch is None or chunk >= batch or batch == 0:
            results = session.run(names, inputs)
            outputs = dict(zip(names, results, strict=True))
            progress(total, total)
            chunks = 1
        else:
            outputs, chunks = self._run_chunked(session, names, inputs, batch, chunk, progress)
        timings["run_ms"] = _ms(start)

        start = time.perf_counter()
        for name, value in outputs.items():
            if value.dtype.hasobject:
                outputs[name] = value.astype(str)
        payload = encode_tensors(outputs)
        timings["encode_ms"] = _ms(start)

        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (usage_after.ru_utime - usage_before.ru_utime) + (
            usage_after.ru_stime - usage_before.ru_stime
        )
        return {
            "type": "result",
            "outputs": payload,
            "provider": session.get_providers()[0],
            "cold_start": cold,
            "timings": timings,
            "resources": {"cpu_s": cpu_s, "max_rss_mb": usage_after.ru_maxrss / 1024.0},
            "batch": {"total": total, "chunks": chunks},
        }

    def _run_chunked(
        self,
        session: ort.InferenceSession,
        names: list[str],
        inputs: dict[str, np.ndarray],
        batch: int,
        chunk: int,
        progress: Progress,
    ) -> tuple[dict[str, np.ndarray], int]:
        import numpy as np

        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        chunks = 0
        for lo in range(0, batch, chunk):
            hi = min(lo + chunk, batch)
            try:
                results = session.run(names, {k: v[lo:hi] for k, v in inputs.items()})
            except Exception as exc:
                done = {name: np.concatenate(values) for name, values in parts.items() if values}
                raise JobError(
                    "run",
                    f"items {lo}..{hi - 1} of {batch} failed: {type(exc).__name__}: {exc}",
                    partial=encode_tensors(done) if done and lo > 0 else None,
                ) from None
            for name, value in zip(names, results, strict=True):
                if value.ndim == 0 or value.shape[0] != hi - lo:
                    raise JobError(
                        "run",
                        f"output {name!r} has shape {value.shape} for a chunk of {hi - lo} items, "
                        "so it is not batch-major; run this model without batch_chunk",
                    )
                parts[name].append(value)
            chunks += 1
            progress(hi, batch)
        return {name: np.concatenate(values) for name, values in parts.items()}, chunks

    def _session(self, request: dict[str, Any]) -> tuple[ort.InferenceSession, bool]:
        chain: list[str] = list(request["providers"])
        threads: int | None = request.get("threads")
        deterministic = bool(request.get("deterministic"))
        severity = int(request.get("log_severity", 3))
        optimize = bool(request.get("optimize", True))
        key = (request["model_cid"], tuple(chain), threads, deterministic, severity, optimize)
        cached = self._sessions.get(key)
        if cached is not None:
            self._sessions.move_to_end(key)
            return cached, False

        ort_ = self._ort
        options = ort_.SessionOptions()
        options.log_severity_level = severity
        if threads:
            options.intra_op_num_threads = threads
        if not optimize:
            options.graph_optimization_level = ort_.GraphOptimizationLevel.ORT_DISABLE_ALL
        if deterministic:
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = ort_.ExecutionMode.ORT_SEQUENTIAL
            options.use_deterministic_compute = True
        providers: list[tuple[str, dict[str, str]]] = []
        for name in chain:
            if name in (CUDA, TENSORRT):
                providers.append((name, {"device_id": str(self._device_id)}))
            else:
                providers.append((name, {}))
        if CPU not in chain:
            providers.append((CPU, {}))
        try:
            session = ort_.InferenceSession(request["model_path"], options, providers=providers)
        except Exception as exc:
            raise JobError(
                "load", f"cannot load model {request['model_cid']}: {type(exc).__name__}: {exc}"
            ) from None
        self._sessions[key] = session
        while len(self._sessions) > self._cache_size:
            self._sessions.popitem(last=False)
        return session, True

    @staticmethod
    def _validate(session: ort.InferenceSession, inputs: dict[str, np.ndarray], cid: str) -> None:
        declared = {arg.name: arg for arg in session.get_inputs()}
        overridable = {arg.name for arg in session.get_overridable_initializers()}
        expected = "; ".join(_describe_arg(arg) for arg in declared.values())
        problems: list[str] = []
        for name, arg in declared.items():
            if name not in inputs:
                problems.append(f"missing input {name!r}")
                continue
            value = inputs[name]
            want = _ORT_DTYPES.get(arg.type)
            got = value.dtype
            if want == "str":
                if got.kind not in "US":
                    problems.append(f"input {name!r} has dtype {got}, the model expects strings")
            elif want is not None and got.name != want:
                problems.append(f"input {name!r} has dtype {got}, the model expects {want}")
            shape = arg.shape
            if shape is None:
                continue
            if value.ndim != len(shape):
                problems.append(
                    f"input {name!r} has shape {value.shape} (rank {value.ndim}), "
                    f"the model expects rank {len(shape)}"
                )
                continue
            for axis, (dim, size) in enumerate(zip(shape, value.shape, strict=True)):
                if isinstance(dim, int) and dim != size:
                    problems.append(
                        f"input {name!r} has shape {value.shape}, the model expects "
                        f"size {dim} on axis {axis}"
                    )
        for name in inputs:
            if name not in declared and name not in overridable:
                problems.append(f"unexpected input {name!r}")
        if problems:
            raise JobError(
                "inputs",
                f"inputs do not match model {cid}: "
                + "; ".join(problems)
                + f" (model inputs: {expected})",
            )

    @staticmethod
    def _batch_size(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> int | None:
        sizes = set()
        for arg in session.get_inputs():
            if not arg.shape or isinstance(arg.shape[0], int):
                return None
            sizes.add(inputs[arg.name].shape[0])
        for out in session.get_outputs():
            if out.shape and isinstance(out.shape[0], int):
                return None
        return sizes.pop() if len(sizes) == 1 else None


def _exit_when_orphaned(parent: int) -> None:
    """A worker stuck in a model never reads stdin, so it would not notice EOF."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def serve(requests: IO[bytes], replies: IO[bytes], runner: Runner) -> int:
    def progress(done: int, total: int) -> None:
        write_frame(replies, {"type": "progress", "done": done, "total": total})

    while True:
        try:
            request = read_frame(requests)
        except FrameError as exc:
            print(f"meshrun worker: bad request frame: {exc}", file=sys.stderr)
            return 2
        if request is None:
            return 0
        op = request.get("op")
        if op == "run":
            reply = runner.handle(request, progress)
            # Everything the job wrote to fd 2 is in the pipe before this line, so the
            # parent knows its capture of the job's stderr is complete when it sees it.
            print(END_OF_JOB_STDERR, file=sys.stderr, flush=True)
            write_frame(replies, reply)
        elif op == "ping":
            write_frame(replies, {"type": "pong"})
        else:
            write_frame(
                replies, {"type": "error", "stage": "protocol", "message": f"unknown op {op!r}"}
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.executor.worker")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--cache-size", type=int, default=4)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # Frames get a private copy of stdout; fd 1 then points at stderr so a stray
    # print (onnxruntime prints some provider errors) cannot corrupt the stream.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    runner = Runner(cache_size=args.cache_size, device_id=args.device_id)
    write_frame(
        replies,
        {
            "type": "ready",
            "pid": os.getpid(),
            "import_ms": _ms(started),
            "onnxruntime": onnxruntime.__version__,
        },
    )
    return serve(sys.stdin.buffer, replies, runner)


if __name__ == "__main__":
    sys.exit(main())

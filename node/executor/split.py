"""Data-parallel runs: one job's batch split across several of the node's devices.

Why: a job spec may ask for ``gpu_count: k`` with k > 1. One worker process
drives one device (see :mod:`node.executor.pool`), so the way to use k devices
for one job is to cut the batch into k pieces, run piece i on device i at the
same time, and glue the outputs back together.

Why contiguous pieces: item j of the batch lands in exactly one piece, at a
position that only depends on j and the piece sizes (``np.array_split``: the
first ``B % k`` pieces get one item more). Concatenating the pieces' outputs in
piece order therefore puts every output row back where an unsplit run would
have put it, so the merged bundle is the one a single device would have
published (byte for byte where the model computes each item independently of
its neighbours, which the tests check for a real model).

Why refuse instead of guessing: splitting is only correct when every input
carries the batch on axis 0 and every output returns it on axis 0. Inputs are
checked before anything runs (``INVALID_SPEC``: the spec asked for a split its
inputs cannot take); outputs can only be checked after the parts ran
(``EXECUTION_FAILED``: the model is not batch-major). A model whose first axis
means something else (a sequence, a fixed-size table) would otherwise return
plausible garbage: concatenating along the wrong axis, or summing parts that
should have been one reduction, is never noticed downstream.

Threat model: the inputs and the part count come from a stranger's spec.

- Mismatched leading dimensions, scalars, an empty batch or no inputs at all
  are refused from the bundle's headers, before any tensor is loaded.
- The number of parts is ``min(len(pools), B)``: a spec cannot make the node
  spawn work beyond the devices it has, nor create empty parts.
- Memory: the bundle is held to the smallest per-job limit of the pools before
  it is decoded in the node's own process (the same bound a one-device job has
  in its worker). While the parts run, the node holds the encoded parts: one
  extra copy of the inputs (the caller still owns the original bytes).
  Splitting itself briefly also holds the decoded arrays, whose slices are
  views, so only the encoding adds bytes; the arrays are dropped before any
  part starts. Each part is checked again by its pool against its own limit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import trio

from node.executor.pool import ExecutionResult, ExecutorPool, ProgressCallback
from node.executor.tensors import (
    TensorHeader,
    TensorsTooLarge,
    decode_tensors,
    encode_tensors,
    inspect_tensors,
)
from protocol.errors import ErrorCode, MeshrunError

log = logging.getLogger(__name__)

# Resource keys whose values add up across parts (each part's worker spends its
# own CPU time); every other key (max_rss_mb: one process's peak) is a maximum.
_ADDITIVE_RESOURCES = frozenset({"cpu_s"})
_ADDITIVE_SUFFIXES = ("_bytes",)


def _describe(headers: Mapping[str, TensorHeader]) -> str:
    return ", ".join(f"{name!r} {tuple(h.shape)}" for name, h in headers.items())


def _batch_size(headers: Mapping[str, TensorHeader], parts: int) -> int:
    """The batch size every input shares on axis 0, or INVALID_SPEC saying why not."""
    why = f"cannot split the batch across {parts} devices"
    if not headers:
        raise MeshrunError(ErrorCode.INVALID_SPEC, f"{why}: the job has no inputs")
    scalars = [name for name, h in headers.items() if len(h.shape) == 0]
    if scalars:
        raise MeshrunError(
            ErrorCode.INVALID_SPEC,
            f"{why}: input(s) {', '.join(map(repr, scalars))} are scalars with no batch "
            f"dimension (inputs: {_describe(headers)})",
            {"inputs": {name: list(h.shape) for name, h in headers.items()}},
        )
    leading = {h.shape[0] for h in headers.values()}
    if len(leading) > 1:
        raise MeshrunError(
            ErrorCode.INVALID_SPEC,
            f"{why}: the inputs do not share a leading (batch) dimension "
            f"(inputs: {_describe(headers)}); run it on one device",
            {"inputs": {name: list(h.shape) for name, h in headers.items()}},
        )
    (batch,) = leading
    if batch < 1:
        raise MeshrunError(
            ErrorCode.INVALID_SPEC,
            f"{why}: the batch is empty (inputs: {_describe(headers)})",
            {"inputs": {name: list(h.shape) for name, h in headers.items()}},
        )
    return batch


def _bundle_error(exc: ValueError) -> MeshrunError:
    if isinstance(exc, TensorsTooLarge):
        return MeshrunError(
            ErrorCode.INPUT_TOO_LARGE,
            f"{exc} (this node's per-job limit); refused before splitting",
            {"inputs_bytes": exc.total, "limit_bytes": exc.limit},
        )
    return MeshrunError(ErrorCode.EXECUTION_FAILED, str(exc), {"stage": "inputs"})


def split_sizes(batch: int, parts: int) -> list[int]:
    """Sizes of ``min(parts, batch)`` contiguous pieces, as equal as possible, larger first."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    count = min(parts, batch)
    base, extra = divmod(batch, count)
    return [base + 1 if i < extra else base for i in range(count)]


def split_inputs(inputs_npz: bytes, parts: int, *, max_bytes: int | None = None) -> list[bytes]:
    """Cut a bundle into ``min(parts, B)`` contiguous pieces along the shared batch axis.

    Refused with INVALID_SPEC when the inputs have no common leading dimension
    B >= 1 (a scalar, disagreeing first axes, no inputs); ``max_bytes`` bounds
    what decoding may allocate (INPUT_TOO_LARGE), and a malformed bundle is
    EXECUTION_FAILED as in :meth:`ExecutorPool.run`. A single piece is the
    original bytes; otherwise each piece is a fresh :func:`encode_tensors` bundle.
    """
    return _split(inputs_npz, parts, max_bytes)[0]


def _split(inputs_npz: bytes, parts: int, max_bytes: int | None) -> tuple[list[bytes], list[int]]:
    if parts < 1:
        raise ValueError("parts must be at least 1")
    try:
        headers = inspect_tensors(inputs_npz, max_bytes)
    except ValueError as exc:
        raise _bundle_error(exc) from None
    sizes = split_sizes(_batch_size(headers, parts), parts)
    if len(sizes) == 1:
        return [inputs_npz], sizes
    try:
        tensors = decode_tensors(inputs_npz, max_bytes)
    except ValueError as exc:
        raise _bundle_error(exc) from None
    pieces: list[bytes] = []
    lo = 0
    for size in sizes:
        # Slices are views: only the encoded piece allocates.
        pieces.append(encode_tensors({name: v[lo : lo + size] for name, v in tensors.items()}))
        lo += size
    return pieces, sizes


def merge_outputs(
    parts: Sequence[Mapping[str, np.ndarray]], sizes: Sequence[int]
) -> dict[str, np.ndarray]:
    """Concatenate each part's outputs along axis 0, in part order.

    Every part must return the same outputs, each with ``sizes[i]`` rows on
    axis 0 and the same dtype and trailing shape; anything else means the model
    is not batch-major and the parts cannot be merged (EXECUTION_FAILED).
    """
    if len(parts) != len(sizes):
        raise ValueError(f"{len(parts)} parts but {len(sizes)} sizes")
    if not parts:
        raise ValueError("nothing to merge")
    why = "the model's outputs are not batched along axis 0, so the split run cannot be merged"
    names = list(parts[0])
    for i, part in enumerate(parts):
        if set(part) != set(names):
            raise MeshrunError(
                ErrorCode.EXECUTION_FAILED,
                f"{why}: part {i} returned outputs {sorted(part)}, part 0 returned {sorted(names)}",
            )
    merged: dict[str, np.ndarray] = {}
    for name in names:
        first = np.asarray(parts[0][name])
        for i, (part, size) in enumerate(zip(parts, sizes, strict=True)):
            value = np.asarray(part[name])
            if value.ndim == 0 or value.shape[0] != size:
                raise MeshrunError(
                    ErrorCode.EXECUTION_FAILED,
                    f"{why}: output {name!r} has shape {value.shape} for part {i} of "
                    f"{size} item(s); run this model on one device",
                    {"output": name, "part": i, "shape": list(value.shape), "items": size},
                )
            if value.dtype != first.dtype or value.shape[1:] != first.shape[1:]:
                raise MeshrunError(
                    ErrorCode.EXECUTION_FAILED,
                    f"{why}: output {name!r} is {value.dtype}{value.shape} for part {i} but "
                    f"{first.dtype}{first.shape} for part 0; run this model on one device",
                    {"output": name, "part": i},
                )
        merged[name] = np.concatenate([np.asarray(part[name]) for part in parts], axis=0)
    return merged


def _combine(values: Sequence[Mapping[str, float]], additive: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    for mapping in values:
        for key, value in mapping.items():
            if key not in out:
                out[key] = float(value)
            elif additive and (key in _ADDITIVE_RESOURCES or key.endswith(_ADDITIVE_SUFFIXES)):
                out[key] += float(value)
            else:
                out[key] = max(out[key], float(value))
    return out


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _flatten(inner)]
    return [exc]


def _with_prefix(
    error: MeshrunError, failed: int, results: Mapping[int, ExecutionResult], sizes: Sequence[int]
) -> MeshrunError:
    """Turn the failing part's partial outputs into a prefix of the whole batch, or drop them.

    The compute role publishes ``partial_outputs`` as the first items of the
    batch; a later part's partial outputs are not that, unless every part
    before it finished.
    """
    prefix: list[Mapping[str, np.ndarray]] = []
    prefix_sizes: list[int] = []
    for i in range(failed):
        if i not in results:
            break
        prefix.append(results[i].outputs)
        prefix_sizes.append(sizes[i])
    partial = error.partial_outputs
    error.partial_outputs = None
    error.details.pop("partial_items", None)
    if len(prefix) == failed and partial:
        arrays = {k: v for k, v in partial.items() if isinstance(v, np.ndarray)}
        if arrays:
            prefix.append(arrays)
            prefix_sizes.append(int(next(iter(arrays.values())).shape[0]))
    if not prefix:
        return error
    try:
        merged = merge_outputs(prefix, prefix_sizes)
    except MeshrunError:
        return error
    error.partial_outputs = dict(merged)
    error.details["partial_items"] = sum(prefix_sizes)
    return error


async def run_split(
    pools: Sequence[ExecutorPool],
    model_cid: str,
    model_path: Path | str,
    inputs: bytes,
    timeout: float,
    on_progress: ProgressCallback | None = None,
    *,
    batch_chunk: int | None = None,
    provider: str | None = None,
    deterministic: bool = False,
    log_level: str = "error",
    threads: int | None = None,
    optimize: bool = True,
) -> ExecutionResult:
    """Run one job's batch split across ``pools`` (one per device) and merge the outputs.

    Part i runs on ``pools[i]`` with the same options as an unsplit
    :meth:`ExecutorPool.run` and the same ``timeout`` each. Progress is counted
    in items of the whole batch. The first part to fail cancels the others and
    its MeshrunError is raised, unwrapped, naming the part and its items
    (``details["split_part"]``); partial outputs are kept only as a prefix of
    the whole batch.
    Timings are each key's maximum across parts (they ran side by side) plus
    ``split_parts``, ``split_ms`` and ``merge_ms``; resources are maxima except
    CPU seconds and ``*_bytes`` counters, which add up.
    """
    if not pools:
        raise ValueError("run_split needs at least one pool")
    # The pool checks these too, but from every part at once (an ExceptionGroup).
    if not timeout > 0 or math.isinf(timeout) or math.isnan(timeout):
        raise ValueError("timeout must be a positive finite number of seconds")
    if batch_chunk is not None and batch_chunk < 1:
        raise ValueError("batch_chunk must be at least 1")
    started = time.perf_counter()
    limit = min(pool.max_job_memory for pool in pools)
    pieces, sizes = await trio.to_thread.run_sync(_split, inputs, len(pools), limit)
    split_ms = (time.perf_counter() - started) * 1000.0
    count = len(pieces)
    total_items = sum(sizes)

    # Each part's progress is scaled to its share of the batch, so the sum is
    # monotone and its total is B even if a worker counts in other units.
    done_items = [0] * count
    last: tuple[int, int] | None = None
    progress_lock = trio.Lock()

    def part_progress(i: int) -> ProgressCallback | None:
        if on_progress is None:
            return None
        callback = on_progress

        async def report(done: int, total: int) -> None:
            nonlocal last
            async with progress_lock:
                share = sizes[i] if total <= 0 else min(sizes[i], done * sizes[i] // total)
                done_items[i] = max(done_items[i], share)
                now = (sum(done_items), total_items)
                if now != last:
                    last = now
                    await callback(*now)

        return report

    results: dict[int, ExecutionResult] = {}
    failures: list[tuple[int, MeshrunError]] = []

    async def run_part(i: int) -> None:
        try:
            results[i] = await pools[i].run(
                model_cid,
                model_path,
                pieces[i],
                timeout,
                on_progress=part_progress(i),
                batch_chunk=batch_chunk,
                provider=provider,
                deterministic=deterministic,
                log_level=log_level,
                threads=threads,
                optimize=optimize,
            )
        except MeshrunError as exc:
            failures.append((i, exc))
            raise

    try:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(run_part, i)
    except BaseExceptionGroup as group:
        leaves = _flatten(group)
        if any(isinstance(leaf, trio.Cancelled) for leaf in leaves) or not failures:
            # Cancelled from outside (trio's scope unwraps it) or a bug: not ours to reword.
            raise
        failed, first = failures[0]
        for leaf in leaves:
            if leaf is not first:
                log.warning("split part also failed: %r", leaf)
        # The worker counts items within its part; say where that part sits in the batch.
        lo = sum(sizes[:failed])
        error = MeshrunError(
            first.code,
            f"{first.message} (in part {failed} of {count}: batch items "
            f"{lo}..{lo + sizes[failed] - 1})",
            {**first.details, "split_part": failed, "split_parts": count},
        )
        error.partial_outputs = first.partial_outputs
        raise _with_prefix(error, failed, results, sizes) from None

    parts = [results[i] for i in range(count)]
    t_merge = time.perf_counter()

    def merge() -> tuple[dict[str, np.ndarray], bytes]:
        if count == 1:
            return parts[0].outputs, parts[0].outputs_npz
        merged = merge_outputs([p.outputs for p in parts], sizes)
        return merged, encode_tensors(merged)

    outputs, outputs_npz = await trio.to_thread.run_sync(merge)
    providers = sorted({p.provider for p in parts})
    timings = _combine([p.timings for p in parts])
    timings["split_parts"] = float(count)
    timings["split_ms"] = split_ms
    timings["merge_ms"] = (time.perf_counter() - t_merge) * 1000.0
    stderr = "".join(
        f"--- part {i} ---\n{p.stderr}" + ("" if p.stderr.endswith("\n") else "\n")
        for i, p in enumerate(parts)
        if p.stderr
    )
    return ExecutionResult(
        outputs=outputs,
        outputs_npz=outputs_npz,
        provider=providers[0] if len(providers) == 1 else "+".join(providers),
        timings=timings,
        cold_start=any(p.cold_start for p in parts),
        resources=_combine([p.resources for p in parts], additive=True),
        worker_pid=parts[0].worker_pid,
        stderr=stderr,
    )

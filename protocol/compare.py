"""Whether two executors' outputs of one job are the same answer.

Redundant verification runs a job on two executors and compares what they
return. Honest executors rarely agree bit for bit: thread count changes the
order of reductions, graph optimisation fuses operators, other hardware has
other kernels. So floats are compared within a tolerance, `|a - b| <= atol +
rtol * |b|`, which the job spec signs (`JobSpec.tolerance`) or which falls back
to :data:`DEFAULT_TOLERANCE` per dtype. Those defaults were measured on honest
CPU runs that differ only in onnxruntime threads and optimisation level
(docs/verification-tolerance.md): several times wider than that noise, and
still narrow enough to catch every element off by 1 %. Integers, booleans and
strings must be equal. `argmax` and `topk` compare the winning classes along
the last axis, for classifiers whose scores may drift but whose answer must
not; a near tie (within the tolerance) may be broken either way.

Threat: the result files come from executors who may be hostile, and the
comparison runs on the requester. :func:`outputs_from_files` trusts nothing
in them: the index must be well-formed JSON of bounded size, each tensor's
.npy header must match its index entry and its sha256 before any array is
built, pickles and object, structured or void dtypes are refused, and the
total element count is bounded before allocation. Anything malformed raises
:class:`CompareError`, never anything else. :func:`compare_outputs` works in
chunks of at most CHUNK_ELEMENTS, so its extra memory does not grow with the
tensors, and every number it reports is finite (JSON-safe).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.messages import Tolerance

# (atol, rtol) per floating dtype name. Keyed by name, not by numpy type, so two
# nodes agree on the table whether or not their numpy can represent bfloat16.
DEFAULT_TOLERANCE: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "float16": (1e-4, 5e-3),
        "bfloat16": (1e-3, 4e-2),
        "float32": (1e-5, 1e-3),
        "float64": (1e-10, 1e-7),
    }
)
OUTPUT_INDEX = "output.json"
MAX_INDEX_BYTES = 1024 * 1024
MAX_OUTPUTS = 1024
MAX_NAME_CHARS = 1024
# 256 MiB of float32: a batch of OCR recognitions ([32, 80, 18710]) fits.
MAX_ELEMENTS = 64 * 1024 * 1024
CHUNK_ELEMENTS = 1 << 20
MAX_DETAIL_CHARS = 2000

_NPY_HEADER_BYTES = 10_000
_NPY_VERSIONS = {(1, 0), (2, 0)}
_ALLOWED_KINDS = frozenset("biufcUS")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FLOAT_MAX = float(np.finfo(np.float64).max)
_TINY = float(np.finfo(np.float64).tiny)
REL_FLOOR = 1e-6

FloatArray = npt.NDArray[np.float64]


class CompareError(ValueError):
    """A result package whose outputs cannot be read safely or do not match its index."""


@dataclass(frozen=True)
class OutputComparison:
    """The verdict on one named output; `mismatched` counts elements (rows in argmax/topk)."""

    name: str
    agree: bool
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    mismatched: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "mismatched": self.mismatched,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Comparison:
    """Two results' verdict: they agree only if every output does and none is missing."""

    agree: bool
    max_abs_diff: float
    max_rel_diff: float
    detail: str
    outputs: Mapping[str, OutputComparison] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "detail": self.detail,
            "outputs": {name: out.to_json() for name, out in self.outputs.items()},
        }


# ---------------------------------------------------------------- comparing


def compare_outputs(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tolerance: Tolerance
) -> Comparison:
    """Compare every output of `a` with the same-named one of `b` (`b` scales rtol)."""
    verdicts: dict[str, OutputComparison] = {}
    for name in sorted(set(a) | set(b)):
        if name not in b:
            verdicts[name] = OutputComparison(name, False, detail=f"output {name!r} only in a")
        elif name not in a:
            verdicts[name] = OutputComparison(name, False, detail=f"output {name!r} only in b")
        else:
            verdicts[name] = _compare_one(name, a[name], b[name], tolerance)
    problems = [v.detail for v in verdicts.values() if not v.agree]
    agree = not problems
    if agree:
        detail = f"{len(verdicts)} output(s) agree ({_describe(tolerance)})"
    else:
        detail = "; ".join(problems)
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
    return Comparison(
        agree=agree,
        max_abs_diff=max((v.max_abs_diff for v in verdicts.values()), default=0.0),
        max_rel_diff=max((v.max_rel_diff for v in verdicts.values()), default=0.0),
        detail=detail,
        outputs=MappingProxyType(verdicts),
    )


def tolerance_for(dtype: np.dtype[Any], tolerance: Tolerance) -> tuple[float, float]:
    """The (atol, rtol) used for a floating or complex dtype: the spec's, else the default."""
    atol, rtol = DEFAULT_TOLERANCE.get(_float_name(dtype), DEFAULT_TOLERANCE["float64"])
    return (
        atol if tolerance.atol is None else tolerance.atol,
        rtol if tolerance.rtol is None else tolerance.rtol,
    )


def _compare_one(name: str, a: np.ndarray, b: np.ndarray, tolerance: Tolerance) -> OutputComparison:
    if a.dtype != b.dtype:
        return OutputComparison(name, False, detail=f"{name!r}: dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return OutputComparison(
            name, False, detail=f"{name!r}: shape {list(a.shape)} vs {list(b.shape)}"
        )
    dtype = a.dtype
    if _is_float(dtype):
        ranked = tolerance.mode != "values" and a.ndim >= 1 and a.shape[-1] > 0
        if ranked:
            k = 1 if tolerance.mode == "argmax" else min(tolerance.k, a.shape[-1])
            return _compare_ranked(name, a, b, k, tolerance)
        return _compare_values(name, a, b, tolerance)
    if dtype.kind == "c":
        component = np.dtype(f"f{dtype.itemsize // 2}")
        return _compare_values(
            name, _as_components(a, component), _as_components(b, component), tolerance
        )
    if dtype.kind in "biuUS":
        return _compare_exact(name, a, b)
    return OutputComparison(name, False, detail=f"{name!r}: dtype {dtype} cannot be compared")


def _compare_exact(name: str, a: np.ndarray, b: np.ndarray) -> OutputComparison:
    stats = _Stats()
    mismatched = 0
    for ca, cb in _chunks(a, b):
        differ = int(np.count_nonzero(ca != cb))
        if differ and a.dtype.kind in "biu":
            stats.add(_f64(ca), _f64(cb))
        mismatched += differ
    if not mismatched:
        return stats.verdict(name, True, 0, "")
    detail = f"{name!r}: {mismatched} of {a.size} element(s) differ ({a.dtype}, exact)"
    return stats.verdict(name, False, mismatched, detail)


def _compare_values(
    name: str, a: np.ndarray, b: np.ndarray, tolerance: Tolerance
) -> OutputComparison:
    atol, rtol = tolerance_for(a.dtype, tolerance)
    stats = _Stats()
    beyond = 0
    for ca, cb in _chunks(a, b):
        fa, fb = _f64(ca), _f64(cb)
        special = stats.add(fa, fb)
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.abs(fa - fb)
            ok = d <= atol + rtol * np.abs(fb)
        ok[special] = True
        beyond += int(np.count_nonzero(~ok))
    total = beyond + stats.nan_mismatch + stats.inf_mismatch
    if not total:
        return stats.verdict(name, True, 0, "")
    parts = []
    if beyond:
        parts.append(f"{beyond} element(s) beyond atol={atol:g} rtol={rtol:g}")
    if stats.nan_mismatch:
        parts.append(f"NaN at {stats.nan_mismatch} position(s) in one only")
    if stats.inf_mismatch:
        parts.append(f"{stats.inf_mismatch} infinite element(s) differ")
    detail = (
        f"{name!r}: {', '.join(parts)} of {a.size} "
        f"(max abs diff {stats.max_abs:.3g}, max rel diff {stats.max_rel:.3g})"
    )
    return stats.verdict(name, False, total, detail)


def _compare_ranked(
    name: str, a: np.ndarray, b: np.ndarray, k: int, tolerance: Tolerance
) -> OutputComparison:
    """The top-k index sets along the last axis must be equal, except where they differ
    only by elements within the tolerance of the k-th largest value (a near tie)."""
    atol, rtol = tolerance_for(a.dtype, tolerance)
    width = a.shape[-1]
    stats = _Stats()
    rows_bad = 0
    for ca, cb in _chunks(a.reshape(-1, width), b.reshape(-1, width)):
        fa, fb = _f64(ca), _f64(cb)
        stats.add(fa, fb)
        nan_row = np.any(np.isnan(fa) != np.isnan(fb), axis=1)
        fa = np.where(np.isnan(fa), -np.inf, fa)
        fb = np.where(np.isnan(fb), -np.inf, fb)
        in_a, floor_a = _top_k(fa, k, atol, rtol)
        in_b, floor_b = _top_k(fb, k, atol, rtol)
        ok = (~(in_a & ~in_b) | (fb >= floor_b)) & (~(in_b & ~in_a) | (fa >= floor_a))
        rows_bad += int(np.count_nonzero(~np.all(ok, axis=1) | nan_row))
    if not rows_bad:
        return stats.verdict(name, True, 0, "")
    rows = a.size // width
    what = "argmax" if tolerance.mode == "argmax" else f"top-{k} set"
    detail = (
        f"{name!r}: {what} differs in {rows_bad} of {rows} row(s) "
        f"(max abs diff {stats.max_abs:.3g}, max rel diff {stats.max_rel:.3g})"
    )
    return stats.verdict(name, False, rows_bad, detail)


def _top_k(
    rows: FloatArray, k: int, atol: float, rtol: float
) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """Membership mask of each row's top k, and the lowest value a near tie may have."""
    top = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    mask = np.zeros(rows.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    kth = np.take_along_axis(rows, top, axis=1).min(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        floor = np.where(np.isinf(kth), kth, kth - (atol + rtol * np.abs(kth)))
    return mask, floor[:, None]


@dataclass
class _Stats:
    """Largest finite differences seen, and NaN/inf positions that do not match."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    nan_mismatch: int = 0
    inf_mismatch: int = 0

    def add(self, fa: FloatArray, fb: FloatArray) -> npt.NDArray[np.bool_]:
        """Fold a chunk in; True where an element is NaN or infinite in either."""
        nan_a, nan_b = np.isnan(fa), np.isnan(fb)
        inf_a, inf_b = np.isinf(fa), np.isinf(fb)
        self.nan_mismatch += int(np.count_nonzero(nan_a != nan_b))
        either_inf = (inf_a | inf_b) & ~(nan_a | nan_b)
        self.inf_mismatch += int(np.count_nonzero(either_inf & (fa != fb)))
        finite = ~(nan_a | nan_b | inf_a | inf_b)
        if finite.any():
            with np.errstate(over="ignore", invalid="ignore"):
                d = np.abs(fa[finite] - fb[finite])
                # Relative to |b| but never to less than REL_FLOOR: next to an exact
                # zero any difference is "infinitely" relative, which says nothing.
                rel = d / np.maximum(np.abs(fb[finite]), REL_FLOOR)
            self.max_abs = max(self.max_abs, _finite_max(d))
            self.max_rel = max(self.max_rel, _finite_max(rel))
        return ~finite

    def verdict(self, name: str, agree: bool, mismatched: int, detail: str) -> OutputComparison:
        return OutputComparison(name, agree, self.max_abs, self.max_rel, mismatched, detail)


def _finite_max(values: FloatArray) -> float:
    top = float(values.max(initial=0.0))
    return top if math.isfinite(top) else _FLOAT_MAX


def _chunks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Slices of at most CHUNK_ELEMENTS (whole rows of a 2-D array), flat otherwise."""
    if a.ndim == 2:
        step = max(1, CHUNK_ELEMENTS // max(1, a.shape[1]))
        for lo in range(0, a.shape[0], step):
            yield a[lo : lo + step], b[lo : lo + step]
        return
    fa, fb = a.reshape(-1), b.reshape(-1)
    for lo in range(0, fa.size, CHUNK_ELEMENTS):
        yield fa[lo : lo + CHUNK_ELEMENTS], fb[lo : lo + CHUNK_ELEMENTS]


def _f64(values: np.ndarray) -> FloatArray:
    return values.astype(np.float64)


def _as_components(values: np.ndarray, component: np.dtype[Any]) -> np.ndarray:
    """A complex array as its real and imaginary parts, side by side."""
    return np.ascontiguousarray(values).view(component.newbyteorder(values.dtype.byteorder))


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _float_name(dtype: np.dtype[Any]) -> str:
    if dtype.kind == "c":
        return f"float{dtype.itemsize * 4}"
    return dtype.name


def _describe(tolerance: Tolerance) -> str:
    text = tolerance.mode if tolerance.mode != "topk" else f"top-{tolerance.k}"
    if tolerance.atol is not None:
        text += f", atol={tolerance.atol:g}"
    if tolerance.rtol is not None:
        text += f", rtol={tolerance.rtol:g}"
    return text


# ---------------------------------------------------------------- reading packages


def outputs_from_files(
    files: Mapping[str, bytes], max_elements: int = MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """The output tensors of a result package, each checked against the package index.

    `files` maps package paths to bytes (output.json, outputs/<name>.npy, …). At
    most `max_elements` elements in all are decoded: the count is taken from the
    headers before any array is made.
    """
    entries = _index_entries(files.get(OUTPUT_INDEX))
    total = 0
    headers: list[tuple[str, bytes, np.dtype[Any], tuple[int, ...]]] = []
    for name, path, dtype_text, shape, sha256 in entries:
        data = files.get(path)
        if not isinstance(data, bytes):
            raise CompareError(f"output {name!r}: {path!r} is not in the package")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CompareError(f"output {name!r}: {path!r} does not match its sha256")
        total += math.prod(shape)
        if total > max_elements:
            raise CompareError(
                f"the outputs hold more than {max_elements} elements; refusing to load them"
            )
        dtype = _check_header(name, data, dtype_text, shape)
        headers.append((name, data, dtype, shape))
    outputs: dict[str, np.ndarray] = {}
    for name, data, dtype, shape in headers:
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # numpy raises many types on garbage; all mean the same
            raise CompareError(f"output {name!r}: not a readable .npy: {exc}") from None
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            raise CompareError(f"output {name!r}: .npy content does not match its header")
        outputs[name] = array
    return outputs


def _index_entries(raw: bytes | None) -> list[tuple[str, str, str, tuple[int, ...], str]]:
    if not isinstance(raw, bytes):
        raise CompareError(f"the package has no {OUTPUT_INDEX}")
    if len(raw) > MAX_INDEX_BYTES:
        raise CompareError(f"{OUTPUT_INDEX} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CompareError(f"{OUTPUT_INDEX} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise CompareError(f"{OUTPUT_INDEX} has no list of outputs")
    listed = document["outputs"]
    if len(listed) > MAX_OUTPUTS:
        raise CompareError(f"{OUTPUT_INDEX} lists more than {MAX_OUTPUTS} outputs")
    entries = []
    names: set[str] = set()
    paths: set[str] = set()
    for position, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise CompareError(f"{OUTPUT_INDEX}: output #{position} is not an object")
        name, path = entry.get("name"), entry.get("path")
        dtype, shape, sha256 = entry.get("dtype"), entry.get("shape"), entry.get("sha256")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or name in names:
            raise CompareError(f"{OUTPUT_INDEX}: output #{position} has a bad or repeated name")
        if not isinstance(path, str) or not path.startswith("outputs/") or path in paths:
            raise CompareError(f"{OUTPUT_INDEX}: output {name!r} has a bad or repeated path")
        if not isinstance(dtype, str) or len(dtype) > 64:
            raise CompareError(f"{OUTPUT_INDEX}: output {name!r} has a bad dtype")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise CompareError(f"{OUTPUT_INDEX}: output {name!r} has a bad sha256")
        if (
            not isinstance(shape, list)
            or len(shape) > 32
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise CompareError(f"{OUTPUT_INDEX}: output {name!r} has a bad shape")
        names.add(name)
        paths.add(path)
        entries.append((name, path, dtype, tuple(shape), sha256))
    return entries


def _check_header(name: str, data: bytes, dtype_text: str, shape: tuple[int, ...]) -> np.dtype[Any]:
    """The .npy header's dtype, once it and its data length match the index entry."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_VERSIONS:
            raise ValueError(f"unsupported .npy version {version}")
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        header_shape, _fortran, dtype = read(stream, max_header_size=_NPY_HEADER_BYTES)
    except Exception as exc:  # a hostile header can make numpy raise almost anything
        raise CompareError(f"output {name!r}: not a readable .npy header: {exc}") from None
    if dtype.hasobject or dtype.kind not in _ALLOWED_KINDS or dtype.fields or dtype.subdtype:
        raise CompareError(f"output {name!r}: dtype {dtype} is not allowed")
    if str(dtype) != dtype_text:
        raise CompareError(f"output {name!r}: dtype {dtype} but the index says {dtype_text}")
    if tuple(header_shape) != shape:
        raise CompareError(
            f"output {name!r}: shape {list(header_shape)} but the index says {list(shape)}"
        )
    if len(data) - stream.tell() != math.prod(shape) * dtype.itemsize:
        raise CompareError(f"output {name!r}: data length does not match its header")
    return dtype


__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_ELEMENTS",
    "CompareError",
    "Comparison",
    "OutputComparison",
    "compare_outputs",
    "outputs_from_files",
    "tolerance_for",
]

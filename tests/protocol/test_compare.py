"""protocol/compare.py: the verdict on two executors' outputs, and reading hostile packages.

The default tolerances (DEFAULT_TOLERANCE) come from honest onnxruntime CPU runs
of the same model and inputs that differ only in intra-op threads (1, 2, 4) and
graph optimisation level (DISABLE_ALL, ENABLE_BASIC, ENABLE_ALL), measured
2026-12-02 on a 2-core CPU, onnxruntime 1.31.1 (docs/verification-tolerance.md):

  model (output dtype)                     max |a-b|   max rel*  diff / default tolerance
  MiniLM-L6 int8, B32 S128 (float32)       4.3e-06    2.1e-04   0.15
  PP-OCRv6 rec on a text line (float32)    4.4e-05    1.5e-04   0.12
  PP-OCRv6 det on a text image (float32)   5.1e-06    1.2e-04   0.02
  ppocr cls, silero-vad (float32)          1.1e-06    5.0e-05   0.005
  MatMul MLP 2048x6 (float16)              2.4e-04    9.7e-04   0.17
  Gemm MLPs (node/dev/models.py), float64  0 (bit-identical in every configuration)
  * relative to |b| where |b| > 1e-3 * max|b|

So honest noise uses at most a sixth of the default tolerance, while every
element off by 1 % (or one element off by a lot) is beyond it. The same checks
on real sessions are in tests/node/executor/test_compare_ort.py; these tests
need no onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.roles.result_package import build_files, npy_bytes
from protocol.compare import (
    DEFAULT_TOLERANCE,
    CompareError,
    Comparison,
    compare_outputs,
    outputs_from_files,
    tolerance_for,
)
from protocol.messages import Tolerance

VALUES = Tolerance()
ARGMAX = Tolerance(mode="argmax")
FLOATS = ["float16", "float32", "float64"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(dtype: str = "float32", shape: tuple[int, ...] = (8, 10)) -> np.ndarray:
    return _rng().standard_normal(shape).astype(dtype)


def _tol(array: np.ndarray) -> np.ndarray:
    atol, rtol = DEFAULT_TOLERANCE[array.dtype.name]
    return atol + rtol * np.abs(array.astype(np.float64))


def _json_safe(verdict: Comparison) -> None:
    json.dumps(verdict.to_json(), allow_nan=False)
    assert math.isfinite(verdict.max_abs_diff) and math.isfinite(verdict.max_rel_diff)


# ---------------------------------------------------------------- defaults


def test_defaults_cover_every_float_dtype_and_tighten_with_precision() -> None:
    assert set(DEFAULT_TOLERANCE) == {"float16", "bfloat16", "float32", "float64"}
    order = ["bfloat16", "float16", "float32", "float64"]
    rtols = [DEFAULT_TOLERANCE[name][1] for name in order]
    assert rtols == sorted(rtols, reverse=True)
    for name in ["float16", "float32", "float64"]:
        atol, rtol = DEFAULT_TOLERANCE[name]
        # A 1 % error on values of order one is always beyond the default.
        assert atol + rtol < 0.01


def test_the_spec_overrides_each_default_on_its_own() -> None:
    f32 = np.dtype("float32")
    assert tolerance_for(f32, VALUES) == DEFAULT_TOLERANCE["float32"]
    assert tolerance_for(f32, Tolerance(atol=0.5)) == (0.5, DEFAULT_TOLERANCE["float32"][1])
    assert tolerance_for(f32, Tolerance(rtol=0.5)) == (DEFAULT_TOLERANCE["float32"][0], 0.5)
    assert tolerance_for(np.dtype("complex64"), VALUES) == DEFAULT_TOLERANCE["float32"]
    assert tolerance_for(np.dtype("longdouble"), VALUES) == DEFAULT_TOLERANCE["float64"]


# ---------------------------------------------------------------- values mode


@pytest.mark.parametrize("dtype", FLOATS)
def test_noise_within_the_default_agrees_and_three_times_it_does_not(dtype: str) -> None:
    x = _logits(dtype)
    signs = np.where(_rng(1).random(x.shape) < 0.5, -1.0, 1.0)
    near = (x.astype(np.float64) + 0.3 * signs * _tol(x)).astype(dtype)
    far = (x.astype(np.float64) + 3.0 * signs * _tol(x)).astype(dtype)
    assert compare_outputs({"y": near}, {"y": x}, VALUES).agree
    verdict = compare_outputs({"y": far}, {"y": x}, VALUES)
    assert not verdict.agree
    assert verdict.outputs["y"].mismatched == x.size
    _json_safe(verdict)


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_element_off_by_one_percent_is_wrong(dtype: str) -> None:
    x = _logits(dtype)
    verdict = compare_outputs({"y": (x * 1.01).astype(dtype)}, {"y": x}, VALUES)
    assert not verdict.agree
    assert 0.009 < verdict.max_rel_diff < 0.011
    assert "beyond" in verdict.detail and "'y'" in verdict.detail


@pytest.mark.parametrize("dtype", FLOATS)
def test_one_element_changed_by_a_lot_is_wrong(dtype: str) -> None:
    x = _logits(dtype, (64, 100))
    y = x.copy()
    y[17, 42] += 3
    verdict = compare_outputs({"y": y}, {"y": x}, VALUES)
    assert not verdict.agree
    assert verdict.outputs["y"].mismatched == 1
    assert verdict.max_abs_diff == pytest.approx(3.0, rel=1e-2)


def test_a_looser_spec_tolerance_accepts_what_the_default_refuses() -> None:
    x = _logits()
    y = x * 1.01
    assert not compare_outputs({"y": y}, {"y": x}, VALUES).agree
    assert compare_outputs({"y": y}, {"y": x}, Tolerance(rtol=0.02)).agree
    assert compare_outputs({"y": y}, {"y": x}, Tolerance(atol=0.1, rtol=0.0)).agree


def test_identical_outputs_agree_with_zero_differences() -> None:
    outputs = {"y": _logits(), "labels": np.arange(8), "mask": np.ones(3, bool)}
    verdict = compare_outputs(outputs, dict(outputs), VALUES)
    assert verdict.agree
    assert (verdict.max_abs_diff, verdict.max_rel_diff) == (0.0, 0.0)
    assert set(verdict.outputs) == {"y", "labels", "mask"}
    assert verdict.to_json()["outputs"]["y"]["agree"] is True


def test_missing_or_extra_outputs_disagree() -> None:
    x = _logits()
    verdict = compare_outputs({"y": x, "z": x}, {"y": x, "w": x}, VALUES)
    assert not verdict.agree
    assert verdict.outputs["y"].agree
    assert not verdict.outputs["z"].agree and "only in a" in verdict.outputs["z"].detail
    assert not verdict.outputs["w"].agree and "only in b" in verdict.outputs["w"].detail
    assert not compare_outputs({}, {"y": x}, VALUES).agree


def test_shape_or_dtype_differences_disagree_without_reading_values() -> None:
    x = _logits()
    assert "shape" in compare_outputs({"y": x}, {"y": x.reshape(10, 8)}, VALUES).detail
    assert "dtype" in compare_outputs({"y": x}, {"y": x.astype("float64")}, VALUES).detail
    assert "dtype" in compare_outputs({"y": np.arange(3)}, {"y": np.arange(3.0)}, VALUES).detail


@pytest.mark.parametrize("mode", ["values", "argmax", "topk"])
def test_integers_booleans_and_strings_must_be_equal(mode: str) -> None:
    tolerance = Tolerance(mode=mode, atol=1e6, rtol=1e6)  # type: ignore[arg-type]
    labels = np.array([3, 1, 4, 1, 5])
    off = labels.copy()
    off[2] += 1
    assert compare_outputs({"l": labels}, {"l": labels.copy()}, tolerance).agree
    verdict = compare_outputs({"l": off}, {"l": labels}, tolerance)
    assert not verdict.agree and verdict.outputs["l"].mismatched == 1
    assert verdict.max_abs_diff == 1.0
    flags = np.array([True, False])
    assert not compare_outputs({"b": ~flags}, {"b": flags}, tolerance).agree
    words = np.array(["cat", "dog"])
    assert not compare_outputs({"s": np.array(["cat", "cow"])}, {"s": words}, tolerance).agree


def test_nan_must_match_position_for_position() -> None:
    x = np.array([1.0, np.nan, 3.0], np.float32)
    assert compare_outputs({"y": x}, {"y": x.copy()}, VALUES).agree
    moved = np.array([1.0, 2.0, np.nan], np.float32)
    verdict = compare_outputs({"y": moved}, {"y": x}, VALUES)
    assert not verdict.agree and "NaN" in verdict.detail
    _json_safe(verdict)


def test_infinities_must_match_exactly() -> None:
    x = np.array([np.inf, -np.inf, 1.0], np.float32)
    assert compare_outputs({"y": x}, {"y": x.copy()}, VALUES).agree
    for other in ([-np.inf, -np.inf, 1.0], [3e38, -np.inf, 1.0], [np.nan, -np.inf, 1.0]):
        verdict = compare_outputs({"y": np.array(other, np.float32)}, {"y": x}, VALUES)
        assert not verdict.agree, other
        _json_safe(verdict)


def test_reported_differences_stay_finite_when_they_overflow() -> None:
    a = np.array([1e308, 5.0], np.float64)
    b = np.array([-1e308, 0.0], np.float64)
    verdict = compare_outputs({"y": a}, {"y": b}, VALUES)
    assert not verdict.agree
    _json_safe(verdict)
    assert verdict.max_abs_diff == np.finfo(np.float64).max


def test_complex_outputs_compare_both_parts_within_tolerance() -> None:
    z = (_logits() + 1j * _logits()).astype(np.complex64)
    close = z + np.complex64(1e-7)
    assert compare_outputs({"z": close}, {"z": z}, VALUES).agree
    assert not compare_outputs({"z": z * np.complex64(1j)}, {"z": z}, VALUES).agree


def test_large_outputs_are_compared_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("protocol.compare.CHUNK_ELEMENTS", 7)
    x = _logits(shape=(5, 6, 4))
    y = x.copy()
    y[4, 5, 3] += 1
    assert compare_outputs({"y": x}, {"y": x.copy()}, VALUES).agree
    verdict = compare_outputs({"y": y}, {"y": x}, VALUES)
    assert verdict.outputs["y"].mismatched == 1
    two_d = _logits(shape=(9, 3))
    z = two_d.copy()
    z[8, 2] += 1
    assert compare_outputs({"y": z}, {"y": two_d}, VALUES).outputs["y"].mismatched == 1
    z[8, (two_d[8].argmax() + 1) % 3] = two_d[8].max() + 1
    assert compare_outputs({"y": z}, {"y": two_d}, ARGMAX).outputs["y"].mismatched == 1


# ---------------------------------------------------------------- argmax / topk


def test_argmax_ignores_drift_that_keeps_every_winner() -> None:
    x = _logits(shape=(16, 1000))
    drifted = x * 1.05 + 0.01
    assert not compare_outputs({"y": drifted}, {"y": x}, VALUES).agree
    verdict = compare_outputs({"y": drifted}, {"y": x}, ARGMAX)
    assert verdict.agree
    assert verdict.max_abs_diff > 0.01  # the drift is still reported


def test_argmax_flags_a_changed_winner() -> None:
    x = _logits(shape=(16, 10))
    y = x.copy()
    y[5, (x[5].argmax() + 1) % 10] = x[5].max() + 1
    verdict = compare_outputs({"y": y}, {"y": x}, ARGMAX)
    assert not verdict.agree
    assert verdict.outputs["y"].mismatched == 1
    assert "argmax differs in 1 of 16 row(s)" in verdict.detail


def test_a_near_tie_may_be_broken_either_way() -> None:
    a = np.array([[0.5, 0.5 + 1e-7, 0.1]], np.float32)
    b = np.array([[0.5 + 1e-7, 0.5, 0.1]], np.float32)
    assert a.argmax() != b.argmax()
    assert compare_outputs({"y": a}, {"y": b}, ARGMAX).agree
    assert compare_outputs({"y": a}, {"y": b}, Tolerance(mode="topk", k=1)).agree
    clear = np.array([[0.5, 0.6, 0.1]], np.float32)
    assert not compare_outputs({"y": clear}, {"y": b}, ARGMAX).agree


def test_argmax_works_on_the_last_axis_of_any_rank() -> None:
    x = _logits(shape=(2, 3, 4, 5))
    y = x.copy()
    y[1, 2, 3] = y[1, 2, 3][::-1] + 1e-3 * np.arange(5)
    differ = int(x[1, 2, 3].argmax() != y[1, 2, 3].argmax())
    verdict = compare_outputs({"y": y}, {"y": x}, ARGMAX)
    assert verdict.outputs["y"].mismatched == differ


def test_topk_compares_sets_not_order() -> None:
    x = np.array([[0.1, 0.9, 0.8, 0.7, 0.0]], np.float32)
    reordered = np.array([[0.1, 0.7, 0.8, 0.9, 0.0]], np.float32)
    topk = Tolerance(mode="topk", k=3)
    assert compare_outputs({"y": reordered}, {"y": x}, topk).agree
    swapped = np.array([[0.95, 0.9, 0.8, 0.1, 0.0]], np.float32)
    verdict = compare_outputs({"y": swapped}, {"y": x}, topk)
    assert not verdict.agree and "top-3 set differs" in verdict.detail


def test_topk_clips_k_to_the_axis_and_falls_back_to_values_on_scalars() -> None:
    x = _logits(shape=(4, 3))
    shuffled = x[:, ::-1].copy()
    assert compare_outputs({"y": shuffled}, {"y": x}, Tolerance(mode="topk", k=10)).agree
    scalar = np.array(1.0, np.float32)
    assert compare_outputs({"s": scalar}, {"s": scalar.copy()}, ARGMAX).agree
    assert not compare_outputs({"s": scalar * 2}, {"s": scalar}, ARGMAX).agree
    empty = np.zeros((3, 0), np.float32)
    assert compare_outputs({"e": empty}, {"e": empty.copy()}, ARGMAX).agree


def test_ranked_modes_require_nan_in_the_same_places() -> None:
    x = np.array([[0.1, 0.9, np.nan]], np.float32)
    y = np.array([[0.1, 0.9, 0.2]], np.float32)
    assert compare_outputs({"y": x}, {"y": x.copy()}, ARGMAX).agree
    assert not compare_outputs({"y": y}, {"y": x}, ARGMAX).agree


# ---------------------------------------------------------------- properties

_float_arrays = st.sampled_from(FLOATS).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
)
_modes = st.sampled_from(["values", "argmax", "topk"])


@given(x=_float_arrays, mode=_modes, k=st.integers(1, 8))
def test_any_output_agrees_with_itself(x: np.ndarray, mode: str, k: int) -> None:
    tolerance = Tolerance(mode=mode, k=k)  # type: ignore[arg-type]
    verdict = compare_outputs({"y": x}, {"y": x.copy()}, tolerance)
    assert verdict.agree, verdict.detail
    _json_safe(verdict)


_bounded = st.sampled_from(FLOATS).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(-1e4, 1e4, width=16 if dtype == "float16" else 32),
    )
)


@given(x=_bounded, seed=st.integers(0, 2**32 - 1))
def test_noise_under_a_third_of_the_tolerance_agrees_both_ways(x: np.ndarray, seed: int) -> None:
    noise = _rng(seed).uniform(-1 / 3, 1 / 3, x.shape) * _tol(x)
    y = (x.astype(np.float64) + noise).astype(x.dtype)
    assert compare_outputs({"y": y}, {"y": x}, VALUES).agree
    assert compare_outputs({"y": x}, {"y": y}, VALUES).agree


@given(x=_bounded, seed=st.integers(0, 2**32 - 1))
def test_one_element_three_tolerances_away_disagrees_both_ways(x: np.ndarray, seed: int) -> None:
    rng = _rng(seed)
    y = x.copy()
    index = tuple(int(rng.integers(0, side)) for side in x.shape)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    y[index] = x.dtype.type(float(x[index]) + sign * 3 * float(_tol(x)[index]))
    for first, second in ((y, x), (x, y)):
        verdict = compare_outputs({"y": first}, {"y": second}, VALUES)
        assert not verdict.agree
        assert verdict.outputs["y"].mismatched == 1
        _json_safe(verdict)


@given(
    a=hnp.arrays("float32", (3, 4), elements=st.floats(-10, 10, width=32)),
    b=hnp.arrays("float32", (3, 4), elements=st.floats(-10, 10, width=32)),
    mode=_modes,
)
def test_the_verdict_is_symmetric_apart_from_the_rtol_scale(
    a: np.ndarray, b: np.ndarray, mode: str
) -> None:
    tolerance = Tolerance(mode=mode, atol=1e-3, rtol=0.0, k=2)  # type: ignore[arg-type]
    forward = compare_outputs({"y": a}, {"y": b}, tolerance)
    backward = compare_outputs({"y": b}, {"y": a}, tolerance)
    assert forward.agree == backward.agree
    assert forward.max_abs_diff == backward.max_abs_diff


# ---------------------------------------------------------------- reading packages


def _package(outputs: dict[str, np.ndarray]) -> dict[str, bytes]:
    files, _ = build_files("job", outputs, {"executor": "peer"})
    return files


def _forge(entries: list[dict[str, Any]], blobs: dict[str, bytes]) -> dict[str, bytes]:
    """A package whose index says what the test wants, with matching sha256s."""
    for entry in entries:
        data = blobs.get(entry["path"], b"")
        entry.setdefault("sha256", hashlib.sha256(data).hexdigest())
    return {"output.json": json.dumps({"outputs": entries}).encode(), **blobs}


def _entry(name: str, array: np.ndarray, **changes: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "path": f"outputs/{name}.npy",
        "dtype": str(array.dtype),
        "shape": list(array.shape),
    }
    entry.update(changes)
    return entry


def test_a_package_round_trips_its_outputs() -> None:
    outputs = {
        "y": _logits(),
        "labels": np.arange(8),
        "half": _logits("float16"),
        "text": np.array(["a", "bc"]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
    }
    read = outputs_from_files(_package(outputs))
    assert set(read) == set(outputs)
    for name, array in outputs.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)
    assert compare_outputs(read, outputs, VALUES).agree


def test_fortran_order_and_big_endian_arrays_are_honest_too() -> None:
    outputs = {"f": np.asfortranarray(_logits()), "be": _logits().astype(">f4")}
    read = outputs_from_files(_package(outputs))
    assert np.array_equal(read["f"], outputs["f"]) and read["be"].dtype == np.dtype(">f4")


def test_the_element_budget_counts_every_output_before_loading() -> None:
    files = _package({"a": np.zeros(60, np.float32), "b": np.zeros(50, np.int8)})
    assert len(outputs_from_files(files, max_elements=110)) == 2
    with pytest.raises(CompareError, match="more than 109 elements"):
        outputs_from_files(files, max_elements=109)


def test_a_huge_declared_shape_is_refused_from_the_header_alone() -> None:
    small = np.zeros(4, np.float32)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    blob = header.getvalue() + small.tobytes()
    files = _forge([_entry("y", small, shape=[10**12])], {"outputs/y.npy": blob})
    with pytest.raises(CompareError, match="more than"):
        outputs_from_files(files)


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _structured_npy() -> bytes:
    return npy_bytes(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))


_x = np.arange(6, dtype=np.float32).reshape(2, 3)
_GOOD = npy_bytes(_x)

HOSTILE: dict[str, tuple[dict[str, bytes], str]] = {
    "no index": ({"outputs/y.npy": _GOOD}, "no output.json"),
    "index not JSON": ({"output.json": b"\xff{"}, "not valid JSON"),
    "index too large": ({"output.json": b" " * (1024 * 1024 + 1)}, "larger than"),
    "deep JSON": ({"output.json": b"[" * 100_000 + b"]" * 100_000}, "not valid JSON|no list"),
    "index a list": ({"output.json": b"[]"}, "no list of outputs"),
    "outputs not a list": ({"output.json": b'{"outputs": {}}'}, "no list of outputs"),
    "entry not an object": ({"output.json": b'{"outputs": [1]}'}, "not an object"),
    "too many outputs": (
        {"output.json": json.dumps({"outputs": [{}] * 1025}).encode()},
        "more than 1024",
    ),
    "missing file": (_forge([_entry("y", _x)], {}), "not in the package"),
    "sha256 mismatch": (
        _forge([_entry("y", _x, sha256="0" * 64)], {"outputs/y.npy": _GOOD}),
        "sha256",
    ),
    "bad sha256": (_forge([_entry("y", _x, sha256="xyz")], {"outputs/y.npy": _GOOD}), "sha256"),
    "repeated name": (
        _forge([_entry("y", _x), _entry("y", _x, path="outputs/z.npy")], {"outputs/y.npy": _GOOD}),
        "repeated name",
    ),
    "empty name": (_forge([_entry("", _x, path="outputs/y.npy")], {}), "bad or repeated name"),
    "path outside outputs": (
        _forge([_entry("y", _x, path="logs/stderr.log")], {"logs/stderr.log": _GOOD}),
        "bad or repeated path",
    ),
    "shape of floats": (_forge([_entry("y", _x, shape=[2.0, 3.0])], {}), "bad shape"),
    "shape of bools": (_forge([_entry("y", _x, shape=[True])], {}), "bad shape"),
    "negative shape": (_forge([_entry("y", _x, shape=[-1])], {}), "bad shape"),
    "dtype not a string": (_forge([_entry("y", _x, dtype=4)], {}), "bad dtype"),
    "index lies about dtype": (
        _forge([_entry("y", _x, dtype="float64")], {"outputs/y.npy": _GOOD}),
        "index says float64",
    ),
    "index lies about shape": (
        _forge([_entry("y", _x, shape=[3, 2])], {"outputs/y.npy": _GOOD}),
        "index says",
    ),
    "truncated data": (_forge([_entry("y", _x)], {"outputs/y.npy": _GOOD[:-4]}), "data length"),
    "trailing data": (_forge([_entry("y", _x)], {"outputs/y.npy": _GOOD + b"\0" * 4}), "length"),
    "not npy": (_forge([_entry("y", _x)], {"outputs/y.npy": b"PK\x03\x04zip"}), "npy header"),
    "npy version 3": (
        _forge([_entry("y", _x)], {"outputs/y.npy": _GOOD[:6] + b"\x03" + _GOOD[7:]}),
        "npy header",
    ),
    "pickled objects": (
        _forge([_entry("y", _x, dtype="object", shape=[1])], {"outputs/y.npy": _object_npy()}),
        "not allowed",
    ),
    "structured dtype": (
        _forge(
            [_entry("y", _x, dtype="[('a', '<f4'), ('b', '<i4')]", shape=[2])],
            {"outputs/y.npy": _structured_npy()},
        ),
        "not allowed",
    ),
    "datetime dtype": (
        _forge(
            [_entry("y", _x, dtype="datetime64[s]", shape=[2])],
            {"outputs/y.npy": npy_bytes(np.zeros(2, "datetime64[s]"))},
        ),
        "not allowed",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_malformed_package_raises_compare_error(case: str) -> None:
    files, message = HOSTILE[case]
    with pytest.raises(CompareError, match=message):
        outputs_from_files(files)


@given(st.binary(max_size=512), st.sampled_from(["data", "index"]))
def test_garbage_only_ever_raises_compare_error(junk: bytes, where: str) -> None:
    if where == "data":
        files = _forge([_entry("y", _x)], {"outputs/y.npy": junk})
    else:
        files = {"output.json": junk, "outputs/y.npy": _GOOD}
    with contextlib.suppress(CompareError):
        outputs_from_files(files)


@given(st.integers(0, len(_GOOD) - 1), st.integers(0, 255))
def test_a_flipped_byte_in_a_header_only_ever_raises_compare_error(at: int, value: int) -> None:
    blob = bytearray(_GOOD)
    blob[at] = value
    files = _forge([_entry("y", _x)], {"outputs/y.npy": bytes(blob)})
    try:
        read = outputs_from_files(files)
    except CompareError:
        return
    assert read["y"].dtype == _x.dtype and read["y"].shape == _x.shape

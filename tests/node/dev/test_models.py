"""The synthetic models tests, benchmarks and the demo run."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from node.dev.models import build_hanging_model, build_mlp, make_inputs

CPU = ["CPUExecutionProvider"]


def test_mlp_is_a_valid_model_onnxruntime_accepts() -> None:
    data = build_mlp()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert model.ir_version <= 13
    (x,) = model.graph.input
    assert x.name == "x"
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 16
    assert [o.name for o in model.graph.output] == ["y"]

    session = ort.InferenceSession(data, providers=CPU)
    for batch in (1, 5):
        (y,) = session.run(None, make_inputs(batch=batch))
        assert y.shape == (batch, 4)
        assert y.dtype == np.float32


def test_mlp_bytes_depend_only_on_arguments() -> None:
    assert build_mlp(seed=3) == build_mlp(seed=3)
    assert build_mlp(seed=3) != build_mlp(seed=4)
    model = onnx.load_from_string(build_mlp(in_dim=8, hidden=6, out_dim=2, layers=3))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    with pytest.raises(ValueError):
        build_mlp(layers=0)


def test_make_inputs_is_reproducible() -> None:
    a, b = make_inputs(in_dim=5, batch=3, seed=7), make_inputs(in_dim=5, batch=3, seed=7)
    assert a.keys() == {"x"}
    assert a["x"].shape == (3, 5) and a["x"].dtype == np.float32
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], make_inputs(in_dim=5, batch=3, seed=8)["x"])


def test_hanging_model_is_small_valid_and_really_hangs() -> None:
    data = build_hanging_model()
    assert len(data) < 1024
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=CPU)
    options = ort.RunOptions()
    options.log_severity_level = 4
    stopper = threading.Timer(0.3, lambda: setattr(options, "terminate", True))
    started = time.perf_counter()
    stopper.start()
    with pytest.raises(Exception, match="terminate"):
        session.run(None, {"x": np.zeros((2, 4), dtype=np.float32)}, options)
    assert time.perf_counter() - started >= 0.25

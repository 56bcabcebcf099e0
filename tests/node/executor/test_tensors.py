"""The .npz tensor bundle that carries job inputs and outputs, and the provider probe model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from node.dev.models import make_inputs
from node.executor.providers import IR_VERSION, _probe_model
from node.executor.tensors import decode_inputs, decode_tensors, encode_inputs, encode_tensors


def test_tensor_bundle_round_trips_dtypes_and_shapes() -> None:
    tensors = {
        "x": make_inputs()["x"],
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "mask": np.zeros((0, 2), dtype=bool),
        "scalar": np.array(2.5, dtype=np.float64),
        "text": np.array(["hello", "mesh"]),
        "name:0/with.dots": np.ones(2, dtype=np.float16),
    }
    back = decode_inputs(encode_inputs(tensors))
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    assert decode_tensors(encode_tensors({})) == {}


@pytest.mark.parametrize(
    "data",
    [b"", b"junk", b"PK\x03\x04not really a zip", b"\x80\x04K\x01."],
    ids=["empty", "junk", "broken-zip", "pickle"],
)
def test_bad_bundle_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"\.npz"):
        decode_inputs(data)


def test_single_npy_and_object_arrays_are_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    with pytest.raises(ValueError, match=r"single \.npy"):
        decode_inputs(buffer.getvalue())

    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_inputs(buffer.getvalue())

    with pytest.raises(ValueError, match="object"):
        encode_inputs({"x": np.array([None], dtype=object)})


def test_probe_model_is_valid_and_runs_on_cpu() -> None:
    data = _probe_model()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert model.ir_version == IR_VERSION
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([[1.0, 2.0]], dtype=np.float32)})
    np.testing.assert_array_equal(y, [[3.0]])

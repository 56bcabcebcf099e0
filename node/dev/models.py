"""Synthetic workloads for tests, benchmarks and the demo.

Tests, examples and benchmarks need models that build in microseconds without a
model hub, so they are generated with ``onnx.helper`` (imported inside the
builders only, so importing this module stays cheap). The tensor bundle format
that carries their inputs lives in :mod:`node.executor.tensors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from node.executor.providers import IR_VERSION, OPSET

if TYPE_CHECKING:
    import onnx


def _finish(graph: onnx.GraphProto, producer: str) -> bytes:
    from onnx import checker, helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer
    )
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model.SerializeToString()


def build_mlp(
    in_dim: int = 16, hidden: int = 32, out_dim: int = 4, seed: int = 0, layers: int = 2
) -> bytes:
    """A Gemm+Relu MLP whose bytes (and so whose CID) depend only on the arguments.

    Same arguments, same bytes: tests and the devstack can refer to the model by
    CID without storing it anywhere.
    """
    from onnx import TensorProto, helper, numpy_helper

    if layers < 1:
        raise ValueError("an MLP needs at least one layer")
    if min(in_dim, hidden, out_dim) < 1:
        raise ValueError("layer widths must be positive")
    rng = np.random.default_rng(seed)
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    nodes = []
    initializers = []
    current = "x"
    for i in range(layers):
        fan_in, fan_out = widths[i], widths[i + 1]
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == layers - 1
        gemm_out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"a{i}"]))
            current = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "meshrun_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_dim])],
        initializer=initializers,
    )
    return _finish(graph, "meshrun.models.build_mlp")


def build_hanging_model(in_dim: int = 4) -> bytes:
    """A valid model that never finishes in practice, for timeout and kill tests.

    A Loop with a trip count of 2**62 keeps one core busy inside onnxruntime,
    where no Python-level interrupt can reach it: exactly the case the worker
    process and its kill exist for.
    """
    return _spin_model(in_dim, fixed_trip_count=2**62, producer="build_hanging_model")


def build_spin_model(in_dim: int = 4) -> bytes:
    """Like the hanging model, but its inputs choose the run time.

    Input ``iterations`` (int64 scalar) is the Loop's trip count, so a test can ask
    for a job that runs for a few seconds and then finishes: long enough to kill
    or cancel its executor mid-run, short enough to also let it complete.
    """
    return _spin_model(in_dim, fixed_trip_count=None, producer="build_spin_model")


def _spin_model(in_dim: int, fixed_trip_count: int | None, producer: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Sin", ["v_in"], ["v_sin"]),
            helper.make_node("Add", ["v_sin", "v_in"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    trip = "trip_count" if fixed_trip_count is not None else "iterations"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])]
    initializers = [numpy_helper.from_array(np.array(True), "keep_going")]
    if fixed_trip_count is None:
        inputs.append(helper.make_tensor_value_info("iterations", TensorProto.INT64, []))
    else:
        initializers.append(
            numpy_helper.from_array(np.array(fixed_trip_count, dtype=np.int64), "trip_count")
        )
    graph = helper.make_graph(
        [helper.make_node("Loop", [trip, "keep_going", "x"], ["y"], body=body)],
        f"meshrun_{producer}",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", in_dim])],
        initializer=initializers,
    )
    return _finish(graph, f"meshrun.models.{producer}")


def build_lookup_model(rows: int = 4, dim: int = 3, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A table lookup (Gather) and its table: an index out of range fails that item's run.

    Real inputs can make a real model fail part-way through a batch; this is the
    smallest such model, for testing that work done before the failure is kept.
    """
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "meshrun_lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return _finish(graph, "meshrun.models.build_lookup_model"), table


def make_inputs(in_dim: int = 16, batch: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs matching :func:`build_mlp`, reproducible from the seed alone."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, in_dim)).astype(np.float32)}

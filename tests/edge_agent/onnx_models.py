"""Tiny ONNX classifiers built with the onnx helper API (no torch): logits = x W + b."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_onnx(
    w: np.ndarray, b: np.ndarray, *, input_dims: list[int | str] | None = None,
    input_type: int = TensorProto.FLOAT,
) -> bytes:  # fmt: skip
    """A model computing x @ w + b; input_dims: the declared input shape (default
    ["batch", w.shape[0]])."""
    dims = input_dims if input_dims is not None else ["batch", int(w.shape[0])]
    x = helper.make_tensor_value_info("x", input_type, dims)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", int(w.shape[1])])
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(b.astype(np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["logits"])]  # fmt: skip
    if input_type != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        nodes[1] = helper.make_node("MatMul", ["xf", "w"], ["xw"])
    graph = helper.make_graph(nodes, "linear", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def random_linear(features: int = 64, classes: int = 10, seed: int = 0, **kw: object) -> bytes:
    rng = np.random.default_rng(seed)
    return linear_onnx(rng.normal(size=(features, classes)), rng.normal(size=classes), **kw)  # type: ignore[arg-type]

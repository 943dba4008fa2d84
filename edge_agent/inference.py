"""Run the global model on the device with onnxruntime: no torch needed."""

from __future__ import annotations

import numpy as np


class OnnxModel:
    """An ONNX classifier loaded from bytes (the global version's ONNX export)."""

    def __init__(self, *, onnx_bytes: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ValueError(f"the global model's ONNX export cannot be loaded: {err}") from err
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs for a batch."""
        return self.session.run(None, {self.input_name: np.asarray(x, dtype=np.float32)})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class predictions for a batch."""
        return self.logits(x).argmax(axis=1)


def accuracy(model: OnnxModel, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> float:
    """Fraction of examples the model classifies correctly."""
    if len(x) == 0:
        raise ValueError("no examples to evaluate")
    correct = 0
    for first in range(0, len(x), batch_size):
        batch = slice(first, first + batch_size)
        correct += int((model.predict(x[batch]) == y[batch]).sum())
    return correct / len(x)

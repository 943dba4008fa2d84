"""Run the global model on the device with onnxruntime: no torch needed (except to export
a training device's own personal model, serving_model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edge_agent.state import DeviceStore
    from fedmq.tasks import Task


class OnnxModel:
    """An ONNX classifier loaded from bytes or a file (a global version's ONNX export)."""

    def __init__(self, *, onnx_bytes: bytes | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # a device's models are small and its batches too: no arena that keeps the peak
        opts.enable_cpu_mem_arena = False
        # no second, prepacked copy of the weights (it also grew the heap at every swap)
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # from a file: no copy of the model's bytes in the session (6 MB less for mnist-cnn)
        model = str(onnx_bytes) if isinstance(onnx_bytes, Path) else onnx_bytes
        try:
            self.session = ort.InferenceSession(
                model, sess_options=opts, providers=["CPUExecutionProvider"]
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


def serving_model(*, store: DeviceStore, task: Task, threads: int = 1) -> tuple[OnnxModel, str]:
    """The model this device serves, in onnxruntime, and which it is (serving_onnx)."""
    onnx_bytes, which = serving_onnx(store=store, task=task)
    return OnnxModel(onnx_bytes=onnx_bytes, threads=threads), which


def serving_onnx(*, store: DeviceStore, task: Task) -> tuple[bytes, str]:
    """The ONNX bytes of the model this device serves, and which it is: its personal model
    where it keeps one (edge_agent.personal), else the global version it holds. Exported
    here with torch: only a training device has a personal model, and torch with it. An
    inference-only device has no personal model: it serves the global version's published
    ONNX export (edge_agent/serving.py; evaluated by edge_agent/evaluation.py). ValueError
    if it holds nothing."""
    from edge_agent.personal import serving_weights
    from fedmq.tasks.weights import export_onnx, get_weights, set_weights
    from fedmq.wire import specs_of

    model = task.build_model()
    held = store.load_held(specs_of(get_weights(model)))
    weights, which = serving_weights(store, held.weights if held else None)
    if weights is None:
        raise ValueError("this device holds no model to serve yet")
    set_weights(model, weights)
    return export_onnx(model, task.input_shape), which

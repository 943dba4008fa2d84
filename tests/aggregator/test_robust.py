"""Robust rules and admission bounds against hand-computed references on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.bounds import ABSURD_FACTOR, adaptive_bound, clip_scale, example_cap, update_norm
from aggregator.fedavg import RunningSum
from aggregator.robust import (
    KeptUpdates,
    coordinate_median,
    krum_scores,
    make_rule,
    multi_krum,
    round_bound,
    trimmed_mean,
)
from fedmq.codecs import SparseTensor
from fedmq.errors import OutOfBounds
from fedmq.wire import TensorSpec

SPECS = (TensorSpec("w", "float32", (2, 2)), TensorSpec("b", "float32", (1,)))


def _u(w: list[float], b: float) -> dict[str, np.ndarray]:
    return {"w": np.array(w, np.float32).reshape(2, 2), "b": np.array([b], np.float32)}


def test_update_norm_counts_every_tensor_and_sparse_values() -> None:
    assert update_norm(_u([3, 0, 0, 0], 4)) == 5.0
    sparse = {"w": SparseTensor((2, 2), np.array([1, 3]), np.array([3.0, 4.0], np.float32))}
    assert update_norm(sparse) == 5.0


def test_clip_scale_clips_rejects_absurd_and_non_finite() -> None:
    assert clip_scale(2.0, 4.0) == 1.0
    assert clip_scale(8.0, 4.0) == 0.5
    assert clip_scale(8.0, 0.0) == 1.0  # no bound
    with pytest.raises(OutOfBounds):
        clip_scale(4.0 * ABSURD_FACTOR * 1.01, 4.0)
    for bad in (math.inf, math.nan):
        with pytest.raises(OutOfBounds):
            clip_scale(bad, 0.0)


def test_adaptive_bound_is_k_times_median_and_round_bound_prefers_fixed() -> None:
    assert adaptive_bound([1.0, 2.0, 100.0], 3.0) == 6.0
    assert adaptive_bound([], 3.0) == 0.0
    assert round_bound(fixed=0.0, factor=3.0, median_norm=2.0) == 6.0
    assert round_bound(fixed=5.0, factor=3.0, median_norm=2.0) == 5.0
    assert round_bound(fixed=0.0, factor=3.0, median_norm=0.0) == 0.0


def test_example_cap_takes_the_enrolled_maximum_when_lower() -> None:
    assert example_cap("a", max_examples=1000, enrolled={"a": 600}) == 600
    assert example_cap("a", max_examples=500, enrolled={"a": 600}) == 500
    assert example_cap("b", max_examples=1000, enrolled={"a": 600}) == 1000


def test_the_round_cap_bounds_what_an_update_may_claim() -> None:
    from aggregator.admission import Admission
    from aggregator.rounds import OpenRound
    from fedmq.wire import Update

    admission = Admission(specs=(), max_update_bytes=1024, max_examples=100_000,
                          example_caps={"a": 400})  # fmt: skip
    claim = Update("u1", "b", 1, 0, 90_000, "float32", b"")
    assert admission.cap_examples(claim).num_examples == 90_000  # under max_examples
    assert admission.cap_examples(claim, round_cap=600).num_examples == 600
    own = Update("u2", "a", 1, 0, 500, "float32", b"")
    assert admission.cap_examples(own, round_cap=600).num_examples == 400  # enrolled is lower
    # the round's cap travels with the round through the journal (a restart keeps it)
    r = OpenRound(round_id=3, model_version=2, selected=frozenset({"a"}), opened_at=0.0,
                  deadline=9.0, target=1, min_devices=1, example_cap=600)  # fmt: skip
    assert OpenRound.from_meta(r.meta()).example_cap == 600


def test_running_sum_clips_each_update_to_the_bound() -> None:
    acc = RunningSum(specs=SPECS, clip_to=1.0)
    p = acc.prepare(_u([3, 0, 0, 0], 4), 2.0)  # norm 5: scaled by 1/5, weight 2
    assert p.clipped and p.l2 == 5.0
    acc.add_prepared(p)
    acc.add(_u([0, 0, 0, 0.5], 0), 2.0)  # norm 0.5: untouched
    mean = acc.mean()
    np.testing.assert_allclose(mean["w"].reshape(-1), [0.6 / 2, 0, 0, 0.5 / 2])
    np.testing.assert_allclose(mean["b"], [0.8 / 2])


def test_clip_rule_weighs_updates_alike_whatever_they_claim() -> None:
    acc = make_rule(specs=SPECS, rule="clip", bound=0.0, clip_norm=10.0)
    acc.add(_u([1, 1, 1, 1], 1), 1_000_000.0)
    acc.add(_u([3, 3, 3, 3], 3), 1.0)
    np.testing.assert_allclose(acc.mean()["w"], 2.0)
    # async: the staleness discount (weight / norm) still applies
    acc = make_rule(specs=SPECS, rule="clip", bound=0.0, clip_norm=10.0)
    acc.add(_u([2, 2, 2, 2], 2), 50.0, norm=100.0)
    np.testing.assert_allclose(acc.mean()["b"], [1.0])


TINY = [np.array(v, np.float64) for v in ([1, 10, -3], [2, 20, 0], [3, -50, 5],
                                           [4, 40, 1], [100, 0, 2])]  # fmt: skip


def test_coordinate_median_by_hand() -> None:
    np.testing.assert_allclose(coordinate_median(TINY), [3, 10, 1])
    np.testing.assert_allclose(coordinate_median(TINY[:4]), [2.5, 15, 0.5])


def test_trimmed_mean_by_hand() -> None:
    # trim 0.2 of 5: drop one at each end per coordinate
    np.testing.assert_allclose(trimmed_mean(TINY, 0.2), [3, (0 + 10 + 20) / 3, 1])
    np.testing.assert_allclose(trimmed_mean(TINY, 0.0), np.mean(TINY, axis=0))
    # a trim that would drop everything keeps the middle value
    np.testing.assert_allclose(trimmed_mean(TINY[:2], 0.49), [1.5, 15, -1.5])


def test_krum_by_hand() -> None:
    pts = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]),
           np.array([10.0, 10.0])]  # fmt: skip
    # f = 1, n = 4: each scores its n - f - 2 = 1 nearest squared distance
    np.testing.assert_allclose(krum_scores(pts, 1), [1, 1, 1, 181])
    # Krum (m = 1) picks the first of the tied best; Multi-Krum (m = n - f) their mean
    np.testing.assert_allclose(multi_krum(pts, 1, 1), [0, 0])
    np.testing.assert_allclose(multi_krum(pts, 1), [1 / 3, 1 / 3])


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_kept_updates_per_tensor_matches_the_flat_rule(rule: str) -> None:
    rng = np.random.default_rng(1)
    ups = [_u(list(rng.normal(size=4)), float(rng.normal())) for _ in range(6)]
    acc = KeptUpdates(specs=SPECS, rule=rule, trim=0.2, krum_f=1)
    for u in ups:
        acc.add(u, 123.0)
    flats = [np.concatenate([u["w"].reshape(-1), u["b"]]).astype(np.float64) for u in ups]
    want = {"median": lambda: coordinate_median(flats),
            "trimmed_mean": lambda: trimmed_mean(flats, 0.2),
            "krum": lambda: multi_krum(flats, 1)}[rule]()  # fmt: skip
    got = acc.mean()
    np.testing.assert_allclose(np.concatenate([got["w"].reshape(-1), got["b"]]), want,
                               rtol=1e-6)  # fmt: skip
    assert acc.count == 6 and not acc.streaming


def test_kept_updates_clip_densify_sparse_and_discount() -> None:
    acc = KeptUpdates(specs=SPECS, rule="median", clip_to=1.0)
    sparse = {"w": SparseTensor((2, 2), np.array([0, 3]), np.array([3.0, 4.0], np.float32)),
              "b": np.zeros(1, np.float32)}  # fmt: skip
    p = acc.prepare(sparse, 10.0, norm=20.0)  # norm 5 clipped to 1, discount 0.5
    assert p.clipped
    np.testing.assert_allclose(p.parts[""], [0.3, 0, 0, 0.4, 0], rtol=1e-6)


def test_median_resists_what_fedavg_does_not() -> None:
    honest = [_u([1, 1, 1, 1], 1) for _ in range(4)]
    evil = _u([-1e3, -1e3, -1e3, -1e3], -1e3)
    fed = make_rule(specs=SPECS, rule="fedavg", bound=0.0)
    med = make_rule(specs=SPECS, rule="median", bound=0.0)
    for acc in (fed, med):
        for u in [*honest, evil]:
            acc.add(u, 1.0)
    assert fed.mean()["b"][0] < -100
    np.testing.assert_allclose(med.mean()["b"], [1.0])


def test_make_rule_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="rule must be one of"):
        make_rule(specs=SPECS, rule="mean", bound=0.0)


def test_settings_refuse_rules_and_dp_that_cannot_work() -> None:
    from aggregator.settings import AggregatorSettings as S

    ok = S(insecure=True)
    assert (ok.rule, ok.norm_bound_factor, ok.max_examples) == ("fedavg", 3.0, 100_000)
    S(insecure=True, rule="clip", clip_norm=1.0, dp_epsilon=4.0, rounds=30)
    for bad, match in [
        ({"rule": "mean"}, "rule must be one of"),
        ({"norm_bound_factor": 0.5}, "at least 1"),
        ({"max_examples": 0}, "max_examples"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"rule": "median", "dp_noise_multiplier": 1.0}, "rule = 'clip'"),
        ({"rule": "clip", "dp_noise_multiplier": 1.0}, "fixed clip_norm"),
        ({"rule": "clip", "clip_norm": 1.0, "dp_epsilon": 1.0, "rounds": 0}, "number of rounds"),
        ({"dp_noise_multiplier": 1.0, "dp_epsilon": 1.0}, "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            S(insecure=True, **bad)

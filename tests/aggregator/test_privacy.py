"""Central and local DP: clipping bounds the norm, the noise has its scale, and the
epsilon spent grows with rounds exactly as dp-accounting computes it."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from aggregator.bounds import update_norm
from aggregator.privacy import (
    PrivacySpent,
    epsilon_of,
    local_epsilon,
    local_noise_for_epsilon,
    noise_for_epsilon,
)
from aggregator.robust import make_rule
from edge_agent.privacy import privatize
from fedmq.wire import TensorSpec

SPECS = (TensorSpec("w", "float32", (200, 250)), TensorSpec("b", "float32", (50,)))
N_COORDS = 200 * 250 + 50


def _zeros() -> dict[str, np.ndarray]:
    return {s.name: np.zeros(s.shape, np.float32) for s in SPECS}


def test_central_noise_has_std_z_c_over_n() -> None:
    z, c, n = 1.5, 0.8, 4
    acc = make_rule(specs=SPECS, rule="clip", bound=0.0, clip_norm=c, noise_multiplier=z,
                    rng=np.random.default_rng(7))  # fmt: skip
    for _ in range(n):
        acc.add(_zeros(), 10.0)
    flat = np.concatenate([v.reshape(-1) for v in acc.mean().values()])
    # 50,050 draws: the sample std is within 2% of the truth (about 6 standard errors)
    assert np.std(flat) == pytest.approx(z * c / n, rel=0.02)
    assert abs(np.mean(flat)) < 6 * (z * c / n) / np.sqrt(N_COORDS)


def test_no_noise_without_dp_and_dp_needs_a_fixed_clip() -> None:
    acc = make_rule(specs=SPECS, rule="clip", bound=0.0, clip_norm=1.0)
    acc.add(_zeros(), 1.0)
    assert all(not v.any() for v in acc.mean().values())
    with pytest.raises(ValueError, match="fixed clip_norm"):
        make_rule(specs=SPECS, rule="clip", bound=0.0, median_norm=1.0, noise_multiplier=1.0)


def test_clipping_bounds_every_contribution() -> None:
    rng = np.random.default_rng(3)
    acc = make_rule(specs=SPECS, rule="clip", bound=0.0, clip_norm=0.5, noise_multiplier=1.0,
                    rng=rng)  # fmt: skip
    for scale in (0.0001, 0.01, 1.0):  # norms about 0.02, 2.2 and 224
        d = {s.name: (scale * rng.normal(size=s.shape)).astype(np.float32) for s in SPECS}
        p = acc.prepare(d, 10.0)
        contribution = {k: v for k, v in p.parts.items() if isinstance(v, np.ndarray)}
        assert update_norm(contribution) <= 0.5 * (1 + 1e-9)
        assert p.clipped == (scale > 0.0001)


def test_epsilon_grows_with_rounds_and_matches_dp_accounting() -> None:
    z, q, delta = 1.1, 0.25, 1e-5
    spent = PrivacySpent(delta=delta)
    eps = [spent.record(noise_multiplier=z, q=q) for _ in range(5)]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 5)
    assert eps[-1] == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    # the ledger survives state.json, and a change of z starts a new run of rounds
    again = PrivacySpent.from_json(spent.to_json(), delta=delta)
    assert again.epsilon == pytest.approx(eps[-1]) and again.rounds == 5
    again.record(noise_multiplier=2.0, q=q)
    assert again.steps == [(z, q, 5), (2.0, q, 1)] and again.epsilon > eps[-1]


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_for_epsilon_spends_the_target(target: float) -> None:
    z = noise_for_epsilon(epsilon=target, delta=1e-5, rounds=30, q=1.0)
    assert epsilon_of([(z, 1.0, 30)], 1e-5) == pytest.approx(target, rel=1e-2)
    assert noise_for_epsilon(epsilon=target, delta=1e-5, rounds=30, q=0.1) < z  # amplified


def test_local_dp_clips_then_adds_noise_of_its_scale() -> None:
    rng = np.random.default_rng(11)
    big = {s.name: np.full(s.shape, 3.0, np.float32) for s in SPECS}
    clipped = privatize(big, clip=2.0, noise_multiplier=0.0, rng=rng)
    assert update_norm(clipped) == pytest.approx(2.0, rel=1e-5)
    noised = privatize(_zeros(), clip=2.0, noise_multiplier=0.5, rng=rng)
    flat = np.concatenate([v.reshape(-1) for v in noised.values()])
    assert np.std(flat) == pytest.approx(1.0, rel=0.02)
    z = local_noise_for_epsilon(epsilon=4.0, delta=1e-5, rounds=30)
    assert local_epsilon(noise_multiplier=z, delta=1e-5, rounds=30) == pytest.approx(4, rel=1e-2)

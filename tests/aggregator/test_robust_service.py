"""Central DP and the admission bounds through the real service and a real Mosquitto: the
(epsilon, delta) spent after every round in history and in the status, the bounds and the
rule in the status, the adaptive bound learnt from the round before."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from aggregator.privacy import epsilon_of
from aggregator.store import read_history
from fedmq.wire import decode_weights
from tests.aggregator import test_service

_update = test_service._update
service = test_service.service  # the service + scripted device fixture, shared

DP = {"rule": "clip", "clip_norm": 1.0, "dp_noise_multiplier": 1.3}


def _weights(dev: Any, version: int) -> dict[str, np.ndarray]:
    m = dev.pump(lambda: next((m for m in dev.manifests if m.version == version), None))
    return decode_weights(dev.pump(lambda: dev.payloads.get(m.weights.payload_id)))


@pytest.mark.parametrize("service", [DP], indirect=True)
def test_central_dp_reports_epsilon_after_every_round(service: tuple[Any, Any]) -> None:
    agg, dev = service
    dev.online("a", "b")
    for round_id in (1, 2):
        dev.open_round(round_id)
        w = _weights(dev, round_id - 1)
        for d in ("a", "b"):  # norms far over C = 1: clipped, and weighed alike
            big = {k: np.full_like(v, 0.5) for k, v in w.items()}
            dev.send(d, _update(f"{d}{round_id}", d, round_id, round_id - 1, big, n=1000))
            assert dev.ack_for(f"{d}{round_id}").status == "accepted"
    history = dev.pump(lambda: len(read_history(agg.s.state_dir)) >= 2
                       and read_history(agg.s.state_dir))  # fmt: skip
    eps = [h["dp_epsilon"] for h in history]
    assert eps == pytest.approx([epsilon_of([(1.3, 1.0, k)], 1e-5) for k in (1, 2)])
    assert eps[0] < eps[1] and {h["dp_delta"] for h in history} == {1e-5}
    assert all(p["clipped"] for h in history for p in h["participants"])
    status = agg.status(time.time())["aggregation"]
    assert status["rule"] == "clip" and status["privacy"]["rounds"] == 2
    assert status["privacy"]["epsilon"] == pytest.approx(eps[-1])


# the adaptive bounds on (the service fixture turns them off); k = 3 for both
ADAPTIVE = {"norm_bound_factor": 3.0, "examples_factor": 3.0}


@pytest.mark.parametrize("service", [{"rule": "median", **ADAPTIVE}], indirect=True)
def test_adaptive_bound_comes_from_the_previous_round(service: tuple[Any, Any]) -> None:
    agg, dev = service
    dev.online("a", "b")
    dev.open_round(1)
    w = _weights(dev, 0)
    n = sum(v.size for v in w.values())
    for d, value in (("a", 0.01), ("b", 0.03)):
        dev.send(d, _update(f"{d}1", d, 1, 0, {k: np.full_like(v, value) for k, v in w.items()}))
        assert dev.ack_for(f"{d}1").status == "accepted"
    dev.open_round(2)
    median = 0.02 * np.sqrt(n)  # the median L2 norm of round 1
    assert agg.status(time.time())["aggregation"]["norm_bound"] == pytest.approx(3 * median)
    w1 = _weights(dev, 1)
    huge = {k: np.full_like(v, 1.0) for k, v in w1.items()}  # 100 x the bound: clipped
    dev.send("a", _update("a2", "a", 2, 1, huge))
    dev.send("b", _update("b2", "b", 2, 1, {k: np.full_like(v, 0.02) for k, v in w1.items()}))
    assert dev.ack_for("a2").status == "accepted" and dev.ack_for("b2").status == "accepted"
    w2 = _weights(dev, 2)
    # the median of two is their mean: 0.02 and the clipped 3 x median / sqrt(n) = 0.06
    for k in w1:
        np.testing.assert_allclose(w2[k] - w1[k], 0.04, rtol=1e-4)
    assert agg.ledger.counters["clipped"] == 1


@pytest.mark.parametrize("service", [ADAPTIVE], indirect=True)
def test_an_inflated_example_count_is_capped_at_k_times_the_last_median(
    service: tuple[Any, Any],
) -> None:
    """No fleet file caps these devices: round 1 weighs updates alike (no claim is known to
    be normal yet), round 2's cap comes from round 1's median claim, so a device claiming
    1,000,000 examples (model replacement's lever) weighs 3 x 10."""
    agg, dev = service
    dev.online("a", "b")
    dev.open_round(1)
    w = _weights(dev, 0)
    for d in ("a", "b"):
        dev.send(d, _update(f"{d}1", d, 1, 0, {k: np.full_like(v, 0.01) for k, v in w.items()}))
        assert dev.ack_for(f"{d}1").status == "accepted"
    dev.open_round(2)
    w1 = _weights(dev, 1)
    dev.send("a", _update("a2", "a", 2, 1, {k: np.full_like(v, 0.02) for k, v in w1.items()},
                          n=1_000_000))  # fmt: skip
    dev.send("b", _update("b2", "b", 2, 1, {k: np.full_like(v, 0.01) for k, v in w1.items()}))
    assert dev.ack_for("a2").status == "accepted" and dev.ack_for("b2").status == "accepted"
    w2 = _weights(dev, 2)
    # weights 30 (capped) and 10: the mean delta is (30 x 0.02 + 10 x 0.01) / 40
    for k in w1:
        np.testing.assert_allclose(w2[k] - w1[k], 0.0175, rtol=1e-3)
    from fedmq.report import read_history

    history = dev.pump(lambda: len(read_history(agg.s.state_dir)) >= 2
                       and read_history(agg.s.state_dir))  # fmt: skip
    assert [r["example_cap"] for r in history] == [1, 30]  # round 1: no median, alike
    (capped,) = [p for p in history[1]["participants"] if p["device"] == "a"]
    assert capped["examples"] == 30 and capped["examples_claimed"] == 1_000_000
    assert agg.ledger.counters["examples_capped"] == 3  # both of round 1, a's of round 2


def test_fleet_file_caps_examples_and_sets_the_sampling_rate(tmp_path: Any) -> None:
    from aggregator.service import Aggregator
    from aggregator.settings import AggregatorSettings

    fleet = tmp_path / "fleet.toml"
    fleet.write_text('job = "svc"\n'
                     '[[device]]\nid = "a"\nmax_examples = 600\n'
                     '[[device]]\nid = "b"\n'
                     '[[device]]\nid = "c"\nmax_examples = 5\nrevoked = true\n'
                     '[[device]]\nid = "d"\n')  # fmt: skip
    s = AggregatorSettings(job="svc", task="digits-mlp", state_dir=tmp_path / "agg",
                           fleet_file=fleet, insecure=True, publish_onnx=False,
                           devices_per_round=2, rule="clip", clip_norm=1.0,
                           dp_epsilon=2.0, rounds=10)  # fmt: skip
    agg = Aggregator(settings=s)
    try:
        assert dict(agg.admission.example_caps) == {"a": 600}  # the revoked device is gone
        assert agg.admission.enrolled == frozenset({"a", "b", "d"})
        assert agg.guards.enrolled_count == 3 and agg.guards.sample_rate(2) == pytest.approx(2 / 3)
        # z was calibrated for 10 rounds at q = 2 / 3: spending them all gives epsilon 2
        spent = epsilon_of([(agg.guards.noise_multiplier, 2 / 3, 10)], 1e-5)
        assert spent == pytest.approx(2.0, rel=1e-2)
    finally:
        agg.journal.close()
        agg.intake.close()

"""SCAFFOLD's and FedNova's arithmetic against hand-computed references on tiny tensors;
the round's `correction` field on the wire. Pure: no broker, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.correction import (
    check_local_steps,
    control_delta,
    control_name,
    effective_steps,
    expected_steps,
    fednova_mean,
    gradient_correction,
    next_server_control,
    with_control,
)
from fedmq.errors import SchemaError
from fedmq.wire import RoundAnnouncement, TrainConfig, decode_round, encode_round
from fedmq.wire.framing import unpack_message

C = {"w": np.array([1.0, -2.0], dtype=np.float32)}
C_I = {"w": np.array([0.5, 0.5], dtype=np.float32)}
DELTA = {"w": np.array([0.5, -1.0], dtype=np.float32)}  # y_i - x after K = 5 steps of lr 0.1


def test_device_correction_and_control_delta_match_the_hand_reference() -> None:
    # every local gradient gets c - c_i = (0.5, -2.5)
    np.testing.assert_array_equal(gradient_correction(C, C_I)["w"], [0.5, -2.5])
    # option II: c_i+ - c_i = -c + (x - y_i) / (K lr) = -(1, -2) - (0.5, -1) / 0.5 = (-2, 4)
    dc = control_delta(c_server=C, delta=DELTA, steps=5, lr=0.1)
    np.testing.assert_allclose(dc["w"], [-2.0, 4.0], rtol=1e-6)
    base = {"w": np.array([3.0, 3.0], dtype=np.float32)}
    trained = {"w": base["w"] + DELTA["w"]}
    b, t, c_new = with_control(base=base, trained=trained, c_server=C, c_local=C_I, steps=5,
                               lr=0.1)  # fmt: skip
    np.testing.assert_allclose(c_new["w"], [-1.5, 4.5], rtol=1e-6)  # c_i + (-2, 4)
    # the update body is trained - base: the model delta and the control delta side by side
    np.testing.assert_allclose(t["w"] - b["w"], DELTA["w"])
    np.testing.assert_allclose(t[control_name("w")] - b[control_name("w")], [-2.0, 4.0],
                               rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError):
        control_delta(c_server=C, delta=DELTA, steps=0, lr=0.1)


def test_server_control_moves_by_the_participating_share_of_the_mean_delta() -> None:
    # c + |S|/N mean dc = (1, -2) + 2/4 * (-2, 4) = (0, 0)
    nxt = next_server_control(C, {"w": np.array([-2.0, 4.0])}, participating=2, population=4)
    np.testing.assert_array_equal(nxt["w"], [0.0, 0.0])
    assert nxt["w"].dtype == np.float64
    # N below |S| (a device the aggregator never saw online) counts as |S|: share 1
    nxt = next_server_control(C, {"w": np.array([-2.0, 4.0])}, participating=3, population=1)
    np.testing.assert_array_equal(nxt["w"], [-1.0, 2.0])


def test_fednova_matches_the_hand_reference_and_differs_from_fedavg() -> None:
    d1, d2 = {"w": np.array([4.0, 8.0])}, {"w": np.array([1.0, 1.0])}
    # p = (1/4, 3/4), tau = (4, 1): tau_eff = 1/4 * 4 + 3/4 * 1 = 1.75
    assert effective_steps([(1.0, 4.0), (3.0, 1.0)]) == 1.75
    # tau_eff * (1/4 * (4, 8) / 4 + 3/4 * (1, 1) / 1) = 1.75 * (1, 1.25) = (1.75, 2.1875)
    np.testing.assert_array_equal(fednova_mean([(d1, 1.0, 4.0), (d2, 3.0, 1.0)])["w"],
                                  [1.75, 2.1875])  # fmt: skip
    # FedAvg would give 1/4 * (4, 8) + 3/4 * (1, 1) = (1.75, 2.75): the long run over-weighs
    # equal work everywhere: FedNova is FedAvg
    np.testing.assert_allclose(fednova_mean([(d1, 1.0, 3.0), (d2, 3.0, 3.0)])["w"],
                               [1.75, 2.75], rtol=1e-15)  # fmt: skip


def test_local_steps_are_bounded_by_what_the_examples_allow() -> None:
    kw = {"num_examples": 25, "epochs": 1, "batch_size": 10}
    assert expected_steps(25, epochs=2, batch_size=10) == 6
    assert check_local_steps(3, **kw) == "" and check_local_steps(25, **kw) == ""
    for bad in (2, 26, 2.5, float("nan"), float("inf"), -1):
        assert "local_steps" in check_local_steps(bad, **kw), bad


def _round(train: TrainConfig) -> RoundAnnouncement:
    return RoundAnnouncement(job="j", round_id=1, model_version=0, state="open", opened_at=0.0,
                             deadline=1.0, selected=("d",), target=1, min_devices=1,
                             train=train)  # fmt: skip


def test_correction_is_on_the_wire_only_when_on_and_unknown_values_are_refused() -> None:
    plain = encode_round(_round(TrainConfig()))
    assert "correction" not in unpack_message(plain, "round", 1 << 20)["train"]
    on = encode_round(_round(TrainConfig(correction="scaffold")))
    assert decode_round(on).train.correction == "scaffold"
    assert decode_round(plain).train.correction == "none"
    forged = on.replace(b"scaffold", b"scaffole")
    with pytest.raises(SchemaError, match="correction"):
        decode_round(forged)

"""Local DP in build_update: what leaves the device is clipped and noised, with OS noise."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.bounds import update_norm
from edge_agent.privacy import LocalDP
from edge_agent.settings import AgentSettings
from edge_agent.updates import BuiltUpdate, build_update, update_rng
from fedmq.codecs import decode_tensors
from fedmq.wire import RoundAnnouncement, TrainConfig, specs_of

BASE = {"w": np.zeros((40, 50), np.float32), "b": np.zeros(50, np.float32)}


def _round() -> RoundAnnouncement:
    return RoundAnnouncement(job="j", round_id=3, model_version=1, state="open", opened_at=0.0,
                             deadline=1e9, selected=("d",), target=1, min_devices=1,
                             train=TrainConfig(epochs=1, batch_size=10, lr=0.1, momentum=0.0),
                             codec="float32", max_update_bytes=0)  # fmt: skip


def _build(local_dp: LocalDP | None) -> dict[str, np.ndarray]:
    trained = {k: v + 5.0 for k, v in BASE.items()}  # norm 5 x sqrt(2050), far over the clip
    built = build_update(announcement=_round(), device="d", update_id="u", base=BASE,
                         trained=trained, residual=None, profile_max_bytes=0, num_examples=10,
                         metrics={}, fetched_bytes=0, rng=update_rng(3, "d"),
                         local_dp=local_dp)  # fmt: skip
    assert isinstance(built, BuiltUpdate)
    t = decode_tensors(built.update.body, built.update.codec, specs_of(BASE))
    return {k: np.asarray(v) for k, v in t.items()}


def test_clip_only_bounds_the_norm_of_what_is_sent() -> None:
    assert update_norm(_build(None)) == pytest.approx(5 * np.sqrt(2050), rel=1e-6)
    assert update_norm(_build(LocalDP(clip=1.0))) == pytest.approx(1.0, rel=1e-5)


def test_noise_is_fresh_each_time_and_of_its_scale() -> None:
    a, b = _build(LocalDP(clip=1.0, noise_multiplier=2.0)), _build(LocalDP(1.0, 2.0))
    assert not np.array_equal(a["w"], b["w"])  # not the seeded update generator
    flat = np.concatenate([(a[k] - np.mean(a[k])).reshape(-1) for k in a])
    # 2050 draws: the standard error of the std is 1.6%, so 10% is over 6 of them
    assert np.std(flat) == pytest.approx(2.0, rel=0.1)


def test_settings_validate_local_dp() -> None:
    assert AgentSettings(insecure=True).local_dp is None
    assert AgentSettings(insecure=True, local_dp_clip=1.0, local_dp_noise=0.5).local_dp == LocalDP(
        1.0, 0.5
    )
    with pytest.raises(ValueError, match="local_dp_noise needs"):
        AgentSettings(insecure=True, local_dp_noise=1.0)

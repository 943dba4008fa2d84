"""Every pool a peer can grow is bounded (ids, the device table, the round's selection,
metrics) and no model that would not fit the downlink becomes a version. Pure tests,
each written as the attack that used to work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.admission import Admission, check_device_id
from aggregator.globals import GlobalModel, ModelRefused
from aggregator.modes import BufferedRounds, SyncRounds
from aggregator.presence import Presence
from aggregator.settings import AggregatorSettings
from aggregator.store import Store
from fedmq.codecs import parse_or_schema_error, parse_pipeline
from fedmq.errors import MAX_REASON_CHARS, OverCapacity, ProtocolError, SchemaError, Unauthorized
from fedmq.tasks import get_task
from fedmq.topics import check_name
from fedmq.wire import (
    DeviceState,
    RoundAnnouncement,
    TrainConfig,
    Update,
    decode_state,
    decode_update,
    encode_round,
    encode_state,
    encode_update,
)

ODD_IDS = [".", "..", "a b", "x" * 1000, "evil\u202eexe", "a\n", "", "a/b", "+", "#"]


@pytest.mark.parametrize("device", ODD_IDS)
def test_odd_ids_are_refused_before_any_other_use(device: str) -> None:
    with pytest.raises(ValueError):
        check_name("device id", device)
    with pytest.raises(SchemaError, match="device id"):
        check_device_id(device)
    with pytest.raises(SchemaError):
        Admission(specs=(), max_update_bytes=1024).sender(device)


def test_only_enrolled_devices_may_send_when_a_fleet_file_says_who_is() -> None:
    admission = Admission(specs=(), max_update_bytes=1024, enrolled=frozenset({"a", "b"}))
    assert admission.sender("a") == "a"
    with pytest.raises(Unauthorized, match="not enrolled"):
        admission.sender("mallory")
    presence = Presence(job="j", enrolled=frozenset({"a", "b"}))
    with pytest.raises(Unauthorized, match="not enrolled"):
        presence.observe("mallory", _state("mallory", "online"), 0.0)
    assert presence.observe("a", _state("a", "online"), 0.0)
    assert presence.trainers_online() == ["a"]


def _state(device: str, status: str, job: str = "j") -> DeviceState:
    return DeviceState(device, status, job, "rpi4", "test", 10, -1, 0.0)


def test_a_will_storm_from_unknown_ids_leaves_the_table_as_it_was() -> None:
    presence = Presence(job="j", max_devices=5)
    presence.observe("a", _state("a", "online"), 0.0)
    for i in range(17_000):  # retained offline states / Wills of ids never seen online
        assert not presence.observe(f"ghost-{i}", _state(f"ghost-{i}", "offline"), 1.0)
    assert list(presence.devices) == ["a"] and not presence.pending_drops
    assert presence.trainers_online() == ["a"]


def test_the_device_table_is_bounded_and_offline_devices_give_way() -> None:
    presence = Presence(job="j", max_devices=3)
    for d in "abc":
        presence.observe(d, _state(d, "online"), 0.0)
    with pytest.raises(OverCapacity, match="device table full"):
        presence.observe("d", _state("d", "online"), 1.0)
    presence.observe("b", _state("b", "offline"), 2.0)
    presence.observe("d", _state("d", "online"), 3.0)  # b gives way
    assert sorted(presence.devices) == ["a", "c", "d"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_round_message_fits_whatever_the_fleet_claims(mode: str) -> None:
    """The attack: 17,000 fake device states made the round message 1.05 MB, over the
    devices' 1 MiB cap, and no device trained again."""
    s = AggregatorSettings(mode=mode, max_message_bytes=256 * 1024, insecure=True)
    online = [f"{i:05d}".ljust(64, "x") for i in range(17_000)]  # the longest valid ids
    m = (BufferedRounds(policy=s.policy, buffer=s.buffer) if mode == "async"
         else SyncRounds(policy=s.policy))  # fmt: skip
    r = m.open(round_id=1, version=0, online=online, seed=0, now=0.0)
    assert 0 < len(r.selected) <= s.max_selected
    msg = encode_round(RoundAnnouncement(
        job="j" * 64, round_id=1, model_version=0, state="open", opened_at=0.0,
        deadline=1.0, selected=tuple(sorted(r.selected)), target=r.target,
        min_devices=r.min_devices, train=TrainConfig(), codec="topk:0.1+int8+zstd",
        max_update_bytes=0))  # fmt: skip
    assert len(msg) <= s.max_message_bytes
    tiny = AggregatorSettings(mode=mode, max_message_bytes=4096, insecure=True)
    assert tiny.policy.max_selected * 66 + 512 <= 4096


def test_a_round_cannot_ask_for_more_devices_than_it_may_select() -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        AggregatorSettings(devices_per_round=20, min_devices=2, max_selected=10, insecure=True)


def test_update_metrics_are_bounded_and_finite() -> None:
    def update(metrics: dict[str, float]) -> bytes:
        return encode_update(Update("u", "a", 1, 0, 10, "float32", b"", metrics=metrics))

    assert decode_update(update({"train_loss": 0.5})).metrics == {"train_loss": 0.5}
    for bad in ({f"m{i}": 1.0 for i in range(65)}, {"x" * 65: 1.0}, {"loss": float("nan")},
                {"loss": np.inf}):  # fmt: skip
        with pytest.raises(SchemaError):
            decode_update(update(bad))


def test_what_a_peer_sends_is_bounded_before_it_is_kept_or_quoted() -> None:
    """A state the device table keeps, a codec name an ack and the ledger quote."""
    big = DeviceState("a", "online", "j", profile="p" * 10_000, agent_version="1")
    with pytest.raises(SchemaError, match="at most 128"):
        decode_state(encode_state(big))
    with pytest.raises(SchemaError, match="at most 128"):
        decode_update(encode_update(Update("u", "a", 1, 0, 10, "float32" * 1000, b"")))
    with pytest.raises(SchemaError) as err:  # the reason quotes the name: bounded
        parse_or_schema_error("topk:" + "9" * 100_000)
    assert len(err.value.reason) <= MAX_REASON_CHARS
    assert len(str(ProtocolError("x" * 100_000, device="a"))) < MAX_REASON_CHARS + 32


@pytest.mark.parametrize(
    ("downlink", "delta", "value"),
    [("float32", "", np.inf), ("float32", "", np.nan), ("fp16", "", 1e5),
     ("int8", "", -np.inf), ("float32", "fp16", 1e5)],
)  # fmt: skip
def test_a_model_that_would_not_fit_the_downlink_never_becomes_a_version(
    tmp_path: Path, downlink: str, delta: str, value: float
) -> None:
    model = GlobalModel(task=get_task("digits-mlp"), store=Store(root=tmp_path),
                        downlink=parse_pipeline(downlink),
                        downlink_delta=parse_pipeline(delta) if delta else None)  # fmt: skip
    model.load_or_init()
    before = (model.version, model.full_body, model.model_sha, dict(model.metrics), model.onnx)
    files = sorted(p.name for p in (tmp_path / "versions").iterdir())
    bad = {k: np.full_like(w, value) for k, w in model.weights.items()}
    with pytest.raises(ModelRefused):
        model.advance(bad, round_id=1)
    assert (model.version, model.full_body, model.model_sha, model.metrics, model.onnx) == before
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == files
    fine = {k: w + 0.01 for k, w in model.weights.items()}  # and the next one works
    model.advance(fine, round_id=2)
    assert model.version == 1 and np.isfinite(model.metrics["loss"])

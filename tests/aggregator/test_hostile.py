"""Attacks on the aggregator that used to stop it, each played against a real Mosquitto.

Every test is the attack: a poisoned update, a model that would leave the downlink's
range, a poisoned state directory on restart. Each must end as a rejection with a reason
or an abandoned round in the ledger and history, and the next round must work.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.globals import GlobalModel
from aggregator.journal import Accepted, Journal, Snapshot, read_ledger
from aggregator.server_opt import encode_opt_state, fresh_state
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import Store, read_history
from fedmq.chunks import encode_chunks, split_payload
from fedmq.codecs import encode_tensors, parse_pipeline
from fedmq.tasks import get_task
from fedmq.tasks import weights as tw
from fedmq.wire import (
    DeviceState,
    TensorSpec,
    Update,
    decode_weights,
    encode_chunk,
    encode_manifest,
    encode_state,
    encode_update,
    encode_weights,
    specs_of,
)
from tests.aggregator.test_service import ScriptedDevice, _update

Start = Callable[..., tuple[Aggregator, ScriptedDevice]]


@pytest.fixture
def start(plain_broker: Any, tmp_path: Path, topic_prefix: str) -> Iterator[Start]:
    """start(**settings) runs an aggregator for devices 'a' and 'b' in a thread. The scripted
    side plays every device (and the attacker) with one client, so the broker is a plain one:
    what these attacks meet is the aggregator's admission, as from an enrolled device that
    the ACL lets publish on its own topic (tests/broker/test_trust.py: the ACL itself)."""
    mosquitto = plain_broker
    running: list[tuple[threading.Event, threading.Thread, ScriptedDevice, list[int]]] = []

    def make(**extra: Any) -> tuple[Aggregator, ScriptedDevice]:
        settings = AggregatorSettings(**{
            "job": "svc", "prefix": topic_prefix, "port": mosquitto.port, "task": "digits-mlp",
            "state_dir": tmp_path / "agg", "rounds": 2, "devices_per_round": 2,
            "min_devices": 2, "round_timeout_s": 30, "start_wait_s": 30,
            "publish_onnx": False, "insecure": True,
            # the hostile input as such, without the adaptive bounds (test_robust*.py)
            "norm_bound_factor": 0, "examples_factor": 0, **extra,
        })  # fmt: skip
        agg = Aggregator(settings=settings)
        stop, result = threading.Event(), []
        thread = threading.Thread(target=lambda: result.append(agg.run(stop=stop)), daemon=True)
        thread.start()
        device = ScriptedDevice(mosquitto, settings.topics)
        running.append((stop, thread, device, result))
        return agg, device

    yield make
    for stop, thread, device, result in running:
        stop.set()
        thread.join(timeout=15)
        device.close()
        assert result == [0], "the aggregator did not stop cleanly"


def _zeros(dev: ScriptedDevice, version: int = 0) -> dict[str, np.ndarray]:
    m = dev.pump(lambda: next((m for m in dev.manifests if m.version == version), None))
    w = decode_weights(dev.pump(lambda: dev.payloads.get(m.weights.payload_id)))
    return {k: np.zeros(v.shape, np.float32) for k, v in w.items()}


def _poisoned_int8(zeros: dict[str, np.ndarray]) -> bytes:
    """An int8 body whose scales are finite (3e38) but whose values dequantise to inf."""
    ones = {k: np.ones_like(v) for k, v in zeros.items()}
    body = encode_tensors(ones, parse_pipeline("int8"), rng=np.random.default_rng(0))
    obj = msgpack.unpackb(body, raw=False)
    for t in obj["tensors"]:
        t["scales"] = np.full(len(t["scales"]) // 4, 3e38, "<f4").tobytes()
    return msgpack.packb(obj, use_bin_type=True)


def _history_round(agg: Aggregator, round_id: int, dev: ScriptedDevice) -> dict[str, Any]:
    return dev.pump(lambda: next((r for r in read_history(agg.s.state_dir)
                                  if r["round"] == round_id), None))  # fmt: skip


def test_int8_update_that_dequantises_to_inf_is_rejected_and_the_round_completes(
    start: Start,
) -> None:
    agg, dev = start(codec="int8")
    dev.online("a", "b")
    dev.open_round(1)
    zeros = _zeros(dev)
    dev.send("a", Update("poison", "a", 1, 0, 10, "int8", _poisoned_int8(zeros)))
    ack = dev.ack_for("poison")
    assert (ack.status, ack.reason.split(":")[0]) == ("rejected", "shape_mismatch"), ack
    ones = {k: v + 1 for k, v in zeros.items()}
    for d in "ab":
        dev.send(d, _update(f"u{d}", d, 1, 0, ones))
        assert dev.ack_for(f"u{d}").status == "accepted"
    rnd = _history_round(agg, 1, dev)
    assert rnd["outcome"] == "complete" and rnd["version"] == 1
    verdicts = {v["update_id"]: v["verdict"] for v in read_ledger(agg.s.state_dir)}
    assert verdicts == {"poison": "rejected", "ua": "accepted", "ub": "accepted"}


def test_a_mean_beyond_float16_abandons_the_round_and_the_next_one_works(start: Start) -> None:
    agg, dev = start(downlink="fp16")
    dev.online("a", "b")
    dev.open_round(1)
    zeros = _zeros(dev)
    huge = {k: v + 1e5 for k, v in zeros.items()}  # finite float32, beyond float16's 65504
    for d in "ab":
        dev.send(d, _update(f"h{d}", d, 1, 0, huge))
        assert dev.ack_for(f"h{d}").status == "accepted"
    rnd = _history_round(agg, 1, dev)
    assert rnd["outcome"] == "abandoned" and rnd["reason"].startswith("model_refused"), rnd
    assert "version" not in rnd

    dev.open_round(2)  # on version 0 still
    small = {k: v + 0.5 for k, v in zeros.items()}
    for d in "ab":
        dev.send(d, _update(f"s{d}", d, 2, 0, small))
        assert dev.ack_for(f"s{d}").status == "accepted"
    rnd = _history_round(agg, 2, dev)
    assert rnd["outcome"] == "complete" and rnd["version"] == 1
    assert agg.ledger.counters["models_refused"] == 1
    assert agg.ledger.counters["rounds_abandoned"] == 1


def _state(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "state.json").read_text()))
    except (OSError, ValueError):
        return {}


def _specs() -> tuple[TensorSpec, ...]:
    return specs_of(tw.get_weights(get_task("digits-mlp").build_model()))


def _poison_journal(state_dir: Path, how: str) -> None:
    """A state directory as a crash would leave it, with one thing an attacker poisoned."""
    if how == "state.json":
        state_dir.mkdir(parents=True)
        (state_dir / "state.json").write_text('{"version": 0, "next_round": ')
        return
    if how in ("version", "server_opt"):
        model = GlobalModel(task=get_task("digits-mlp"), store=Store(root=state_dir))
        model.load_or_init()
        model.store.save_manifest(0, encode_manifest(model.manifest(
            job="svc", weight_chunks=1, onnx_chunks=0, delta_chunks=0)))  # fmt: skip
        if how == "version":  # a stored version whose payload no longer decodes
            (state_dir / "versions" / "000000.full").write_bytes(b"\x93poison")
        else:  # the server optimiser's saved moments, well formed but with a NaN in them
            state = fresh_state("adam", model.specs, 1e-3)
            next(iter(state.m.values())).flat[0] = np.nan
            model.store.save_optimizer(0, encode_opt_state("adam", state))
        (state_dir / "state.json").write_text('{"version": 0, "next_round": 1}')
        return
    specs = _specs()
    zeros = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    journal = Journal(root=state_dir)
    now = time.time()
    journal.open_round(1, {"round": 1, "model_version": 0, "selected": ["a", "b"],
                           "opened_at": now, "deadline": now + 30, "target": 2,
                           "min_devices": 2})  # fmt: skip
    body = _poisoned_int8(zeros) if how == "body" else encode_weights(zeros)
    journal.stage_accept(Accepted("old", 1, "a", "int8" if how == "body" else "float32", body,
                                  10.0, 10.0, len(body), 0, {"device": "a"}))  # fmt: skip
    journal.commit()
    if how == "snapshot":
        journal.save_snapshot(1, Snapshot(seq=1, count=1, total_weight=10.0, sums=b"\x93junk"))
    journal.close()


@pytest.mark.parametrize("how", ["body", "snapshot", "state.json", "version", "server_opt"])
def test_a_poisoned_state_directory_is_quarantined_on_restart(
    start: Start, tmp_path: Path, how: str
) -> None:
    _poison_journal(tmp_path / "agg", how)
    agg, dev = start(rounds=3, **({"server_optimizer": "adam"} if how == "server_opt" else {}))
    dev.online("a", "b")
    journalled = how in ("body", "snapshot")
    if journalled:  # the journalled round 1 is moved aside and ends abandoned
        rnd = _history_round(agg, 1, dev)
        assert rnd["outcome"] == "abandoned" and rnd["reason"].startswith("quarantined"), rnd
    expected = {"body": ["000001.bodies"], "snapshot": ["000001.bodies", "000001.snapshot"],
                "state.json": ["state.json"],
                "version": ["000000.full", "000000.manifest", "000000.onnx"],
                "server_opt": ["000000.opt"]}  # fmt: skip
    qdir = tmp_path / "agg" / "quarantine"

    def moved() -> list[str] | None:  # the service moves them aside, then counts them
        names = sorted(p.name for p in qdir.iterdir()) if qdir.exists() else []
        counted = agg.ledger.counters.get("quarantined_files", 0)
        return names if len(names) >= len(expected[how]) and counted >= len(names) else None

    quarantined = dev.pump(moved)
    assert [n.split("-", 1)[1] for n in quarantined] == expected[how], quarantined
    assert agg.ledger.counters["quarantined_files"] == len(quarantined)

    first = 2 if journalled else 1
    r = dev.open_round(first)
    zeros = _zeros(dev)
    for d in r.selected:
        dev.send(d, _update(f"n{d}", d, first, 0, {k: v + 1 for k, v in zeros.items()}))
        assert dev.ack_for(f"n{d}").status == "accepted"
    assert _history_round(agg, first, dev)["outcome"] == "complete"
    state = dev.pump(lambda: (s := _state(tmp_path / "agg")).get("next_round") == first + 1 and s)
    assert state["version"] == 1
    if how == "server_opt":  # FedAdam started afresh from version 0: one step taken
        assert agg.optimizer.state.step == 1  # type: ignore[attr-defined]


def _publish_on(dev: ScriptedDevice, filter_: str, device: str, payload: bytes,
                retain: bool = False) -> None:  # fmt: skip
    """Publish on a device topic whatever the id (Topics refuses to build odd ones)."""
    dev.client.publish(filter_.replace("+", device), payload, qos=1, retain=retain)


def _offline(device: str) -> bytes:
    return encode_state(DeviceState(device, "offline", "svc", "rpi4", "test", 10, -1, 0.0))


def _online(device: str) -> bytes:
    return encode_state(DeviceState(device, "online", "svc", "rpi4", "test", 10, -1, 0.0))


def _wait_counter(agg: Aggregator, dev: ScriptedDevice, name: str, at_least: int) -> None:
    dev.pump(lambda: agg.ledger.counters[name] >= at_least)


def test_odd_ids_and_a_will_storm_from_unknown_ids_do_not_stop_rounds(start: Start) -> None:
    agg, dev = start(rounds=1)
    zeros = _zeros(dev)  # the aggregator is up and subscribed
    states, updates = agg.topics.device_states_filter(), agg.topics.updates_filter()
    odd = ["..", "a b", "x" * 1000, "evil\u202eexe"]
    for device in odd:  # presence and an update from each: counted rejections, no exception
        _publish_on(dev, states, device, _online(device), retain=True)
        u = Update("u" + str(len(device)), device, 1, 0, 10, "float32", b"")
        for chunk in encode_chunks(encode_update(u), u.update_id, 65536):
            _publish_on(dev, updates, device, chunk)
    for i in range(3):  # three retained offline states from unknown ids
        _publish_on(dev, states, f"ghost-{i}", _offline(f"ghost-{i}"), retain=True)
    _wait_counter(agg, dev, "rejected_schema_error", 2 * len(odd))
    dev.online("a", "b")
    r = dev.open_round(1)
    assert set(r.selected) == {"a", "b"}
    for i in range(200):  # a Will storm from unknown ids while the round is open
        _publish_on(dev, states, f"will-{i}", _offline(f"will-{i}"))
    for d in "ab":  # the device's metrics may not overwrite the round's bookkeeping
        u = _update(f"u{d}", d, 1, 0, {k: v + 1 for k, v in zeros.items()})
        dev.send(d, Update(u.update_id, d, 1, 0, 10, u.codec, u.body,
                           metrics={"device": 99.0, "examples": 1e9, "train_loss": 0.5}))
        assert dev.ack_for(f"u{d}").status == "accepted"
    rnd = _history_round(agg, 1, dev)
    assert rnd["outcome"] == "complete"
    assert sorted((p["device"], p["examples"]) for p in rnd["participants"]) == [
        ("a", 10), ("b", 10)]
    assert all(p["metrics"]["device"] == 99.0 for p in rnd["participants"])
    assert agg.ledger.counters["rejected_schema_error"] == 2 * len(odd)
    assert agg.ledger.counters["internal_errors"] == 0
    assert sorted(agg.presence.devices) == ["a", "b"]


def _fleet_file(tmp_path: Path, *devices: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text('job = "svc"\n' + "".join(f'[[device]]\nid = "{d}"\n' for d in devices))
    return path


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_a_fleet_file_only_enrolled_devices_take_part(
    start: Start, tmp_path: Path, mode: str
) -> None:
    extra: dict[str, Any] = {"mode": mode, "buffer_size": 2} if mode == "async" else {}
    agg, dev = start(rounds=1, fleet_file=_fleet_file(tmp_path, "a", "b"), **extra)
    zeros = _zeros(dev)  # the aggregator is up and subscribed
    states = agg.topics.device_states_filter()
    _publish_on(dev, states, "mallory", _online("mallory"))
    _wait_counter(agg, dev, "rejected_unauthorized", 1)
    dev.online("a", "b")
    r = dev.open_round(1)
    assert set(r.selected) == {"a", "b"}
    ones = {k: v + 1 for k, v in zeros.items()}
    # a never-seen id filling the buffer: refused before its chunks are even reassembled
    for i in range(3):
        dev.send("mallory", _update(f"m{i}", "mallory", 1, 0, ones, n=10_000))
    _wait_counter(agg, dev, "rejected_unauthorized", 4)
    for d in "ab":
        dev.send(d, _update(f"u{d}", d, 1, 0, ones))
        assert dev.ack_for(f"u{d}").status == "accepted"
    rnd = _history_round(agg, 1, dev)
    assert rnd["outcome"] in ("complete", "buffered") and rnd["accepted"] == 2
    assert {v["device"] for v in read_ledger(agg.s.state_dir)} == {"a", "b"}
    assert "mallory" not in agg.presence.devices


def test_a_device_flooding_partial_updates_cannot_stop_the_others(start: Start) -> None:
    """The attack: 256 never-completed chunked payloads (24 KB in all) made the aggregator
    refuse every honest update for 600 s."""
    agg, dev = start(rounds=1)
    dev.online("a", "b")  # mallory need not be selected: chunks are reassembled first
    dev.open_round(1)
    zeros = _zeros(dev)
    updates = agg.topics.updates_filter()
    for i in range(300):
        (first, *_rest) = split_payload(bytes([i % 251]) * 2000, f"junk{i}", 1024)
        _publish_on(dev, updates, "mallory", encode_chunk(first))
    ones = {k: v + 1 for k, v in zeros.items()}
    for d in "ab":  # one client: these arrive after the flood
        dev.send(d, _update(f"u{d}", d, 1, 0, ones))
        assert dev.ack_for(f"u{d}").status == "accepted"
    assert _history_round(agg, 1, dev)["accepted"] == 2
    assert agg.ledger.counters["evicted_partial_updates"] == 300 - 4
    assert agg.intake.reassembler.held_by("mallory")[0] == 4

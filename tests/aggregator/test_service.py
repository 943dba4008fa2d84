"""The aggregator service against a real Mosquitto, driven by a scripted device.

The test speaks the wire protocol itself (paho + fedmq.wire), so every verdict the
service gives (accepted, rejected with a reason, late) and the FedAvg arithmetic can be
checked exactly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.journal import read_ledger
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import read_history
from fedmq.chunks import Reassembler, encode_chunks
from fedmq.codecs import decode_tensors, encode_tensors, parse_pipeline, to_dense
from fedmq.topics import Topics
from fedmq.wire import (
    Ack,
    DeviceState,
    Manifest,
    RoundAnnouncement,
    Update,
    decode_ack,
    decode_chunk,
    decode_manifest,
    decode_round,
    decode_weights,
    encode_state,
    encode_update,
)


class ScriptedDevice:
    """A paho client that plays devices 'a', 'b' and 'c' by hand."""

    def __init__(self, broker: Any, topics: Topics) -> None:
        self.topics = topics
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(
            [(topics.round(), 1), (topics.global_manifest(), 1), (topics.acks_filter(), 1),
             (topics.global_chunks_filter(), 1)]
        )  # fmt: skip
        assert subscribed.wait(10)
        self.rounds: list[RoundAnnouncement] = []
        self.manifests: list[Manifest] = []
        self.acks: list[tuple[str, Ack]] = []
        self.chunks = Reassembler()
        self.payloads: dict[str, bytes] = {}

    def pump(self, until: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = until()
            if got:
                return got
            try:
                topic, payload = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            kind = self.topics.kind_of(topic)
            if not payload:
                continue
            if kind == "round":
                self.rounds.append(decode_round(payload))
            elif kind == "global":
                self.manifests.append(decode_manifest(payload))
            elif kind == "ack":
                self.acks.append((self.topics.device_of(topic) or "", decode_ack(payload)))
            elif kind == "global_chunk":
                done = self.chunks.add(decode_chunk(payload), source="g", now=0.0)
                if done:
                    self.payloads[done.key[1]] = done.payload
        raise AssertionError("timed out")

    def online(self, *devices: str) -> None:
        for d in devices:
            state = encode_state(DeviceState(d, "online", "svc", "rpi4", "test", 10, -1, 0.0))
            self.client.publish(self.topics.device_state(d), state, qos=1, retain=True)

    def send(self, on_topic_of: str, u: Update) -> None:
        for chunk in encode_chunks(encode_update(u), u.update_id, 65536):
            self.client.publish(self.topics.update(on_topic_of), chunk, qos=1)

    def ack_for(self, update_id: str) -> Ack:
        return self.pump(lambda: next((a for _, a in self.acks if a.update_id == update_id),
                                      None))  # fmt: skip

    def open_round(self, round_id: int) -> RoundAnnouncement:
        return self.pump(lambda: next((r for r in self.rounds if r.round_id == round_id
                                       and r.state == "open"), None))  # fmt: skip

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def service(
    plain_broker: Any, tmp_path: Path, topic_prefix: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Any, Any]]:
    # the scripted side plays several devices with one client: a plain broker (the secured
    # path is what tests/integration and tests/broker/test_trust.py run)
    mosquitto = plain_broker
    # FedAvg's arithmetic as such: without the admission's adaptive bounds (the first round
    # weighs updates alike and bounds them by the model's norm), which test_robust*.py judge
    # and float32 models, so the scripted devices' deltas are the exact values they chose
    extra = {"norm_bound_factor": 0, "examples_factor": 0, "downlink": "float32",
             "downlink_delta": "", **getattr(request, "param", {})}  # fmt: skip
    settings = AggregatorSettings(
        job="svc", prefix=topic_prefix, port=mosquitto.port, task="digits-mlp",
        state_dir=tmp_path / "agg", rounds=2, devices_per_round=2, min_devices=2,
        round_timeout_s=30, start_wait_s=30, publish_onnx=False, insecure=True, **extra,
    )  # fmt: skip
    agg = Aggregator(settings=settings)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agg.run(stop=stop)), daemon=True)
    thread.start()
    device = ScriptedDevice(mosquitto, settings.topics)
    yield agg, device
    stop.set()
    thread.join(timeout=15)
    device.close()
    assert result == [0]


def _update(uid: str, device: str, round_id: int, base: int, deltas: dict[str, np.ndarray],
            n: int = 10, codec: str = "float32") -> Update:  # fmt: skip
    body = encode_tensors(deltas, parse_pipeline(codec), rng=np.random.default_rng(0))
    return Update(uid, device, round_id, base, n, codec, body)


def test_verdicts_and_fedavg_through_the_wire(service: tuple[Any, Any]) -> None:
    agg, dev = service
    dev.online("a", "b")
    r1 = dev.open_round(1)
    assert set(r1.selected) == {"a", "b"} and r1.model_version == 0
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    ones = {k: np.ones_like(v) for k, v in w0.items()}

    dev.send("a", _update("ua", "a", 1, 0, ones, n=10))
    assert dev.ack_for("ua").status == "accepted"

    dev.acks.clear()
    dev.send("a", _update("ua", "a", 1, 0, ones))  # a resend: acknowledged, not counted again
    again = dev.ack_for("ua")
    assert again.status == "accepted" and "already counted" in again.reason

    refusals = {
        "ua2": ("a", _update("ua2", "a", 1, 0, ones), "duplicate_update"),
        "spoof": ("b", _update("spoof", "a", 1, 0, ones), "unauthorized"),
        "future": ("b", _update("future", "b", 9, 0, ones), "stale_update"),
        "oldbase": ("b", _update("oldbase", "b", 1, 7, ones), "stale_update"),
        "notsel": ("c", _update("notsel", "c", 1, 0, ones), "unauthorized"),
        "nan": ("b", _update("nan", "b", 1, 0, {k: v * np.nan for k, v in ones.items()}),
                "shape_mismatch"),
        "shape": ("b", _update("shape", "b", 1, 0, {"x": np.ones(3, np.float32)}),
                  "shape_mismatch"),
    }  # fmt: skip
    for uid, (topic_device, u, code) in refusals.items():
        dev.send(topic_device, u)
        ack = dev.ack_for(uid)
        assert (ack.status, ack.reason.split(":")[0]) == ("rejected", code), (uid, ack)

    dev.send("b", _update("ub", "b", 1, 0, {k: 4 * v for k, v in ones.items()}, n=30))
    assert dev.ack_for("ub").status == "accepted"

    m1 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 1), None))
    w1 = decode_weights(dev.pump(lambda: dev.payloads.get(m1.weights.payload_id)))
    for k in w0:  # (10 * 1 + 30 * 4) / 40 = 3.25
        np.testing.assert_allclose(w1[k], w0[k] + 3.25, rtol=1e-6)
    assert m1.metrics["accuracy"] >= 0 and m1.round_id == 1

    dev.open_round(2)
    dev.send("a", _update("tardy", "a", 1, 0, ones))
    assert dev.ack_for("tardy").status == "late"

    # every ack went out after its verdict was committed: the ledger holds them all
    verdicts = Counter((v["verdict"], v["reason"].split(":")[0])
                       for v in read_ledger(agg.s.state_dir))  # fmt: skip
    assert verdicts == Counter({
        ("accepted", ""): 2, ("late", "round already closed"): 1,
        ("duplicate", "counted in round 1"): 1, ("rejected", "duplicate_update"): 1,
        ("rejected", "unauthorized"): 2, ("rejected", "stale_update"): 2,
        ("rejected", "shape_mismatch"): 2,
    })  # fmt: skip
    history = read_history(agg.s.state_dir)
    assert history[0]["outcome"] == "complete" and history[0]["accepted"] == 2
    assert {p["device"] for p in history[0]["participants"]} == {"a", "b"}


@pytest.mark.parametrize(
    "service", [{"codec": "topk:0.05+int8+zstd", "update_budget_bytes": 4096}], indirect=True
)
def test_compressed_updates_are_decoded_scattered_and_budgeted(service: tuple[Any, Any]) -> None:
    agg, dev = service
    dev.online("a", "b")
    r1 = dev.open_round(1)
    assert (r1.codec, r1.max_update_bytes) == ("topk:0.05+int8+zstd", 4096)
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    rng = np.random.default_rng(5)
    deltas = {d: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w0.items()}
              for d in "ab"}  # fmt: skip

    refusals = {  # the whole float32 delta is over the 4096-byte budget; a bad codec name
        "big": (_update("big", "a", 1, 0, deltas["a"]), "schema_error", "budget"),
        "odd": (Update("odd", "a", 1, 0, 10, "topk:2+int8", b"x"), "schema_error", "top-k"),
        "liar": (Update("liar", "a", 1, 0, 10, "topk:0.05+int8",
                        _update("x", "a", 1, 0, deltas["a"], codec="topk:0.05+fp16").body),
                 "schema_error", "float16"),
    }  # fmt: skip
    for uid, (u, code, words) in refusals.items():
        dev.send("a", u)
        ack = dev.ack_for(uid)
        assert (ack.status, ack.reason.split(":")[0]) == ("rejected", code), (uid, ack)
        assert words in ack.reason, ack.reason

    sent = {}
    for d, codec, n in (("a", "topk:0.05+int8+zstd", 10), ("b", "topk:0.02+fp16", 30)):
        u = _update(f"u{d}", d, 1, 0, deltas[d], n=n, codec=codec)
        dense = decode_tensors(u.body, codec, m0.tensors)
        sent[d] = {k: to_dense(t) for k, t in dense.items()}
        dev.send(d, u)
        assert dev.ack_for(f"u{d}").status == "accepted"

    m1 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 1), None))
    w1 = decode_weights(dev.pump(lambda: dev.payloads.get(m1.weights.payload_id)))
    for k in w0:  # the example-weighted mean of exactly what was sent, scattered into the sum
        want = w0[k] + (10 * sent["a"][k] + 30 * sent["b"][k]) / 40
        np.testing.assert_allclose(w1[k], want, rtol=1e-5, atol=1e-6)
    rejected = [v for v in read_ledger(agg.s.state_dir) if v["verdict"] == "rejected"]
    assert sorted(v["update_id"] for v in rejected) == ["big", "liar", "odd"]
    assert all(v["reason"].startswith("schema_error") for v in rejected)


@pytest.mark.parametrize("service", [{
    "mode": "async", "buffer_size": 1, "server_optimizer": "adam", "server_lr": 0.5,
    "prox_mu": 0.01,
}], indirect=True)  # fmt: skip
def test_fedbuff_buffers_step_fedadam_and_rounds_announce_prox_mu(
    service: tuple[Any, Any],
) -> None:
    agg, dev = service
    dev.online("a", "b")
    r1 = dev.open_round(1)
    assert r1.train.prox_mu == 0.01  # FedProx's mu travels with the round
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    ones = {k: np.ones_like(v) for k, v in w0.items()}
    dev.send("a", _update("u1", "a", 1, 0, ones))
    assert dev.ack_for("u1").status == "accepted"
    dev.open_round(2)
    dev.send("b", _update("u2", "b", 2, 1, ones))
    assert dev.ack_for("u2").status == "accepted"
    m2 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 2), None))
    w2 = decode_weights(dev.pump(lambda: dev.payloads.get(m2.weights.payload_id)))
    # one FedAdam step per buffer on its mean delta d = 1 (b1 0.9, b2 0.99, tau 1e-3, lr 0.5):
    # m1 = 0.1, v1 = 0.99e-6 + 0.01; m2 = 0.19, v2 = 0.99 v1 + 0.01
    v1 = 0.99e-6 + 0.01
    v2 = 0.99 * v1 + 0.01
    step = 0.5 * 0.1 / (v1**0.5 + 1e-3) + 0.5 * 0.19 / (v2**0.5 + 1e-3)
    for k in w0:
        np.testing.assert_allclose(w2[k], w0[k].astype(np.float64) + step, rtol=1e-6, atol=1e-6)
    history = dev.pump(lambda: [r["outcome"] for r in read_history(agg.s.state_dir)][1:])
    assert history == ["buffered"]  # the second buffer's line: the history follows the version
    assert (agg.s.state_dir / "versions" / "000002.opt").exists()  # written before it was published
    assert agg.optimizer.state.step == 2


@pytest.mark.parametrize(
    "service", [{"selection": "utility", "selection_exploration": 0.0, "seed": 2}], indirect=True
)
def test_utility_selection_follows_the_history_and_reports_participation(
    service: tuple[Any, Any],
) -> None:
    from aggregator.selection import Candidates, Participation, RandomSelection, UtilitySelection

    agg, dev = service
    dev.online("a", "b", "c")
    r1 = dev.open_round(1)  # nothing tried yet: seed 2 explores a and b (with or without c)
    assert set(r1.selected) == {"a", "b"}
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    ones = {k: np.ones_like(v) for k, v in w0.items()}
    for d, loss in (("a", 2.0), ("b", 0.5)):
        u = _update(f"u{d}", d, 1, 0, ones)
        dev.send(d, Update(u.update_id, d, 1, 0, 10, u.codec, u.body,
                           metrics={"train_loss": loss}))  # fmt: skip
        assert dev.ack_for(f"u{d}").status == "accepted"
    r2 = dev.open_round(2)
    history = read_history(agg.s.state_dir)
    assert all(p["arrived_s"] >= 0 for p in history[0]["participants"])
    online = Candidates(online=["a", "b", "c"], round_id=2, seed=2, target=2)
    want = UtilitySelection(exploration=0.0).select(online, Participation.from_history(history))
    assert tuple(sorted(r2.selected)) == want == ("a", "b")  # the tried ones, no exploration
    assert RandomSelection().select(online, Participation()) != want  # random: b and c
    status = dev.pump(lambda: agg.status(time.time())["aggregation"]["selection"])
    assert status["policy"] == "utility"
    assert status["participation"] == {"a": {"selected": 1, "took_part": 1},
                                       "b": {"selected": 1, "took_part": 1}}  # fmt: skip


@pytest.mark.parametrize("service", [{"client_correction": "scaffold", "lr": 0.1,
                                      "normalize_local_work": True}], indirect=True)  # fmt: skip
def test_scaffold_and_fednova_through_the_wire(service: tuple[Any, Any]) -> None:
    import dataclasses

    from fedmq.correction import control_name

    agg, dev = service
    dev.online("a", "b")
    r1 = dev.open_round(1)
    assert r1.train.correction == "scaffold"
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    assert m0.control is not None  # c of version 0 (zero), signed in the manifest
    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    c0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.control.payload_id)))
    assert all(not c.any() for c in c0.values()) and c0.keys() == w0.keys()

    def scaffold_update(uid: str, device: str, value: float, n: int, steps: int) -> Update:
        # an honest device: dc = -(c + delta / (K lr)) with c = 0
        tensors = {**{k: np.full_like(v, value) for k, v in w0.items()},
                   **{control_name(k): np.full_like(v, -value / (steps * 0.1))
                      for k, v in w0.items()}}  # fmt: skip
        return dataclasses.replace(_update(uid, device, 1, 0, tensors, n=n),
                                   metrics={"local_steps": float(steps)})  # fmt: skip

    dev.send("a", _update("plain", "a", 1, 0, {k: np.ones_like(v) for k, v in w0.items()}))
    ack = dev.ack_for("plain")  # an agent that does not know SCAFFOLD: no control delta
    assert ack.status == "rejected" and "tensors missing" in ack.reason
    dev.send("a", scaffold_update("ua", "a", 0.01, n=10, steps=1))
    dev.send("b", scaffold_update("ub", "b", 0.04, n=30, steps=6))
    assert dev.ack_for("ua").status == "accepted" and dev.ack_for("ub").status == "accepted"

    m1 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 1), None))
    w1 = decode_weights(dev.pump(lambda: dev.payloads.get(m1.weights.payload_id)))
    assert m1.control is not None
    c1 = decode_weights(dev.pump(lambda: dev.payloads.get(m1.control.payload_id)))
    for k in w0:
        # FedNova: (10/1 * 0.01 + 30/6 * 0.04) / 40 * tau_eff (10 * 1 + 30 * 6) / 40 = 0.035625
        # (FedAvg would move it by 0.0325)
        np.testing.assert_allclose(w1[k] - w0[k], 0.035625, rtol=1e-5)
        # c = 0 + 2/2 * mean(-0.1, -0.04 / 0.6)
        np.testing.assert_allclose(c1[k], (-0.1 - 0.04 / 0.6) / 2, rtol=1e-6)
    assert (agg.s.state_dir / "versions" / "000001.ctl").exists()
    history = dev.pump(lambda: read_history(agg.s.state_dir))  # written after publishing
    assert [p["local_steps"] for p in history[0]["participants"]] == [1, 6]

"""The aggregator watches its own retained topics: pure rules, then the service against a
real Mosquitto restoring what a forger overwrote."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.watch import OwnTopics
from fedmq.signing import load_public_key, verify
from fedmq.topics import Topics
from fedmq.wire import (
    RoundAnnouncement,
    TrainConfig,
    decode_manifest,
    encode_manifest,
    encode_round,
)
from tests.edge_agent.test_agent import wait_until

G, R, S = "p/j/global", "p/j/round", "p/j/status"


def test_own_echo_is_ignored_and_anything_else_is_counted_and_restored_once_a_second() -> None:
    w = OwnTopics(topics=[G, R, S])
    w.published(G, b"m1")
    w.published(G, b"m2")
    assert w.observe(G, b"m1", retained=False, signed_by_us=True, now=0.0) is None  # late echo
    assert w.observe(G, b"m2", retained=False, signed_by_us=True, now=0.0) is None
    assert w.due(0.0) == []
    seen = w.observe(G, b"forged", retained=False, signed_by_us=False, now=10.0)
    assert seen is not None and seen.counter == "foreign_downlink"
    assert w.due(10.0) == [(G, b"m2")]
    w.published(G, b"m2")  # the restore itself; its echo is ours
    assert w.observe(G, b"m2", retained=False, signed_by_us=True, now=10.1) is None
    # a second forgery at once: counted, restored no sooner than a second after the first
    again = w.observe(G, b"", retained=False, signed_by_us=False, now=10.2)  # a deletion
    assert again is not None and again.counter == "foreign_downlink"
    assert w.due(10.5) == [] and w.due(11.0) == [(G, b"m2")]
    # its own older manifest once more, after its echo came: a replay
    replay = w.observe(G, b"m1", retained=False, signed_by_us=True, now=20.0)
    assert replay is not None and replay.counter == "replayed_downlink"
    w.due(25.0)
    # what the broker held from an earlier run: overwritten, not an alert
    left = w.observe(G, b"old", retained=True, signed_by_us=True, now=30.0)
    assert left is not None and left.counter == ""
    assert w.observe(S, b"{}", retained=True, signed_by_us=None, now=30.0).counter == ""  # type: ignore[union-attr]
    # on a topic it has not published on yet there is nothing to restore
    assert w.observe(R, b"x", retained=False, signed_by_us=False, now=30.0) is not None
    assert [t for t, _ in w.due(40.0)] == [G]
    # what it published last, redelivered by the broker on a resubscription (before or after
    # the echo of a publication made at the reconnect): nothing to do
    assert w.observe(G, b"m2", retained=True, signed_by_us=True, now=50.0) is None
    w.published(G, b"m2")
    assert w.observe(G, b"m2", retained=True, signed_by_us=True, now=50.0) is None
    assert w.observe(G, b"m2", retained=False, signed_by_us=True, now=50.0) is None
    assert w.due(60.0) == []


class Client:
    """A plain MQTT client: the forger, and a newcomer reading what is retained."""

    def __init__(self, broker: Any, subscribe: list[str] = ()) -> None:  # type: ignore[assignment]
        self.retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        done = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: done.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe([(t, 1) for t in subscribe])
            assert done.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.retained[msg.topic] = bytes(msg.payload)

    def get(self, topic: str) -> bytes | None:
        with self._lock:
            return self.retained.get(topic)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def mosquitto(plain_broker: Any) -> Any:
    """A plain broker: the forger stands for whoever got past the ACL (the broker's operator,
    a stolen aggregator certificate); what stops it here is the aggregator's own watch."""
    return plain_broker


@pytest.fixture
def aggregator(mosquitto: Any, tmp_path: Path, topic_prefix: str) -> Iterator[Aggregator]:
    settings = AggregatorSettings(
        job="svc", prefix=topic_prefix, port=mosquitto.port, task="digits-mlp",
        state_dir=tmp_path / "agg", rounds=2, round_timeout_s=30, start_wait_s=600,
        publish_onnx=False, insecure=True,
    )  # fmt: skip
    agg = Aggregator(settings=settings)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    yield agg
    stop.set()
    thread.join(timeout=15)


def test_the_aggregator_restores_its_retained_messages_after_a_forgery(
    aggregator: Aggregator, mosquitto: Any, tmp_path: Path
) -> None:
    topics: Topics = aggregator.topics
    own = [topics.global_manifest(), topics.round(), topics.status()]
    public = load_public_key(tmp_path / "agg" / "signing-key.pub.pem")
    watcher = Client(mosquitto, own)
    forger = Client(mosquitto)
    try:
        real = decode_manifest(wait_until("the manifest", lambda: watcher.get(own[0])))
        wait_until("a status", lambda: watcher.get(own[2]))
        # the forgeries: a newer manifest, an absurd round, a "done" status, all retained
        forged = encode_manifest(dataclasses.replace(real, version=999_999))
        forged_round = encode_round(RoundAnnouncement(
            job=topics.job, round_id=1, model_version=0, state="open", opened_at=0.0,
            deadline=1e12, selected=("d0",), target=1, min_devices=1,
            train=TrainConfig(epochs=1000, batch_size=10, lr=99.0)))  # fmt: skip
        forger.publish(own[0], forged)
        forger.publish(own[1], forged_round)
        forger.publish(own[2], json.dumps({"phase": "done", "accuracy": 0.99}).encode())

        def counted() -> int:
            return int(aggregator.ledger.counters.get("foreign_downlink", 0))

        wait_until("three alerts", lambda: counted() >= 3, timeout=20)
        # a newcomer finds the aggregator's own messages again, not the forgeries
        newcomer = Client(mosquitto, own)
        try:
            def restored() -> bool:
                m, r, s = (newcomer.get(t) for t in own)
                # no round is open yet: the aggregator's own round topic is empty (deleted)
                return bool(m and s and m != forged and r is None and b"0.99" not in s)

            wait_until("the retained messages restored", restored, timeout=20)
            m = decode_manifest(newcomer.get(own[0]) or b"")
            assert m.version == real.version and m.sig is not None
            assert verify(public, own[0], m.sig) is None
            status = json.loads(newcomer.get(own[2]) or b"{}")
            assert status["phase"] != "done" and status["counters"]["foreign_downlink"] >= 3
            assert status["signing_key"] == m.sig.key_id
        finally:
            newcomer.close()
    finally:
        watcher.close()
        forger.close()



def test_its_own_will_is_not_an_intrusion_and_is_overwritten_with_the_live_status() -> None:
    w = OwnTopics(topics=[G, R, S])
    will = b'{"aggregator": "offline"}'
    w.will(S, will)
    # a restart: the broker holds the Will of the previous run (or of this one, same words)
    assert w.observe(S, will, retained=True, signed_by_us=None, now=1.0) is None
    assert w.due(1.0) == []  # nothing published yet: nothing to restore
    w.published(S, b'{"aggregator": "online"}')
    # a persistent session (MQTT 3.1.1) delivers the Will queued while it was away: live,
    # yet its own, so not counted; the live status goes back at once
    assert w.observe(S, will, retained=False, signed_by_us=None, now=2.0) is None
    assert w.due(2.0) == [(S, b'{"aggregator": "online"}')]
    # anything else on the status topic still is an intrusion
    seen = w.observe(S, b'{"aggregator": "offline", "x": 1}', retained=False,
                     signed_by_us=None, now=5.0)  # fmt: skip
    assert seen is not None and seen.counter == "foreign_downlink"


def test_a_retained_copy_of_a_pending_publication_is_not_taken_for_its_echo() -> None:
    """A restart clears the round topic and announces the resumed round exactly as before:
    the broker's retained copy of the old announcement (identical bytes) arrives before the
    echoes, which must still be recognised (found by tests/integration/test_operator_views)."""
    w = OwnTopics(topics=[G, R, S])
    w.published(R, b"")  # no stale round
    w.published(R, b"round 3, open")  # the resumed round, byte for byte as announced before
    assert w.observe(R, b"round 3, open", retained=True, signed_by_us=True, now=1.0) is None
    assert w.observe(R, b"", retained=False, signed_by_us=False, now=1.0) is None
    assert w.observe(R, b"round 3, open", retained=False, signed_by_us=True, now=1.0) is None
    assert w.due(5.0) == []

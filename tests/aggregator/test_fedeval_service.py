"""Federated evaluation through a real Mosquitto, with no central test set (eval_data none).

Scripted devices report their evaluation of version 0 exactly as agents do (a `metrics`
message, QoS 1); hostile reports are refused with their reason codes; the status carries
the live result, the history record of round 1 the result for its base version, and the
job stops at its target accuracy on the federated result alone.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from fedmq.report import read_history
from fedmq.wire import DeviceMetrics, decode_weights, encode_metrics
from tests.aggregator.test_service import ScriptedDevice, _update


class StatusReader:
    """Keeps the newest status document of the job."""

    def __init__(self, broker: Any, topic: str) -> None:
        self.docs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: m.payload and self.docs.put(json.loads(m.payload))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(10)

    def wait(self, until: Callable[[dict[str, Any]], bool],
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last and until(self.last):
                return self.last
            try:
                self.last = self.docs.get(timeout=0.2)
            except queue.Empty:
                continue
        raise AssertionError(f"timed out; the last status: {self.last}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def no_test_set(
    plain_broker: Any, tmp_path: Path, topic_prefix: str
) -> Iterator[tuple[Aggregator, ScriptedDevice, StatusReader]]:
    settings = AggregatorSettings(
        job="svc", prefix=topic_prefix, port=plain_broker.port, task="digits-mlp",
        state_dir=tmp_path / "agg", rounds=5, target_accuracy=0.7, devices_per_round=2,
        min_devices=2, round_timeout_s=30, start_wait_s=30, publish_onnx=False, insecure=True,
        norm_bound_factor=0, examples_factor=0, downlink="float32", downlink_delta="",
        eval_data="none",
    )  # fmt: skip
    agg = Aggregator(settings=settings)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agg.run(stop=stop)), daemon=True)
    thread.start()
    device = ScriptedDevice(plain_broker, settings.topics)
    status = StatusReader(plain_broker, settings.topics.status())
    yield agg, device, status
    stop.set()
    thread.join(timeout=15)
    device.close()
    status.close()
    assert result == [0]


def test_federated_result_in_status_and_history_without_a_test_set(
    no_test_set: tuple[Aggregator, ScriptedDevice, StatusReader],
) -> None:
    agg, dev, status = no_test_set
    dev.online("a", "b")
    r1 = dev.open_round(1)
    assert r1.model_version == 0
    m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
    assert m0.metrics == {}  # no central evaluation: the manifest claims none

    def report(device: str, version: int, **values: float) -> None:
        body = encode_metrics(DeviceMetrics(device=device, round_id=1, model_version=version,
                                            metrics=values))  # fmt: skip
        dev.client.publish(dev.topics.metrics(device), body, qos=1)

    report("a", 0, eval_loss=1.0, eval_accuracy=0.5, eval_examples=10)
    report("b", 0, eval_loss=0.5, eval_accuracy=0.8, eval_examples=30)
    # the attacks: each refused with its reason, none of them changes the result
    report("a", 0, eval_loss=0.0, eval_accuracy=1.0, eval_examples=1000)  # a second opinion
    report("b", 5, eval_loss=0.1, eval_accuracy=0.9, eval_examples=30)  # a version not held
    report("b", 0, eval_loss=0.1, eval_accuracy=0.9, eval_examples=-3)
    report("b", 0, eval_loss=float("nan"), eval_accuracy=0.9, eval_examples=3)
    report("ghost", 0, eval_loss=0.1, eval_accuracy=1.0, eval_examples=99)  # no state
    refusals = {"rejected_duplicate_report": 1, "rejected_out_of_bounds": 2,
                "rejected_schema_error": 1, "rejected_unauthorized": 1}  # fmt: skip
    doc = status.wait(lambda d: all(d["counters"].get(k) == n for k, n in refusals.items())
                      and (d.get("federated") or {}).get("devices") == 2)  # fmt: skip
    assert doc["accuracy"] is None and doc["loss"] is None  # no central test set
    fed = doc["federated"]
    assert (fed["version"], fed["devices"], fed["examples"]) == (0, 2, 40)
    assert fed["accuracy"] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
    assert fed["loss"] == pytest.approx((1.0 * 10 + 0.5 * 30) / 40)
    assert (fed["accuracy_min"], fed["accuracy_max"]) == (0.5, 0.8)

    w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
    ones = {k: np.ones_like(v) * 1e-3 for k, v in w0.items()}
    dev.send("a", _update("ua", "a", 1, 0, ones))
    dev.send("b", _update("ub", "b", 1, 0, ones))
    assert dev.ack_for("ua").status == dev.ack_for("ub").status == "accepted"

    # round 1's record carries the devices' result for version 0, the version it began at;
    # the job stops there: the federated 0.725 reached target_accuracy 0.7
    done = status.wait(lambda d: d["phase"] == "done")
    assert done["done_reason"] == "reached accuracy 0.7250" and done["model_version"] == 1
    history = read_history(agg.s.state_dir)
    assert [r["round"] for r in history] == [1]
    record = history[0]
    assert record["version"] == 1 and "accuracy" not in record
    assert record["federated"]["version"] == 0 and record["federated"]["devices"] == 2
    assert record["federated"]["accuracy"] == pytest.approx(0.725)
    assert done["recent_rounds"][-1]["federated"]["accuracy"] == pytest.approx(0.725)

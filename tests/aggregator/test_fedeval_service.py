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
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.service import Aggregator
from fedmq.report import read_history
from fedmq.wire import DeviceMetrics, decode_weights, encode_metrics
from tests.aggregator import test_service
from tests.aggregator.test_service import ScriptedDevice, _update

service = test_service.service  # the scripted service fixture, with settings of its own here


class StatusReader:
    """Keeps the newest status document of the job."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.docs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.payload:  # an empty payload: the retained status cleared
            self.docs.put(json.loads(msg.payload))

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


# the scripted service of test_service.py, with no central test set and a target accuracy
NO_TEST_SET = {"eval_data": "none", "target_accuracy": 0.7}


@pytest.mark.parametrize("service", [NO_TEST_SET], indirect=True)
def test_federated_result_in_status_and_history_without_a_test_set(
    service: tuple[Aggregator, ScriptedDevice],
) -> None:
    agg, dev = service
    status = StatusReader(agg.s.host, agg.s.port, agg.s.topics.status())
    try:
        _federated_run(agg, dev, status)
    finally:
        status.close()


def _federated_run(agg: Aggregator, dev: ScriptedDevice, status: StatusReader) -> None:
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

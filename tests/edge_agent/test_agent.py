"""The agent's shell against a real Mosquitto, with the test as the aggregator: what a
device does with a model that does not fit it, with a step that fails, and with the
hold_dir hook."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import torch

from edge_agent.agent import Agent
from edge_agent.settings import AgentSettings
from edge_agent.state import DeviceStore
from fedmq.chunks import Reassembler
from fedmq.config import load_settings
from fedmq.tasks import Task, get_task
from fedmq.tasks.weights import get_weights
from fedmq.topics import Topics
from fedmq.wire import (
    RoundAnnouncement,
    TrainConfig,
    decode_chunk,
    decode_state,
    decode_update,
    encode_chunk,
    encode_manifest,
    encode_round,
    encode_weights,
)
from tests.edge_agent.versions import Version, make_version

JOB = "j"


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Broker:
    """The test's own client: publishes as the aggregator would and records a filter."""

    def __init__(self, mosquitto: Any, topics: Topics, record: str) -> None:
        self.topics = topics
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(record, 1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(mosquitto.host, mosquitto.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def recorded(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic and p]

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def publish_version(self, v: Version) -> None:
        """Chunks, then the manifest, retained: as the aggregator publishes a version (the
        chunks all in flight at once: one PUBACK wait each would take a delayed ACK each)."""
        sent = [self.client.publish(self.topics.global_chunk(v.manifest.version, i),
                                    encode_chunk(c), qos=1, retain=True)
                for i, c in enumerate(v.full + v.onnx + v.delta)]  # fmt: skip
        for info in sent:
            info.wait_for_publish(10)
        self.publish(self.topics.global_manifest(), encode_manifest(v.manifest))

    def open_round(self, round_id: int, version: int, device: str = "d1") -> None:
        now = time.time()
        self.publish(self.topics.round(), encode_round(RoundAnnouncement(
            job=JOB, round_id=round_id, model_version=version, state="open", opened_at=now,
            deadline=now + 600, selected=(device,), target=1, min_devices=1,
            train=TrainConfig(epochs=1, batch_size=32), codec="float32",
        )))  # fmt: skip

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Running:
    agent: Agent
    thread: threading.Thread
    stop: threading.Event


@pytest.fixture
def env(plain_broker: Any, topic_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    # the scripted side plays the aggregator with a plain client on a plain broker (the
    # secured path is what tests/integration and tests/broker/test_trust.py run)
    mosquitto = plain_broker
    topics = Topics(job=JOB, prefix=topic_prefix)
    broker = Broker(mosquitto, topics, f"{topic_prefix}/#")
    running: list[Running] = []

    def start(task: Task | None = None, **overrides: Any) -> Running:
        settings = AgentSettings(
            device_id="d1", job=JOB, prefix=topic_prefix, host=mosquitto.host,
            port=mosquitto.port, task="digits-mlp", num_devices=4, state_dir=tmp_path,
            torch_threads=1, insecure=True, **overrides,
        )  # fmt: skip
        agent = Agent(settings=settings, task=task)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        running.append(Running(agent, thread, stop))
        return running[-1]

    yield {"broker": broker, "topics": topics, "start": start, "root": tmp_path}
    for r in running:
        r.stop.set()
        r.thread.join(timeout=30)
    broker.close()


def states(env: dict[str, Any]) -> list[Any]:
    return [decode_state(p) for p in env["broker"].recorded(env["topics"].device_state("d1"))]


def updates(env: dict[str, Any]) -> list[Any]:
    """Every whole update the device published."""
    r, out = Reassembler(), []
    for p in env["broker"].recorded(env["topics"].update("d1")):
        done = r.add(decode_chunk(p), source="d1", now=0.0)
        if done is not None:
            out.append(decode_update(done.payload))
    return out


def digits_version(version: int, seed: int = 0, **kw: Any) -> Version:
    torch.manual_seed(seed)
    weights = get_weights(get_task("digits-mlp").build_model())
    return make_version(weights, version, job=JOB, task="digits-mlp", **kw)


def test_a_model_for_another_task_is_refused_with_its_reason_and_the_device_goes_on(
    env: dict[str, Any],
) -> None:
    broker, root = env["broker"], env["root"]
    v0 = digits_version(0)
    broker.publish_version(v0)
    run = env["start"]()
    wait_until("version 0 held", lambda: run.agent.fetch.version == 0)
    saved = (root / "d1" / "model.weights").read_bytes()

    # the attack: a retained manifest for another task, then one whose tensors do not fit
    torch.manual_seed(1)
    other = make_version(get_weights(get_task("mnist-2nn").build_model()), 1, job=JOB,
                         task="mnist-2nn")  # fmt: skip
    broker.publish_version(other)
    wait_until("the refusal on the state topic",
               lambda: any("mnist-2nn" in s.reason for s in states(env)))  # fmt: skip
    misfit = digits_version(2)
    broker.publish_version(replace(misfit, manifest=replace(
        misfit.manifest, tensors=misfit.manifest.tensors[:-1])))  # fmt: skip
    state = wait_until("the second refusal",
                       lambda: [s for s in states(env) if "missing" in s.reason])[-1]  # fmt: skip
    assert state.status == "online" and state.model_version == 0
    refused = {k: n for k, n in run.agent.counters.items() if not k.startswith("unverified")}
    assert refused == {"wrong_task": 1, "wrong_specs": 1}, run.agent.counters
    # nothing was saved: the device keeps version 0, and trains on it
    assert (root / "d1" / "model.weights").read_bytes() == saved
    assert json.loads((root / "d1" / "agent.json").read_text())["version"] == 0
    broker.open_round(1, 0)
    (u,) = wait_until("an update for round 1", lambda: updates(env))
    assert (u.round_id, u.base_version) == (1, 0) and run.thread.is_alive()

    # a restart finds the held model and the refused manifest, and does not crash
    run.stop.set()
    run.thread.join(timeout=30)
    again = env["start"]()
    assert again.agent.fetch.version == 0
    wait_until("the refusal after the restart", lambda: again.agent.counters.get("wrong_specs"))
    assert again.thread.is_alive()


class _Broken(torch.nn.Module):
    """The digits model whose forward pass fails: a bug in training."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = get_task("digits-mlp").build_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a bug in the training step")


def _broken_task() -> Task:
    digits = get_task("digits-mlp")
    return replace(digits, build_model=_Broken)


def test_a_failing_training_round_is_contained_and_the_device_goes_on(
    env: dict[str, Any],
) -> None:
    broker = env["broker"]
    torch.manual_seed(0)
    v0 = make_version(get_weights(_Broken()), 0, job=JOB, task="digits-mlp")
    broker.publish_version(v0)
    run = env["start"](task=_broken_task(), holdout_fraction=0.0)  # nothing to evaluate
    wait_until("version 0 held", lambda: run.agent.fetch.version == 0)
    broker.open_round(1, 0)
    wait_until("the failure counted", lambda: run.agent.counters.get("agent_error"))
    assert run.thread.is_alive() and not updates(env)
    wait_until("back online", lambda: states(env) and states(env)[-1].status == "online")
    # and it still follows the job: the next version is fetched and held
    torch.manual_seed(5)
    v1 = make_version(get_weights(_Broken()), 1, job=JOB, task="digits-mlp")
    broker.publish_version(v1)
    wait_until("version 1 held", lambda: run.agent.fetch.version == 1)
    # the broken model cannot be exported to serve either: refused for each version held
    wait_until("version 1 refused for serving", lambda: run.agent.counters.get("bad_onnx") == 2)
    refused = {k: n for k, n in run.agent.counters.items() if not k.startswith("unverified")}
    assert refused == {"agent_error": 1, "bad_onnx": 2}


def test_hold_dir_keeps_the_update_until_released_while_the_loop_goes_on(
    env: dict[str, Any], tmp_path: Path
) -> None:
    broker, hold = env["broker"], tmp_path / "hold"
    broker.publish_version(digits_version(0))
    run = env["start"](hold_dir=hold)
    wait_until("version 0 held", lambda: run.agent.fetch.version == 0)
    broker.open_round(1, 0)
    held = json.loads(wait_until("d1.held", lambda: (hold / "d1.held").exists()
                                 and (hold / "d1.held").read_text()))  # fmt: skip
    assert held["round_id"] == 1
    outbox = tmp_path / "d1" / "outbox"
    assert [p.stem for p in outbox.glob("*.update")] == [held["update_id"]]
    # the loop goes on meanwhile: it fetches the next version
    broker.publish_version(digits_version(1, seed=3))
    wait_until("version 1 held", lambda: run.agent.fetch.version == 1)
    assert updates(env) == []  # nothing sent, nor resent
    (hold / "d1.release").touch()
    (u,) = wait_until("the released update", lambda: updates(env))
    assert u.update_id == held["update_id"] and u.round_id == 1


def test_hold_dir_is_a_setting_like_the_others(tmp_path: Path) -> None:
    flags = load_settings(AgentSettings, flags={"hold_dir": str(tmp_path), "insecure": True},
                          environ={})  # fmt: skip
    env = load_settings(AgentSettings,
                        environ={"FEDMQ_HOLD_DIR": str(tmp_path), "FEDMQ_INSECURE": "1"})
    assert flags.hold_dir == env.hold_dir == tmp_path
    assert load_settings(AgentSettings, environ={"FEDMQ_INSECURE": "1"}).hold_dir is None


def test_a_saved_model_of_another_task_is_dropped_at_start(tmp_path: Path) -> None:
    torch.manual_seed(0)
    blob = encode_weights(get_weights(get_task("mnist-2nn").build_model()))
    store = DeviceStore(root=tmp_path / "d1")
    store.save_model(blob)
    store.save({"version": 4, "model_sha": hashlib.sha256(blob).hexdigest()})
    agent = Agent(settings=AgentSettings(device_id="d1", task="digits-mlp", state_dir=tmp_path,
                                         num_devices=4, insecure=True))  # fmt: skip
    assert agent.fetch.version == -1 and agent.fetch.weights is None

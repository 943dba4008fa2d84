"""The ONNX loop through a real Mosquitto, the test as the aggregator (signing with its
key): each new version is verified and swapped in, and predictions through the device's
local API change with it; a model that must not be served (wrong output, wrong bytes) is
refused with its reason and the previous one keeps serving, across a restart too. A
training device serves its own export of the version it holds."""

from __future__ import annotations

import dataclasses
import http.client
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import Agent
from edge_agent.settings import AgentSettings
from fedmq.signing import Signer
from fedmq.tasks import get_task
from fedmq.tasks.weights import get_weights
from fedmq.topics import Topics
from fedmq.wire import decode_state, encode_chunk, encode_manifest
from tests.edge_agent.onnx_models import random_linear
from tests.edge_agent.test_agent import JOB, Broker, wait_until
from tests.edge_agent.versions import Version, make_version

KEY = Ed25519PrivateKey.generate()  # the aggregator's
X = np.random.default_rng(9).random((16, 64), dtype=np.float32)  # digits-mlp inputs


class SignedBroker(Broker):
    def publish_version(self, v: Version) -> None:
        sent = [self.client.publish(self.topics.global_chunk(v.manifest.version, i),
                                    encode_chunk(c), qos=1, retain=True)
                for i, c in enumerate(v.full + v.onnx + v.delta)]  # fmt: skip
        for info in sent:
            info.wait_for_publish(10)
        sign = Signer(key=KEY).for_topic(self.topics.global_manifest())
        self.publish(self.topics.global_manifest(), encode_manifest(v.manifest, sign=sign))


@pytest.fixture
def env(plain_broker: Any, topic_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    topics = Topics(job=JOB, prefix=topic_prefix)
    broker = SignedBroker(plain_broker, topics, f"{topic_prefix}/#")
    pem = tmp_path / "server-key.pub.pem"
    pem.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    sock_dir = Path(tempfile.mkdtemp(prefix="fq", dir="/tmp"))  # sun_path: 108 bytes
    running: list[tuple[Agent, threading.Thread, threading.Event]] = []

    def start(**overrides: Any) -> Agent:
        settings = AgentSettings(
            device_id="d1", job=JOB, prefix=topic_prefix, host=plain_broker.host,
            port=plain_broker.port, username="d1", server_key=pem, task="digits-mlp",
            num_devices=4, state_dir=tmp_path, torch_threads=1,
            serve_socket=sock_dir / "d1.sock", **overrides,
        )  # fmt: skip
        agent, stop = Agent(settings=settings), threading.Event()
        thread = threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        running.append((agent, thread, stop))
        return agent

    def halt() -> None:
        for _, thread, stop in running:
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive()
        running.clear()

    yield {"broker": broker, "topics": topics, "start": start, "halt": halt,
           "sock": sock_dir / "d1.sock"}  # fmt: skip
    halt()
    broker.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


def api(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One call of the device's local API; (0, {}) while it does not listen yet."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.sock.connect(str(sock))
        conn.request(method, path, body=None if body is None else json.dumps(body).encode())
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    except (FileNotFoundError, ConnectionRefusedError):
        return 0, {}
    finally:
        conn.close()


def serving(env: dict[str, Any], version: int) -> bool:
    code, health = api(env["sock"], "GET", "/health")
    return code == 200 and health["version"] == version


def predictions(env: dict[str, Any]) -> dict[str, Any]:
    code, out = api(env["sock"], "POST", "/predict", {"inputs": X.tolist()})
    assert code == 200, out
    return out


def reasons(env: dict[str, Any]) -> list[str]:
    topic = env["topics"].device_state("d1")
    return [decode_state(p).reason for p in env["broker"].recorded(topic)]


def onnx_version(version: int, onnx: bytes) -> Version:
    torch.manual_seed(0)
    weights = get_weights(get_task("digits-mlp").build_model())
    return make_version(weights, version, job=JOB, task="digits-mlp", onnx=onnx)


def test_new_versions_are_verified_and_served_and_a_bad_one_keeps_the_old(
    env: dict[str, Any],
) -> None:
    broker = env["broker"]
    agent = env["start"](infer_only=True)
    broker.publish_version(onnx_version(1, random_linear(seed=1)))
    wait_until("version 1 served", lambda: serving(env, 1))
    p1 = predictions(env)
    broker.publish_version(onnx_version(2, random_linear(seed=2)))
    wait_until("version 2 served", lambda: serving(env, 2))
    p2 = predictions(env)
    assert (p1["version"], p2["version"]) == (1, 2)
    assert p1["predictions"] != p2["predictions"]  # the swap changed what is served

    # the attacks, signed by the aggregator's key: a model whose output does not fit the
    # task, then one whose bytes do not match the manifest's sha256
    broker.publish_version(onnx_version(3, random_linear(seed=3, classes=3)))
    wait_until("the refusal of version 3", lambda: any("version 3" in r for r in reasons(env)))
    v4 = onnx_version(4, random_linear(seed=4))
    bad = [dataclasses.replace(c, data=bytes(len(c.data))) if i == 0 else c
           for i, c in enumerate(v4.onnx)]  # fmt: skip
    broker.publish_version(dataclasses.replace(v4, onnx=bad))
    wait_until("the refusal of version 4", lambda: agent.counters.get("bad_payload"))
    assert agent.counters.get("bad_onnx") == 1, agent.counters
    assert [r for r in reasons(env) if "version 3" in r][0].startswith("bad_onnx: ")
    assert predictions(env) == p2  # version 2 keeps serving

    # a restart serves what the pointer names before anything arrives, checked again, and
    # holds that version: an older one replayed (signed, as it once was) is refused
    env["halt"]()
    again = env["start"](infer_only=True)
    wait_until("version 2 served after the restart", lambda: serving(env, 2))
    assert predictions(env) == p2
    wait_until("the retained bad version refused again", lambda: again.counters.get("bad_payload"))
    broker.publish_version(onnx_version(1, random_linear(seed=1)))
    wait_until("the replay refused", lambda: again.counters.get("stale_version"))
    assert predictions(env) == p2 and again.fetch.version == 2


def test_a_training_device_serves_its_export_of_the_held_version(env: dict[str, Any]) -> None:
    torch.manual_seed(3)
    weights = get_weights(get_task("digits-mlp").build_model())
    env["broker"].publish_version(make_version(weights, 0, job=JOB, task="digits-mlp"))
    env["start"]()
    wait_until("version 0 served", lambda: serving(env, 0))
    out = predictions(env)
    model = get_task("digits-mlp").build_model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        want = model(torch.from_numpy(X)).argmax(dim=1).tolist()
    assert out["source"] == "global" and out["predictions"] == want


def test_a_training_device_that_does_not_serve_exports_nothing(
    env: dict[str, Any], tmp_path: Path
) -> None:
    torch.manual_seed(3)
    weights = get_weights(get_task("digits-mlp").build_model())
    env["broker"].publish_version(make_version(weights, 0, job=JOB, task="digits-mlp"))
    agent = env["start"](serve=False)
    wait_until("version 0 held", lambda: agent.fetch.version == 0)
    # a second version: by the time it is held, all that followed the first has run
    env["broker"].publish_version(make_version(weights, 1, job=JOB, task="digits-mlp"))
    wait_until("version 1 held", lambda: agent.fetch.version == 1)
    # it holds the version (and would train on it) but exports, verifies and serves nothing
    assert agent.serving.version == -1 and not env["sock"].exists()
    served = tmp_path / "d1" / "serving"
    assert not served.exists() or not any(served.iterdir()), list(served.iterdir())
    assert "bad_onnx" not in agent.counters

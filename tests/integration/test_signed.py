"""A fleet with a signed downlink, attacked through the broker by a plain MQTT client: every
forged or replayed manifest and round is refused by every agent (training and
inference-only), which keeps training on the real model, and the aggregator restores its
retained messages. Judged by agent.json, the aggregator's history and state, never logs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.signing import Signer, create_key
from fedmq.wire import (
    RoundAnnouncement,
    TrainConfig,
    decode_manifest,
    decode_round,
    encode_chunk,
    encode_manifest,
    encode_round,
)
from tests.edge_agent.versions import make_version
from tests.integration.fleet import Fleet, Watcher

AGENTS = ("d0", "d1", "sensor")


def retain(client: Watcher, topic: str, payload: bytes) -> None:
    """Publish as the attacker: retained, QoS 1."""
    client.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def progress(fleet: Fleet, device: str) -> dict[str, Any]:
    path = fleet.root / "agents" / device / "agent.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_forged_and_replayed_downlink_is_refused_and_the_fleet_trains_on(
    fleet: Fleet, mosquitto: Any, tmp_path: Path
) -> None:
    key = create_key(tmp_path / "keys" / "agg.pem", tmp_path / "keys" / "agg.pub.pem")
    pub = tmp_path / "keys" / "agg.pub.pem"
    topics = fleet.topics
    # the attacker got past the ACL (the broker's operator, a stolen certificate with write
    # access to the downlink): the signatures, not the broker, have to stop it
    fleet_dir = fleet.fleet_dir
    assert fleet_dir is not None
    fleet_dir.add("intruder")
    with fleet_dir.acl.open("a") as fh:
        fh.write(f"\nuser intruder\ntopic readwrite {topics.base}/#\n")
    mosquitto.restart()  # re-reads the ACL before any fleet process starts
    recorder = Watcher(mosquitto, f"{topics.base}/+", identity="intruder")
    try:
        fleet.aggregator(rounds=0, devices_per_round=2, min_devices=2, lr=0.1,
                         signing_key=tmp_path / "keys" / "agg.pem")  # fmt: skip
        fleet.agent(0, 3, server_key=pub)
        fleet.agent(1, 3, server_key=pub)
        fleet.agent(2, 3, server_key=pub, device_id="sensor", profile="sensor-infer")
        fleet.wait_rounds(2, timeout=120)

        def signed(topic: str) -> list[bytes]:
            return [p for t, p in recorder.messages if t == topic and p]

        manifests = [decode_manifest(p) for p in signed(topics.global_manifest())]
        rounds = [decode_round(p) for p in signed(topics.round())]
        real = manifests[-1]
        assert real.sig is not None and real.epoch > 0  # the aggregator signs

        # the attacker's own model, chunked and retained with matching digests
        zeros = {s.name: np.zeros(s.shape, np.float32) for s in real.tensors}
        forged = make_version(zeros, real.version + 1, job=fleet.job, task=fleet.task)
        for i, chunk in enumerate(forged.full):
            retain(recorder, topics.global_chunk(forged.manifest.version, i), encode_chunk(chunk))
        outsider = Signer(key=Ed25519PrivateKey.generate()).for_topic(topics.global_manifest())
        other_job = Signer(key=key).for_topic(f"{topics.prefix}/other/global")
        huge = dataclasses.replace(forged.manifest, version=999_999)
        many = dataclasses.replace(forged.manifest, weights=dataclasses.replace(
            forged.manifest.weights, chunks=1_000_000))  # fmt: skip
        absurd = RoundAnnouncement(
            job=fleet.job, round_id=rounds[-1].round_id + 1, model_version=real.version,
            state="open", opened_at=0.0, deadline=4e9, selected=("d0", "d1"), target=2,
            min_devices=2, train=TrainConfig(epochs=1000, batch_size=10, lr=99.0),
            task=fleet.task, epoch=real.epoch,
        )  # fmt: skip
        attacks = [
            (topics.global_manifest(), encode_manifest(forged.manifest)),  # unsigned
            (topics.global_manifest(), encode_manifest(forged.manifest, sign=outsider)),
            (topics.global_manifest(), encode_manifest(  # another job's, moved here
                dataclasses.replace(forged.manifest, job="other"), sign=other_job)),
            (topics.global_manifest(), encode_manifest(huge)),
            (topics.global_manifest(), encode_manifest(many)),
            (topics.round(), encode_round(absurd)),
            # replays of the aggregator's own older, validly signed messages
            (topics.global_manifest(), signed(topics.global_manifest())[0]),
            (topics.round(), signed(topics.round())[0]),
        ]  # fmt: skip
        assert manifests[0].version < real.version and rounds[0].round_id < rounds[-1].round_id
        for topic, payload in attacks:
            retain(recorder, topic, payload)

        def refusals(device: str) -> dict[str, int]:
            return progress(fleet, device).get("counters", {})

        want = {"unsigned": 3, "bad_signature": 2, "stale_version": 1}
        for device in AGENTS:
            fleet.wait_for(
                f"{device} refusing every forgery",
                lambda d=device: all(refusals(d).get(k, 0) >= n for k, n in want.items()),
                timeout=60,
            )
        for device in ("d0", "d1"):  # the rounds: forged (unsigned) and replayed
            fleet.wait_for(f"{device} refusing the rounds",
                           lambda d=device: refusals(d).get("unsigned", 0) >= 4
                           and refusals(d).get("stale_round", 0) >= 1, timeout=30)  # fmt: skip
        after = len(fleet.history())
        history = fleet.wait_rounds(after + 2, timeout=120)
        # the devices kept training on the real model: every round complete with both
        assert all(r["outcome"] == "complete" and r["accepted"] == 2 for r in history), history
        newest = fleet.state()["version"]
        assert newest >= real.version + 2
        for device in AGENTS:
            p = fleet.wait_for(f"{device} holding a newer real version",
                               lambda d=device: progress(fleet, d).get("version", -1)
                               > real.version and progress(fleet, d), timeout=60)  # fmt: skip
            stored = fleet.state_dir / "versions" / f"{p['version']:06d}.manifest"
            m = decode_manifest(stored.read_bytes())
            held = m.onnx.sha256 if device == "sensor" and m.onnx else m.model_sha256
            assert p["model_sha"] == held, device
            assert "version_jump" not in refusals(device)  # signed fleets need no jump policy
        counters = fleet.state()["counters"]
        assert counters.get("foreign_downlink", 0) >= 6, counters
        assert counters.get("replayed_downlink", 0) >= 2, counters
        # and the broker holds the aggregator's own manifest again
        newcomer = Watcher(mosquitto, topics.global_manifest())  # the read-only operator
        try:
            (_, payload), *_ = fleet.wait_for("the retained manifest", lambda: newcomer.messages,
                                              timeout=30)  # fmt: skip
            retained = decode_manifest(payload)
            assert retained.sig is not None and retained.version >= newest - 1
        finally:
            newcomer.close()
    finally:
        recorder.close()

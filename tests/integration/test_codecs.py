"""Compressed updates and models end to end: a fleet training through a Mosquitto that caps
every message at 128 KiB (AWS IoT Core's limit), with each codec pipeline."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.store import Store
from fedmq.chunks import Reassembler
from fedmq.wire import decode_chunk, decode_update
from tests.integration.fleet import Fleet, Watcher

LIMIT = 131072  # message_size_limit, advertised as Maximum Packet Size in CONNACK
FLOAT32_UPDATE = 199_210 * 4  # bytes of one dense float32 mnist-2nn delta


@pytest.fixture
def limited(broker_factory: Any, tmp_path: Path, topic_prefix: str) -> Iterator[Fleet]:
    """A fleet of mnist-2nn (800 KB float32 updates) against a 128 KiB Mosquitto."""
    broker = broker_factory(message_size_limit=LIMIT, max_packet_size=LIMIT)
    fleet = Fleet(broker=broker, root=tmp_path, prefix=topic_prefix, task="mnist-2nn")
    yield fleet
    fleet.stop()


def updates_seen(watcher: Watcher) -> list[tuple[int, Any]]:
    """(payload bytes, Update) of every update the watcher saw whole, reassembled."""
    r = Reassembler(max_payload_bytes=64 << 20)
    out = []
    for topic, payload in list(watcher.messages):
        done = r.add(decode_chunk(payload), source=topic, now=0.0)
        if done is not None:
            out.append((len(done.payload), decode_update(done.payload)))
    return out


# (uplink pipeline, full-model codec, delta codec, most bytes an update may take, the
# accuracy 3 rounds of 3 IID devices must reach: top-k 1% sends 1% a round, so it is slower)
# (three fleets, one per kind of path: dense float32 up with a full fp16 model down; sparse
# fp16 up with a float32 model and dense deltas; the default sparse int8 up with sparse
# deltas down. The other pipelines' encodings, the int8 full model among them, are judged
# by the pure tests of tests/fedmq/test_codecs.py and tests/aggregator/test_bounds.py)
PIPELINES = [
    ("float32", "fp16", "", FLOAT32_UPDATE + 4096, 0.75),
    ("topk:0.01+fp16+zstd", "float32", "fp16+zstd", FLOAT32_UPDATE // 60, 0.5),
    ("topk:0.1+int8+zstd", "fp16", "topk:0.1+int8+zstd", FLOAT32_UPDATE // 15, 0.75),
]


@pytest.mark.parametrize(("codec", "downlink", "delta", "most", "accuracy"), PIPELINES,
                         ids=[f"{p[0]}-down-{p[2] or p[1]}" for p in PIPELINES])  # fmt: skip
def test_fleet_trains_through_a_128k_broker(
    limited: Fleet, codec: str, downlink: str, delta: str, most: float, accuracy: float
) -> None:
    fleet = limited
    watcher = Watcher(fleet.broker, fleet.topics.updates_filter())
    try:
        fleet.aggregator(rounds=3, devices_per_round=3, min_devices=3, round_timeout_s=120,
                         codec=codec, downlink=downlink, downlink_delta=delta,
                         publish_onnx=False)  # fmt: skip
        for i in range(3):
            fleet.agent(i, 3)
        rounds = fleet.wait_rounds(3, timeout=180)
        assert [r["outcome"] for r in rounds] == ["complete"] * 3, fleet.logs()
        assert all(r["accepted"] == 3 for r in rounds)
        accs = [r["accuracy"] for r in rounds]
        assert accs[-1] >= accuracy and accs[-1] > accs[0], accs
        assert fleet.procs["aggregator"].wait(timeout=30) == 0
        # every MQTT message fit the broker; every update used the pipeline and its size
        assert max(len(p) for _, p in watcher.messages) <= LIMIT
        seen = updates_seen(watcher)
        assert len(seen) == 9
        assert {u.codec for _, u in seen} == {codec}
        assert max(size for size, _ in seen) <= most, sorted(size for size, _ in seen)
        log = fleet.log_text("aggregator")
        assert "rejected" not in log and f"({downlink})" in log
        agent_log = fleet.log_text("agent-0")
        # version 0 comes whole; every later version as a delta when one is published
        held = agent_log.count("holding global version")
        via_delta = agent_log.count(" bytes fetched, delta)")
        assert held >= 3 and via_delta == (held - 1 if delta else 0), agent_log
        assert "does not rebuild" not in agent_log
    finally:
        watcher.close()


def test_byte_budget_from_the_round_and_from_a_profile(limited: Fleet, tmp_path: Path) -> None:
    """The round's budget binds every device; a profile's smaller budget binds its device."""
    fleet = limited
    profile = tmp_path / "lora-node.toml"
    profile.write_text('description = "a LoRa-backed node"\nmax_update_bytes = 6000\n')
    watcher = Watcher(fleet.broker, fleet.topics.updates_filter())
    try:
        fleet.aggregator(rounds=1, devices_per_round=2, min_devices=2, codec="int8+zstd",
                         update_budget_bytes=20000, publish_onnx=False)  # fmt: skip
        fleet.agent(0, 2, profile=profile)
        fleet.agent(1, 2)
        (rnd,) = fleet.wait_rounds(1, timeout=120)
        assert rnd["outcome"] == "complete" and rnd["accepted"] == 2, fleet.logs()
        sizes = {u.device: (size, u.codec) for size, u in updates_seen(watcher)}
        assert sizes["d0"][0] <= 6000 and sizes["d1"][0] <= 20000, sizes
        # dense int8 does not fit: each device chose a top-k fraction to meet its budget
        assert all(c.startswith("topk:") and c.endswith("+int8+zstd") for _, c in sizes.values())
        assert "to fit the 6000-byte budget" in fleet.log_text("agent-0")
        assert "to fit the 20000-byte budget" in fleet.log_text("agent-1")
    finally:
        watcher.close()


def _two_rounds(fleet: Fleet, *, restart_agent: bool, drop_residual: bool = False) -> bytes:
    """Round 1, the aggregator restarted, round 2; the weights of version 2."""
    flags = dict(devices_per_round=1, min_devices=1, codec="topk:0.01+int8+zstd",
                 publish_onnx=False)  # fmt: skip
    fleet.aggregator(rounds=1, **flags)
    fleet.agent(0, 1)
    assert fleet.procs["aggregator"].wait(timeout=120) == 0, fleet.logs()
    residual = fleet.root / "agents" / "d0" / "residual.weights"
    fleet.wait_for("the residual", residual.exists, timeout=10)
    if restart_agent:
        fleet.procs["agent-0"].terminate()
        assert fleet.procs["agent-0"].wait(timeout=30) == 0
        if drop_residual:
            residual.unlink()
        fleet.agent(0, 1)
    fleet.aggregator(rounds=2, **flags)  # resumes from its state dir: round 2
    assert fleet.procs["aggregator"].wait(timeout=120) == 0, fleet.logs()
    return Store(root=fleet.state_dir).load_version(2)[0]  # the float32 weights blob


def test_agent_restarted_between_rounds_keeps_its_residual(
    broker_factory: Any, tmp_path: Path, topic_prefix: str
) -> None:
    """Training and rounding are seeded, so version 2 is the same whether or not the agent
    restarted between rounds, and different when its residual is lost."""
    results = {}
    for case in ("same-process", "restarted", "residual-lost"):
        root = tmp_path / case
        root.mkdir()
        prefix = f"{topic_prefix}{case[0]}"
        fleet = Fleet(broker=broker_factory(prefix=prefix), root=root, prefix=prefix,
                      task="mnist-2nn")  # fmt: skip
        try:
            blob = _two_rounds(fleet, restart_agent=case != "same-process",
                               drop_residual=case == "residual-lost")  # fmt: skip
        finally:
            fleet.stop()
        results[case] = hashlib.sha256(blob).hexdigest()
    assert results["restarted"] == results["same-process"]
    assert results["residual-lost"] != results["same-process"]

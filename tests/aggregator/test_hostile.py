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

from aggregator.journal import Accepted, Journal, Snapshot, read_ledger
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import read_history
from fedmq.codecs import encode_tensors, parse_pipeline
from fedmq.tasks import get_task
from fedmq.tasks import weights as tw
from fedmq.wire import TensorSpec, Update, decode_weights, encode_weights, specs_of
from tests.aggregator.test_service import ScriptedDevice, _update

Start = Callable[..., tuple[Aggregator, ScriptedDevice]]


@pytest.fixture
def start(mosquitto: Any, tmp_path: Path, topic_prefix: str) -> Iterator[Start]:
    """start(**settings) runs an aggregator for devices 'a' and 'b' in a thread."""
    running: list[tuple[threading.Event, threading.Thread, ScriptedDevice, list[int]]] = []

    def make(**extra: Any) -> tuple[Aggregator, ScriptedDevice]:
        settings = AggregatorSettings(**{
            "job": "svc", "prefix": topic_prefix, "port": mosquitto.port, "task": "digits-mlp",
            "state_dir": tmp_path / "agg", "rounds": 2, "devices_per_round": 2,
            "min_devices": 2, "round_timeout_s": 30, "start_wait_s": 30,
            "publish_onnx": False, "insecure": True, **extra,
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


def _specs() -> tuple[TensorSpec, ...]:
    return specs_of(tw.get_weights(get_task("digits-mlp").build_model()))


def _poison_journal(state_dir: Path, how: str) -> None:
    """A state directory as a crash would leave it, with one thing an attacker poisoned."""
    if how == "state.json":
        state_dir.mkdir(parents=True)
        (state_dir / "state.json").write_text('{"version": 0, "next_round": ')
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


@pytest.mark.parametrize("how", ["body", "snapshot", "state.json"])
def test_a_poisoned_state_directory_is_quarantined_on_restart(
    start: Start, tmp_path: Path, how: str
) -> None:
    _poison_journal(tmp_path / "agg", how)
    agg, dev = start(rounds=3)
    dev.online("a", "b")
    if how != "state.json":  # the journalled round 1 is moved aside and ends abandoned
        rnd = _history_round(agg, 1, dev)
        assert rnd["outcome"] == "abandoned" and rnd["reason"].startswith("quarantined"), rnd
    quarantined = sorted(p.name for p in (tmp_path / "agg" / "quarantine").iterdir())
    assert quarantined and all(how.split(".")[0] in n or "bodies" in n for n in quarantined)
    assert agg.ledger.counters["quarantined_files"] == len(quarantined)

    first = 2 if how != "state.json" else 1
    r = dev.open_round(first)
    zeros = _zeros(dev)
    for d in r.selected:
        dev.send(d, _update(f"n{d}", d, first, 0, {k: v + 1 for k, v in zeros.items()}))
        assert dev.ack_for(f"n{d}").status == "accepted"
    assert _history_round(agg, first, dev)["outcome"] == "complete"
    state = json.loads((tmp_path / "agg" / "state.json").read_text())
    assert state["version"] == 1 and state["next_round"] == first + 1

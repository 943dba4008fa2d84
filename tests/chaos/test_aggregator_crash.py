"""kill -9 the aggregator mid-round: nothing accepted is lost, nothing is counted twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.wire import decode_weights
from tests.integration.fleet import Fleet

FLAGS = {"rounds": 3, "devices_per_round": 3, "min_devices": 3, "round_timeout_s": 120,
         "seed": 3, "epochs": 2, "lr": 0.1}  # fmt: skip


def _log(fleet: Fleet, name: str) -> str:
    return (fleet.root / f"{name}.log").read_text()


def _assert_counted_once(fleet: Fleet) -> None:
    """From the aggregator's state: every counted id once, every round's devices distinct."""
    history = fleet.history()
    counted = fleet.state()["counted_ids"]
    assert sum(r["accepted"] for r in history) == len(counted)
    for r in history:
        devices = [p["device"] for p in r["participants"]]
        assert len(devices) == len(set(devices)) == r["accepted"], r


def _fleet(mosquitto: Any, root: Path, prefix: str, job: str) -> Fleet:
    root.mkdir()  # own prefix (device state is per prefix) and job (client ids are per job)
    return Fleet(broker=mosquitto, root=root, prefix=prefix, job=job)


def _final_weights(fleet: Fleet) -> dict[str, np.ndarray]:
    return decode_weights((fleet.state_dir / "versions" / "000003.weights").read_bytes())


def test_crash_mid_round_resumes_it_with_the_same_result(
    mosquitto: Any, tmp_path: Path, topic_prefix: str
) -> None:
    plain = _fleet(mosquitto, tmp_path / "plain", topic_prefix + "p", "plain")
    crash = _fleet(mosquitto, tmp_path / "crash", topic_prefix + "c", "crash")
    try:
        for f in (plain, crash):
            f.aggregator(**FLAGS)
            f.agent(0, 3)
            f.agent(1, 3)
            f.agent(2, 3, extra_delay_s=6)  # round 2 is still open when the crash comes
        crash.wait_for("2 updates accepted in round 2",
                       lambda: _log(crash, "aggregator").count("for round 2 (") >= 2,
                       timeout=120)  # fmt: skip
        crash.kill("aggregator")
        assert (crash.state_dir / "open_round.msgpack").exists()
        crash.aggregator(**FLAGS)  # same state directory
        for f in (plain, crash):
            f.wait_rounds(3, timeout=180)
            assert f.procs["aggregator"].wait(timeout=30) == 0
        text = _log(crash, "aggregator")
        assert "resumed open round 2: 2 of 3 updates already counted" in text
        for f in (plain, crash):
            assert [r["outcome"] for r in f.history()] == ["complete"] * 3
            _assert_counted_once(f)
        for i in range(3):  # nobody was asked to redo round 2
            assert _log(crash, f"agent-{i}").count("round 2: trained") == 1
        a, b = _final_weights(plain), _final_weights(crash)
        for name in a:  # equal up to the order of a float64 sum, rounded to float32
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6)
        assert [r["accuracy"] for r in plain.history()] == [r["accuracy"] for r in crash.history()]
    finally:
        plain.stop()
        crash.stop()


def test_update_delivered_twice_and_resent_after_agent_restart_counts_once(
    fleet: Fleet,
) -> None:
    # two rounds, so the service is still there for the second copy after round 1 closes
    flags = {"rounds": 2, "devices_per_round": 2, "min_devices": 2, "round_timeout_s": 120}
    fleet.aggregator(**flags)
    fleet.agent(0, 2)
    fleet.agent(1, 2, extra_delay_s=6)
    fleet.wait_for("d0's update accepted",
                   lambda: "accepted update" in _log(fleet, "aggregator"), timeout=120)  # fmt: skip
    fleet.kill("aggregator")  # d1 now sends while the aggregator is away: the broker keeps it
    fleet.wait_for("d1 sent its update", lambda: "sent update" in _log(fleet, "agent-1"), 60)
    time.sleep(0.5)
    fleet.kill("agent-1")  # before any ack: its outbox still holds the update
    fleet.agent(1, 2, extra_delay_s=6)  # resends the outbox on connect
    fleet.wait_for("d1 resent", lambda: "resending unacknowledged update" in
                   _log(fleet, "agent-1"), timeout=60)  # fmt: skip
    fleet.aggregator(**flags)  # receives the queued copy and the resend
    fleet.wait_for("the second copy", lambda: "already counted; acknowledged again" in
                   _log(fleet, "aggregator"), timeout=120)  # fmt: skip
    rnd = fleet.wait_rounds(1, timeout=120)[0]
    assert rnd["outcome"] == "complete" and rnd["accepted"] == 2
    assert fleet.procs["aggregator"].wait(timeout=120) == 0
    _assert_counted_once(fleet)
    assert fleet.state()["counters"]["duplicates"] >= 1
    assert _log(fleet, "agent-1").count("round 1: trained") == 1

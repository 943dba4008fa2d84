"""kill -9 the aggregator mid-round: nothing accepted is lost, nothing is counted twice,
and a stateful server optimiser (FedAdam) resumes exactly where it was.

Stragglers are made by holding a device's update (the agent's hold_dir hook) until the
test releases it, and every check reads the aggregator's ledger and history, not its log.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.server_opt import decode_opt_state
from aggregator.store import Store
from fedmq.wire import decode_weights, specs_of
from tests.integration.fleet import Fleet, Watcher

FLAGS = {"rounds": 3, "devices_per_round": 3, "min_devices": 3, "round_timeout_s": 120,
         "seed": 3, "epochs": 2, "lr": 0.1}  # fmt: skip


def _fleet(broker_factory: Any, root: Path, prefix: str, job: str) -> Fleet:
    root.mkdir()  # own broker, whose fleet directory is for this prefix and job
    return Fleet(broker=broker_factory(prefix=prefix, job=job), root=root, prefix=prefix, job=job)


def _final_weights(fleet: Fleet) -> dict[str, np.ndarray]:
    return decode_weights(Store(root=fleet.state_dir).load_version(3)[0])


def _accepted(fleet: Fleet, round_id: int) -> list[dict[str, Any]]:
    return [v for v in fleet.ledger() if v["verdict"] == "accepted" and v["round"] == round_id]


def _held(hold: Path, device: str, round_id: int = 0) -> bool:
    """The device holds an update (for round_id, when given)."""
    try:
        held = json.loads((hold / f"{device}.held").read_text())
    except (OSError, ValueError):
        return False
    return not round_id or held["round_id"] == round_id


def _release(hold: Path, device: str) -> None:
    (hold / f"{device}.release").touch()


# FedAdam's state must survive the kill; its devices train with FedProx (mu announced in
# every round), which the crash must not disturb either
# FedAdam (with FedProx on the devices) only: its run covers what plain FedAvg's did (the
# journal, the open round, the replayed sum) and the optimiser's state besides; FedAvg's
# crash safety is also judged by the other tests of this file and tests/aggregator
@pytest.mark.parametrize("server_optimizer,prox_mu", [("adam", 0.01)])
def test_crash_mid_round_resumes_it_with_the_same_result(
    broker_factory: Any, tmp_path: Path, topic_prefix: str, server_optimizer: str,
    prox_mu: float,
) -> None:  # fmt: skip
    plain = _fleet(broker_factory, tmp_path / "plain", topic_prefix + "p", "plain")
    crash = _fleet(broker_factory, tmp_path / "crash", topic_prefix + "c", "crash")
    hold = tmp_path / "hold"
    hold.mkdir()
    flags = {**FLAGS, "server_optimizer": server_optimizer, "prox_mu": prox_mu}
    try:
        for f in (plain, crash):
            f.aggregator(**flags)
            f.agent(0, 3)
            f.agent(1, 3)
        plain.agent(2, 3)
        crash.agent(2, 3, hold_dir=hold)  # d2 holds each update until released
        # round 1 needs d2: release it, then hold its round-2 update
        crash.wait_for("d2's round 1 update", lambda: _held(hold, "d2", 1), timeout=120)
        _release(hold, "d2")  # used up: d2 holds its next update again
        crash.wait_for("d0 and d1 accepted in round 2",
                       lambda: len(_accepted(crash, 2)) == 2, timeout=120)  # fmt: skip
        crash.wait_for("d2 holding its round 2 update", lambda: _held(hold, "d2", 2), 120)
        before = {v["update_id"] for v in _accepted(crash, 2)}
        crash.kill("aggregator")  # kill -9 with two of round 2's three updates accepted
        assert (crash.state_dir / "journal" / "000002.bodies").exists()
        crash.aggregator(**flags)  # same state directory: it resumes, then connects
        _release(hold, "d2")  # the broker keeps d2's update for it if it is not back yet
        crash.wait_for("d2 holding its round 3 update", lambda: _held(hold, "d2", 3), 120)
        _release(hold, "d2")
        for f in (plain, crash):
            f.wait_rounds(3, timeout=180)
            assert f.procs["aggregator"].wait(timeout=30) == 0
        for f in (plain, crash):
            history = f.history()
            assert [r["outcome"] for r in history] == ["complete"] * 3
            assert [len(_accepted(f, r)) for r in (1, 2, 3)] == [3, 3, 3]
            ids = Counter(v["update_id"] for v in f.ledger() if v["verdict"] == "accepted")
            assert set(ids.values()) == {1}, ids  # nothing counted twice
        # round 2 went on with the two updates accepted before the crash: nobody redid it
        assert before < {v["update_id"] for v in _accepted(crash, 2)}
        assert {v["device"] for v in _accepted(crash, 2)} == {"d0", "d1", "d2"}
        a, b = _final_weights(plain), _final_weights(crash)
        for name in a:  # equal up to the order of a float64 sum, rounded to float32
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6)
        assert [r["accuracy"] for r in plain.history()] == [r["accuracy"] for r in crash.history()]
        if server_optimizer != "sgd":
            # the optimiser's moments went on from version 1's saved state after the restart:
            # three steps, not two from a fresh start, and the same moments as without a crash
            specs = specs_of(a)
            stores = (Store(root=plain.state_dir), Store(root=crash.state_dir))
            p, c = (decode_opt_state(s.load_optimizer(3) or b"", server_optimizer, specs)
                    for s in stores)  # fmt: skip
            assert p.step == c.step == 3
            for name in a:
                np.testing.assert_allclose(c.m[name], p.m[name], rtol=1e-5, atol=1e-9)
                np.testing.assert_allclose(c.v[name], p.v[name], rtol=1e-5, atol=1e-12)
    finally:
        plain.stop()
        crash.stop()


def test_update_delivered_twice_and_resent_after_agent_restart_counts_once(
    fleet: Fleet, mosquitto: Any, tmp_path: Path
) -> None:
    # two rounds, so the service is still there for the second copy after round 1 closes
    flags = {"rounds": 2, "devices_per_round": 2, "min_devices": 2, "round_timeout_s": 120}
    hold = tmp_path / "hold"
    hold.mkdir()
    updates = Watcher(mosquitto, fleet.topics.update("d1"))
    try:
        fleet.aggregator(**flags)
        fleet.agent(0, 2)
        fleet.agent(1, 2, hold_dir=hold)
        fleet.wait_for("d0's update accepted", lambda: _accepted(fleet, 1), timeout=120)
        fleet.wait_for("d1 holding its update", lambda: _held(hold, "d1"), timeout=120)
        fleet.kill("aggregator")  # d1 now sends while the aggregator is away: the broker keeps it
        _release(hold, "d1")
        fleet.wait_for("d1's update on the broker", lambda: updates.messages, timeout=60)
        fleet.kill("agent-1")  # before any ack: its outbox still holds the update
        assert len(fleet.outbox(1)) == 1
        sent = len(updates.messages)
        _release(hold, "d1")  # the restarted agent would hold it again otherwise
        fleet.agent(1, 2, hold_dir=hold)  # resends its outbox
        fleet.wait_for("d1 resent", lambda: len(updates.messages) >= 2 * sent, timeout=60)
        fleet.aggregator(**flags)  # receives the queued copy and the resend
        rnd = fleet.wait_rounds(1, timeout=120)[0]
        assert rnd["outcome"] == "complete" and rnd["accepted"] == 2
        fleet.wait_for("the second copy answered",
                       lambda: any(v["verdict"] == "duplicate" for v in fleet.ledger()), 120)
        fleet.wait_for("d1 holding its round 2 update", lambda: _held(hold, "d1", 2), 120)
        _release(hold, "d1")
        assert fleet.procs["aggregator"].wait(timeout=120) == 0
    finally:
        updates.close()
    verdicts = [(v["device"], v["round"], v["verdict"]) for v in fleet.ledger()]
    assert verdicts.count(("d1", 1, "accepted")) == 1
    assert verdicts.count(("d1", 1, "duplicate")) >= 1
    assert [r["accepted"] for r in fleet.history()] == [2, 2]
    assert not fleet.outbox(1)

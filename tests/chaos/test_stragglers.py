"""20% stragglers ten times slower: in synchronous mode they miss every deadline and are
acknowledged late; in asynchronous mode they are folded in with their staleness. Either
way, no accepted update is lost or counted twice."""

from __future__ import annotations

from broker.mosquitto import MosquittoBroker
from tests.chaos.checks import assert_counted_once
from tests.integration.fleet import Fleet, Watcher

DEVICES = 5
SLOW = 4  # device d4: one device in five
FAST_S = 1.0  # simulated compute time after training; digits-mlp itself trains in ~0.05 s
SLOW_S = 10 * FAST_S
# Sync: warm fast devices report about 1.5 s into a round, the slow one after SLOW_S, so a
# 5 s deadline closes every round by quorum without it. A device's first training step
# is slow (several seconds on a loaded machine), so the first rounds may be abandoned.
TIMEOUT_S = 5
SYNC_ROUNDS = 8
# Async: a version every 4 updates, as many as there are fast devices, so versions move on
# about every second while the straggler trains: its updates arrive several versions stale.
BUFFER_SIZE = 4
ASYNC_ROUNDS = 20
MAX_STALENESS = 20


def _start(fleet: Fleet, **flags: object) -> None:
    fleet.aggregator(devices_per_round=DEVICES, **flags)  # round 1 waits for all five
    for i in range(DEVICES):
        fleet.agent(i, DEVICES, extra_delay_s=SLOW_S if i == SLOW else FAST_S)


def test_sync_rounds_close_by_quorum_and_the_straggler_is_acknowledged_late(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    acks = Watcher(mosquitto, fleet.topics.acks_filter())
    try:
        _start(fleet, rounds=SYNC_ROUNDS, over_select=0, min_devices=DEVICES - 1,
               round_timeout_s=TIMEOUT_S)  # fmt: skip
        assert fleet.procs["aggregator"].wait(timeout=80) == 0, fleet.logs()
    finally:
        acks.close()

    history = assert_counted_once(fleet)  # participants distinct, each update counted once
    assert [r["round"] for r in history] == list(range(1, SYNC_ROUNDS + 1))
    outcomes = [r["outcome"] for r in history]
    assert "quorum" in outcomes, history
    first = outcomes.index("quorum")  # rounds before it: cold start, too few made it in time
    assert outcomes[:first] == ["abandoned"] * first and first <= 3, outcomes
    assert outcomes[first:] == ["quorum"] * (SYNC_ROUNDS - first), outcomes
    for rnd in history:
        participants = {p["device"] for p in rnd["participants"]}
        assert f"d{SLOW}" in rnd["selected"] and f"d{SLOW}" not in participants, rnd
    assert all(r["accepted"] == DEVICES - 1 for r in history[first:]), history
    # the straggler trains every other round or so and is told each time it was late;
    # a late update is answered, not counted
    slow = [a for topic, a in acks.acks() if fleet.topics.device_of(topic) == f"d{SLOW}"]
    assert len(slow) >= 2 and {a.status for a in slow} == {"late"}, slow
    late = {a.update_id for _, a in acks.acks() if a.status == "late"}
    assert not late & set(fleet.counted()), late


def test_async_folds_the_straggler_in_with_its_staleness(fleet: Fleet) -> None:
    _start(fleet, mode="async", rounds=ASYNC_ROUNDS, buffer_size=BUFFER_SIZE,
           max_staleness=MAX_STALENESS, staleness_exponent=0.5)  # fmt: skip
    assert fleet.procs["aggregator"].wait(timeout=80) == 0, fleet.logs()

    history = fleet.history()
    assert [r["version"] for r in history] == list(range(1, ASYNC_ROUNDS + 1))
    for rnd in history:
        assert rnd["outcome"] == "buffered" and rnd["accepted"] == BUFFER_SIZE, rnd
        assert len(rnd["participants"]) == BUFFER_SIZE, rnd
        assert all(0 <= p["staleness"] <= MAX_STALENESS for p in rnd["participants"]), rnd
    slow = [p for r in history for p in r["participants"] if p["device"] == f"d{SLOW}"]
    assert slow, history  # folded in, not dropped ...
    assert all(p["staleness"] >= 1 for p in slow), slow  # ... although versions moved on
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert_counted_once(fleet, sync=False)
    assert not [v for v in fleet.ledger() if v["verdict"] == "rejected"]

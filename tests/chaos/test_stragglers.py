"""A straggler in every round: in synchronous mode it misses every round and is
acknowledged late; in asynchronous mode it is folded in with its staleness. Either way no
accepted update is lost or counted twice.

The straggler is made by holding its update (the agent's hold_dir hook) until the round
it trained for has closed, so the outcome does not depend on how busy the machine is.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from broker.mosquitto import MosquittoBroker
from tests.chaos.checks import assert_counted_once, online
from tests.integration.fleet import Fleet, Watcher

DEVICES = 5
SLOW = 4  # device d4: one device in five
SYNC_ROUNDS = 4
ASYNC_ROUNDS = 6
BUFFER_SIZE = 4  # as many as there are fast devices


def _release_when_its_round_closed(fleet: Fleet, hold: Path) -> bool:
    """Release the straggler's held updates for rounds that have closed (so each of them is
    behind when it arrives); True when the aggregator is done."""
    held, release = hold / f"d{SLOW}.held", hold / f"d{SLOW}.release"
    if held.exists() and not release.exists():
        closed = [r["round"] for r in fleet.history()]
        newest = json.loads(held.read_text())["round_id"]
        if closed and newest <= closed[-1]:
            release.write_text(json.dumps({"up_to_round": closed[-1]}))
    return fleet.procs["aggregator"].poll() is not None


def _start(fleet: Fleet, hold: Path, **flags: object) -> None:
    """The agents first, then the aggregator once all five are online: round 1 opens
    with every device (a round opened with four, the straggler among them, could not
    complete without it)."""
    states = Watcher(fleet.broker, fleet.topics.device_states_filter())
    try:
        for i in range(DEVICES):
            fleet.agent(i, DEVICES, **({"hold_dir": hold} if i == SLOW else {}))
        fleet.wait_for("every device online", partial(_all_online, states), timeout=120)
    finally:
        states.close()
    fleet.aggregator(**flags)


def _all_online(states: Watcher) -> bool:
    return len(online(states)) == DEVICES


def test_sync_rounds_complete_without_the_straggler_and_it_is_acknowledged_late(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    acks = Watcher(mosquitto, fleet.topics.acks_filter())
    try:
        # 4 of 5 complete a round; all 5 are selected (over-selection), so the straggler
        # trains every round; the deadline is never what closes one
        _start(fleet, tmp_path, rounds=SYNC_ROUNDS, devices_per_round=DEVICES - 1,
               over_select=0.25, min_devices=DEVICES - 1, round_timeout_s=120)  # fmt: skip
        fleet.wait_for("the aggregator to finish",
                       partial(_release_when_its_round_closed, fleet, tmp_path),
                   timeout=180)
        assert fleet.procs["aggregator"].wait(timeout=10) == 0, fleet.logs()
    finally:
        acks.close()

    history = assert_counted_once(fleet)  # participants distinct, each update counted once
    assert [r["round"] for r in history] == list(range(1, SYNC_ROUNDS + 1))
    for rnd in history:
        participants = {p["device"] for p in rnd["participants"]}
        assert rnd["outcome"] == "complete" and rnd["accepted"] == DEVICES - 1, rnd
        assert f"d{SLOW}" in rnd["selected"] and f"d{SLOW}" not in participants, rnd
    # every update of the straggler that the aggregator judged came too late (those of the
    # last rounds may arrive after it stopped: the first ones have rounds to spare)
    slow = [v for v in fleet.ledger() if v["device"] == f"d{SLOW}"]
    assert len(slow) >= SYNC_ROUNDS - 2 and {v["verdict"] for v in slow} == {"late"}, slow
    late = [a for topic, a in acks.acks() if fleet.topics.device_of(topic) == f"d{SLOW}"]
    assert {a.status for a in late} == {"late"}, late  # ... and was told so
    assert not {a.update_id for a in late} & set(fleet.counted())


def test_async_folds_the_straggler_in_with_its_staleness(fleet: Fleet, tmp_path: Path) -> None:
    # the first buffer opens once all five are online (not after start_wait_s)
    _start(fleet, tmp_path, mode="async", rounds=ASYNC_ROUNDS, buffer_size=BUFFER_SIZE,
           devices_per_round=DEVICES, max_staleness=20, staleness_exponent=0.5,
           round_timeout_s=120)  # fmt: skip
    fleet.wait_for("the aggregator to finish",
                   partial(_release_when_its_round_closed, fleet, tmp_path),
                   timeout=180)
    assert fleet.procs["aggregator"].wait(timeout=10) == 0, fleet.logs()

    history = assert_counted_once(fleet, sync=False)
    assert [r["version"] for r in history] == list(range(1, ASYNC_ROUNDS + 1))
    for rnd in history:
        assert rnd["outcome"] == "buffered" and rnd["accepted"] == BUFFER_SIZE, rnd
        assert all(0 <= p["staleness"] <= 20 for p in rnd["participants"]), rnd
    slow = [p for r in history for p in r["participants"] if p["device"] == f"d{SLOW}"]
    assert slow, history  # folded in, not dropped ...
    assert all(p["staleness"] >= 1 for p in slow), slow  # ... although versions moved on
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    # one entry per device per buffer: a device whose stale update took its slot in the open
    # buffer has the next one it sends for that buffer refused, and nothing else is refused
    rejected = [v for v in fleet.ledger() if v["verdict"] == "rejected"]
    assert all(v["reason"].startswith("duplicate_update") for v in rejected), rejected

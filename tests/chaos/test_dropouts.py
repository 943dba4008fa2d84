"""Devices die mid-round, every round: their Last Will ends the wait for them, the round
closes with the rest long before its deadline, and the restarted devices take part again.

Every device holds its update (the agent's hold_dir hook) until the test releases it, so
the devices are killed while they are certainly in the middle of the round, and the
restarted ones are certainly back before the round they are expected in."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

from broker.mosquitto import MosquittoBroker
from tests.chaos.checks import assert_counted_once, online, opened
from tests.integration.fleet import Fleet, Watcher

DEVICES = 6
ROUNDS = 3
MIN_DEVICES = 3
TIMEOUT_S = 120  # never reached: the Wills end every round
KILL_FRACTION = 0.34  # two of six, then one a round


def _holding(hold: Path, device: str, round_id: int) -> bool:
    try:
        return json.loads((hold / f"{device}.held").read_text())["round_id"] == round_id
    except (OSError, ValueError):
        return False


def _all_holding(hold: Path, devices: set[str], round_id: int) -> bool:
    return all(_holding(hold, d, round_id) for d in devices)


def _all_online(states: Watcher, devices: set[str]) -> bool:
    return devices <= online(states)



def test_rounds_close_early_without_the_devices_killed_in_them(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    rounds = Watcher(mosquitto, fleet.topics.round())
    states = Watcher(mosquitto, fleet.topics.device_states_filter())
    try:
        # no broker restart here: a Will is a dead device, counted after a short grace
        fleet.aggregator(rounds=ROUNDS, devices_per_round=DEVICES, over_select=0,
                         min_devices=MIN_DEVICES, round_timeout_s=TIMEOUT_S,
                         drop_grace_s=2)  # fmt: skip
        for i in range(DEVICES):
            fleet.agent(i, DEVICES, hold_dir=hold)
        rng = random.Random(7)
        killed: dict[int, list[str]] = {}
        for r in range(1, ROUNDS + 1):
            ann = fleet.wait_for(f"round {r} to open", partial(opened, rounds, r), timeout=60)
            back = set(killed.get(r - 2, []))
            assert back <= set(ann.selected), (r, sorted(back - set(ann.selected)))
            selected = set(ann.selected)
            fleet.wait_for(f"every selected device holding its round {r} update",
                           partial(_all_holding, hold, selected, r), timeout=120)
            # a third of the round's devices, sparing those restarted after the last two culls
            count = int(KILL_FRACTION * len(ann.selected))
            spared = back | set(killed.get(r - 1, []))
            victims = sorted(rng.sample(sorted(set(ann.selected) - spared), count))
            assert len(ann.selected) - len(victims) >= MIN_DEVICES, ann
            for device in victims:
                fleet.kill(f"agent-{device[1:]}")  # SIGKILL: no offline message, the Will fires
            for device in sorted(set(ann.selected) - set(victims)):
                (hold / f"{device}.release").touch()
            killed[r] = victims
            fleet.wait_rounds(r, timeout=60)
            for device in victims:  # back with the same id and state directory; the update
                (hold / f"{device}.held").unlink()  # it held is late now: it goes at once
                fleet.agent(int(device[1:]), DEVICES, hold_dir=hold)
            if r + 1 <= ROUNDS:  # they are online before round r + 1 closes
                fleet.wait_for("the restarted devices online",
                               partial(_all_online, states, set(victims)), timeout=60)
        assert fleet.procs["aggregator"].wait(timeout=30) == 0
    finally:
        rounds.close()
        states.close()

    history = assert_counted_once(fleet)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    for rnd in history:
        victims = killed[rnd["round"]]
        participants = {p["device"] for p in rnd["participants"]}
        assert rnd["outcome"] == "quorum", rnd
        assert rnd["accepted"] == len(rnd["selected"]) - len(victims) >= MIN_DEVICES, rnd
        assert rnd["dropped"] == victims, rnd  # seen through their Wills
        assert not participants & set(victims), rnd
    # a device restarted after round r is back by round r + 2 (round r + 1 opens at once,
    # with the devices online then) and trains in it
    for r, victims in killed.items():
        if r + 2 <= ROUNDS:
            again = {p["device"] for p in history[r + 1]["participants"]}
            assert set(victims) <= again, (r, victims, history[r + 1])

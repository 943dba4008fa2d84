"""Devices die mid-round, every round: their Last Will ends the wait for them, the round
closes with the rest long before its deadline, and the restarted devices take part again."""

from __future__ import annotations

import random
from functools import partial

from broker.mosquitto import MosquittoBroker
from tests.chaos.checks import assert_counted_once, opened
from tests.integration.fleet import Fleet, Watcher

DEVICES = 10
ROUNDS = 3
MIN_DEVICES = 5
TIMEOUT_S = 45
KILL_FRACTION = 0.3
# Every agent waits this long between training and sending: the window in which we kill.
# A round opens as soon as the last one closed, with the devices online then, so a device
# restarted after round r can only be back for round r + 2: the delay also makes round
# r + 1 outlast a restarted agent's start-up (5-10 s with ten agents on a busy 2-core box).
DELAY_S = 10


def test_rounds_close_early_without_the_devices_killed_in_them(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    rounds = Watcher(mosquitto, fleet.topics.round())
    try:
        fleet.aggregator(rounds=ROUNDS, devices_per_round=DEVICES, over_select=0,
                         min_devices=MIN_DEVICES, round_timeout_s=TIMEOUT_S)  # fmt: skip
        for i in range(DEVICES):
            fleet.agent(i, DEVICES, extra_delay_s=DELAY_S)
        rng = random.Random(7)
        killed: dict[int, list[str]] = {}
        for r in range(1, ROUNDS + 1):
            ann = fleet.wait_for(f"round {r} to open", partial(opened, rounds, r), timeout=60)
            back = set(killed.get(r - 2, []))
            assert back <= set(ann.selected), (
                f"devices restarted after round {r - 2} were not selected for round {r}: "
                f"{sorted(back - set(ann.selected))} (start-up slower than a round?)"
            )
            # 30% of the round's devices, rounded down (later rounds are as large as the
            # fleet online then), sparing those restarted after the last two culls so they
            # train again
            count = int(KILL_FRACTION * len(ann.selected))
            spared = back | set(killed.get(r - 1, []))
            victims = sorted(rng.sample(sorted(set(ann.selected) - spared), count))
            assert len(ann.selected) - len(victims) >= MIN_DEVICES, ann
            for device in victims:
                fleet.kill(f"agent-{device[1:]}")  # SIGKILL: no offline message, the Will fires
            killed[r] = victims
            fleet.wait_rounds(r, timeout=TIMEOUT_S + 10)
            for device in victims:  # back with the same id and state directory
                fleet.agent(int(device[1:]), DEVICES, extra_delay_s=DELAY_S)
        assert fleet.procs["aggregator"].wait(timeout=30) == 0
    finally:
        rounds.close()

    history = assert_counted_once(fleet)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    for rnd in history:
        victims = killed[rnd["round"]]
        participants = {p["device"] for p in rnd["participants"]}
        assert rnd["outcome"] == "quorum", rnd
        assert rnd["accepted"] == len(rnd["selected"]) - len(victims) >= MIN_DEVICES, rnd
        assert rnd["dropped"] == victims, rnd  # seen through their Wills
        assert not participants & set(victims), rnd
        # nobody else was awaited, so the Wills ended the round, not its deadline
        assert rnd["wall_s"] < TIMEOUT_S - 15, rnd
    # a device restarted after round r is back by round r + 2 (round r + 1 opens at once,
    # with the devices online then) and trains in it
    for r, victims in killed.items():
        if r + 2 <= ROUNDS:
            again = {p["device"] for p in history[r + 1]["participants"]}
            assert set(victims) <= again, (r, victims, history[r + 1])

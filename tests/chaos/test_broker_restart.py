"""The broker goes away mid-round and comes back: the fleet reconnects by itself and
finishes its rounds, with every accepted update counted exactly once."""

from __future__ import annotations

import time

import pytest

from broker.mosquitto import MosquittoBroker
from fedmq.wire import decode_manifest, decode_round
from tests.chaos.checks import assert_counted_once, opened
from tests.integration.fleet import Fleet, Watcher

DEVICES = 4
ROUNDS = 4
DOWN_S = 1.5  # the broker stays away this long: agents finish training and publish meanwhile


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_fleet_survives_a_broker_restart_mid_round(
    fleet: Fleet, mosquitto: MosquittoBroker, how: str
) -> None:
    # target = quorum = every device: a round can only close with all four updates
    fleet.aggregator(rounds=ROUNDS, devices_per_round=DEVICES, min_devices=DEVICES,
                     round_timeout_s=60)  # fmt: skip
    for i in range(DEVICES):
        # staggered: when round 2 opens, some updates arrive before the outage, some
        # are published into it (paho queues them; the outbox resends them)
        fleet.agent(i, DEVICES, extra_delay_s=0.6 * i)
    fleet.wait_log("aggregator", "round 2 open", timeout=60)

    if how == "sigterm":
        # Mosquitto saves its database on SIGTERM; on the way down it also publishes the
        # Will of every client still connected (retained "offline" for each device)
        mosquitto.stop()
    else:
        mosquitto.kill()  # up to a second of retained messages and sessions is lost
    assert not mosquitto.running
    time.sleep(DOWN_S)
    mosquitto.start()  # same port, same data directory

    history = fleet.wait_rounds(ROUNDS, timeout=90)
    assert fleet.procs["aggregator"].wait(timeout=30) == 0
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    summary = [(r["round"], r["outcome"], r["accepted"], r["dropped"]) for r in history]
    # (round, outcome, accepted, dropped): a device that is only reconnecting is not gone
    assert all(r["outcome"] in ("complete", "quorum") for r in history), summary
    assert all(r["accepted"] == DEVICES and not r["dropped"] for r in history), summary
    assert_counted_once(fleet)

    # every process saw the connection go and came back on its own
    agg = fleet.log_text("aggregator")
    assert agg.index("broker connection lost") < agg.rindex("broker connection up")
    for i in range(DEVICES):
        log = fleet.log_text(f"agent-{i}")
        assert "broker connection lost" in log, log
        assert log.index("broker connection lost") < log.rindex("connected (session present")
    # and every update a device sent was answered, so nothing is left to resend
    fleet.wait_for("empty outboxes", lambda: not any(fleet.outbox(i) for i in range(DEVICES)),
                   timeout=20)  # fmt: skip


def test_a_broker_crash_does_not_leave_a_stale_model_or_round_announced(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    # Mosquitto writes retained messages to disk once a second, so a crash right after the
    # aggregator announced version 1 and round 2 brings back version 0 and round 1, while
    # the sessions (older) survive; what a device (re)connecting then reads must still be
    # what the aggregator holds
    live = Watcher(mosquitto, fleet.topics.round())
    try:
        fleet.aggregator(rounds=2, devices_per_round=3, min_devices=3, round_timeout_s=60)
        for i in range(3):
            fleet.agent(i, 3, extra_delay_s=8)  # round 2 stays open well past the restart
        fleet.wait_log("aggregator", "round 1 open", timeout=60)
        deadline = time.monotonic() + 60
        while opened(live, 2) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert opened(live, 2) is not None, fleet.logs()
        mosquitto.kill()  # within milliseconds of the announcement: before an autosave
    finally:
        live.close()
    mosquitto.start()

    manifests = Watcher(mosquitto, fleet.topics.global_manifest())
    rounds = Watcher(mosquitto, fleet.topics.round())
    try:

        def announced() -> tuple[int, int, str] | None:
            ms = [decode_manifest(p) for _, p in list(manifests.messages) if p]
            rs = [decode_round(p) for _, p in list(rounds.messages) if p]
            return (ms[-1].version, rs[-1].round_id, rs[-1].state) if ms and rs else None

        # the aggregator is back within its first reconnect delay (1-2 s), and round 2
        # cannot close before the agents' 8 s delay is over
        deadline = time.monotonic() + 6
        while announced() != (1, 2, "open") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert announced() == (1, 2, "open"), (
            f"6 s after the restart the broker announces (version, round, state) "
            f"{announced()}; the aggregator holds (1, 2, 'open')\n{fleet.logs()}"
        )
    finally:
        manifests.close()
        rounds.close()
    history = fleet.wait_rounds(2, timeout=60)
    assert [r["outcome"] for r in history] == ["complete", "complete"], history
    assert_counted_once(fleet)

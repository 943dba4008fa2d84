"""What the chaos tests read from a fleet: the rounds it announces, and whether any
accepted update was counted twice."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from fedmq.wire import RoundAnnouncement, decode_round
from tests.integration.fleet import Fleet, Watcher

ACCEPTED = re.compile(r"accepted update (\S+) from (\S+) for round (\d+)")


def opened(watcher: Watcher, round_id: int) -> RoundAnnouncement | None:
    """The announcement of round_id as open among what a Watcher of the round topic saw."""
    for _, payload in list(watcher.messages):
        if payload:
            r = decode_round(payload)
            if r.round_id == round_id and r.state == "open":
                return r
    return None


def assert_counted_once(fleet: Fleet) -> list[dict[str, Any]]:
    """Check history, state.json and the aggregator's log agree that every accepted update
    was counted exactly once; return the history."""
    history = fleet.history()
    counted: dict[str, int] = fleet.state()["counted_ids"]
    for rnd in history:
        devices = [p["device"] for p in rnd["participants"]]
        assert len(devices) == len(set(devices)) == rnd["accepted"], rnd
        assert set(devices) <= set(rnd["selected"]), rnd
    assert sum(r["accepted"] for r in history) == len(counted), (history, counted)
    per_round = Counter(counted.values())
    assert per_round == Counter({r["round"]: r["accepted"] for r in history if r["accepted"]})
    # the log line is written once per update added to a running sum
    logged = ACCEPTED.findall(fleet.log_text("aggregator"))
    ids = Counter(update_id for update_id, _, _ in logged)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    slots = Counter((device, int(r)) for _, device, r in logged)
    assert all(n == 1 for n in slots.values()), [s for s, n in slots.items() if n > 1]
    assert set(ids) == set(counted)
    return history

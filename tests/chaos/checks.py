"""What the chaos tests read from a fleet: the rounds it announces, and whether any
accepted update was lost or counted twice (from the aggregator's ledger, not its log)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedmq.wire import RoundAnnouncement, decode_round, decode_state
from tests.integration.fleet import Fleet, Watcher


def opened(watcher: Watcher, round_id: int) -> RoundAnnouncement | None:
    """The announcement of round_id as open among what a Watcher of the round topic saw."""
    for _, payload in list(watcher.messages):
        if payload:
            r = decode_round(payload)
            if r.round_id == round_id and r.state == "open":
                return r
    return None


def online(states: Watcher) -> set[str]:
    """Devices whose newest state, among what a Watcher of the state topics saw, is not
    offline (online or training)."""
    newest: dict[str, str] = {}
    for _, payload in list(states.messages):
        if payload:
            s = decode_state(payload)
            newest[s.device] = s.status
    return {d for d, status in newest.items() if status != "offline"}


def assert_counted_once(fleet: Fleet, *, sync: bool = True) -> list[dict[str, Any]]:
    """History and the ledger agree that every accepted update was counted exactly once,
    in the round (or buffer) the ledger names; return the history.

    In sync mode a device contributes at most once per round; in async mode a device may
    be in one buffer more than once."""
    history = fleet.history()
    accepted = [v for v in fleet.ledger() if v["verdict"] == "accepted"]
    ids = Counter(v["update_id"] for v in accepted)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    closed = {r["round"] for r in history}
    per_round = Counter(v["round"] for v in accepted if v["round"] in closed)
    assert per_round == Counter({r["round"]: r["accepted"] for r in history if r["accepted"]})
    for rnd in history:
        devices = [p["device"] for p in rnd["participants"]]
        assert len(devices) == rnd["accepted"], rnd
        assert Counter(devices) == Counter(v["device"] for v in accepted
                                           if v["round"] == rnd["round"]), rnd  # fmt: skip
        if sync:
            assert len(set(devices)) == len(devices), rnd
            assert set(devices) <= set(rnd["selected"]), rnd
    return history

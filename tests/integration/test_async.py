"""Asynchronous mode (FedBuff) with a real fleet: stragglers are folded in, discounted."""

from __future__ import annotations

from tests.integration.fleet import Fleet


def test_async_mode_folds_stragglers_with_staleness(fleet: Fleet) -> None:
    fleet.aggregator(mode="async", buffer_size=3, rounds=8, max_staleness=20,
                     staleness_exponent=0.5, epochs=2, lr=0.1)  # fmt: skip
    for i in range(3):
        fleet.agent(i, 4)
    fleet.agent(3, 4, extra_delay_s=5)  # a straggler: versions move on while it trains
    rounds = fleet.wait_rounds(8, timeout=180)
    assert fleet.procs["aggregator"].wait(timeout=30) == 0
    assert all(r["outcome"] == "buffered" and r["accepted"] == 3 for r in rounds)
    assert [r["version"] for r in rounds] == list(range(1, 9))
    parts = [p for r in rounds for p in r["participants"]]
    slow = [p for p in parts if p["device"] == "d3"]
    assert slow and max(p["staleness"] for p in slow) >= 1  # folded in although stale
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    counted = fleet.counted()
    assert len(counted) == len(set(counted)) == sum(r["accepted"] for r in rounds) == 24

"""The status document's tail of rounds and the aggregator's Will (pure)."""

from __future__ import annotations

import json
import math

from aggregator.status import RECENT_ROUNDS, RecentRounds, offline_status


def test_recent_rounds_keep_the_last_ones_and_a_later_record_of_a_round_wins() -> None:
    tail = RecentRounds()
    tail.extend({"round": i, "version": i, "outcome": "complete", "accuracy": i / 100,
                 "loss": 1 - i / 100} for i in range(1, 41))  # fmt: skip
    points = tail.as_list()
    assert len(points) == RECENT_ROUNDS and points[0]["round"] == 11 and points[-1]["round"] == 40
    tail.add({"round": 40, "outcome": "abandoned", "reason": "quorum_missed"})
    assert tail.as_list()[-1] == {"round": 40, "version": None, "outcome": "abandoned",
                                  "accuracy": None, "loss": None}  # fmt: skip
    # records a sparkline cannot use are skipped; non-finite numbers become null
    tail.add({"outcome": "complete"})
    tail.add({"round": "x"})
    tail.add({"round": 41, "accuracy": math.nan, "loss": math.inf})
    assert tail.as_list()[-1]["round"] == 41 and tail.as_list()[-1]["accuracy"] is None
    json.dumps(tail.as_list(), allow_nan=False)  # valid JSON for any reader


def test_the_will_is_readable_json_that_marks_the_aggregator_offline() -> None:
    will = offline_status(job="j", task="digits-mlp")
    doc = json.loads(will)
    assert doc["aggregator"] == "offline" and doc["phase"] == "offline" and doc["job"] == "j"
    assert doc["updated_at"] is None
    # every run of the job sets the same Will: a restarted aggregator knows it as its own
    assert offline_status(job="j", task="digits-mlp") == will

"""The ledger: every verdict, the ids already counted, the open round's stats, counters.

It is the service's bookkeeping and the tests' oracle. Verdicts are staged in the journal
(`verdicts` table, read back with `aggregator.journal.read_ledger`) and become durable
with the accepted updates they describe, in one group commit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aggregator.journal import Accepted, Journal

VERDICTS = ("accepted", "duplicate", "late", "rejected")


class Ledger:
    """Counted ids, counters and the open round's stats, kept with the journal."""

    def __init__(self, *, journal: Journal, counters: dict[str, int] | None = None) -> None:
        self.journal = journal
        self.counters: Counter[str] = Counter(counters or {})
        self.counted: dict[str, int] = journal.counted_ids()  # update id -> round, ordered
        self.bytes_up = 0
        self.bytes_down = 0
        self.participants: list[dict[str, Any]] = []
        self.round_verdicts: Counter[str] = Counter()  # the open round's non-accept verdicts
        # (verdict, reason code) of every verdict given since the start, for the metrics
        self.verdicts: Counter[tuple[str, str]] = Counter()

    def counted_in(self, update_id: str) -> int | None:
        """The round an update was already folded into, or None."""
        return self.counted.get(update_id)

    def begin_round(self) -> None:
        """Start the stats of a new open round."""
        self.bytes_up, self.bytes_down, self.participants = 0, 0, []
        self.round_verdicts = Counter()

    def accept(self, a: Accepted, *, replayed: bool = False) -> None:
        """Book an update folded into the sum (staged in the journal unless replayed)."""
        if not replayed:
            self.journal.stage_accept(a)
            self.counters["accepted"] += 1
            self.verdicts["accepted", ""] += 1
        self.counted[a.update_id] = a.round_id
        while len(self.counted) > self.journal.keep_ids:
            self.counted.pop(next(iter(self.counted)))
        self.bytes_up += a.wire_bytes
        self.bytes_down += a.fetched_bytes
        self.participants.append(a.record)

    def verdict(self, *, update_id: str, device: str, round_id: int, verdict: str,
                reason: str = "", counter: str = "") -> None:  # fmt: skip
        """Book a verdict that does not touch the sum: duplicate, late or rejected."""
        assert verdict in VERDICTS and verdict != "accepted", verdict
        self.counters[counter or verdict] += 1
        self.round_verdicts[counter or verdict] += 1
        self.verdicts[verdict, reason.split(":", 1)[0] if verdict == "rejected" else ""] += 1
        self.journal.stage_verdict(update_id, device, round_id, verdict, reason)

    def round_stats(self) -> dict[str, Any]:
        """bytes_up, bytes_down, participants and the counts of updates not accepted (by
        verdict or reason; since the aggregator's last start) of the open round, for its
        history record."""
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "participants": list(self.participants),
                "not_accepted": dict(sorted(self.round_verdicts.items()))}  # fmt: skip


def verdict_summary(record: dict[str, Any]) -> str:
    """What a round's log line adds about updates that did not count, from its history
    record: '' when every selected device delivered and nothing was refused."""
    parts = []
    if record.get("dropped"):
        parts.append(f"{len(record['dropped'])} dropped")
    refused = record.get("not_accepted") or {}
    if refused:
        parts.append("not accepted: " + ", ".join(f"{k} {n}" for k, n in refused.items()))
    return f" ({'; '.join(parts)})" if parts else ""

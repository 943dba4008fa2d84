"""The aggregator's own retained topics (global manifest, round, status), watched: its own
echo is told apart from anything someone else publishes there, which is counted and
overwritten with what the aggregator last published (pure: no socket, no clock)."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

KEEP = 64  # own publications per topic whose echo has not come back yet
RESTORE_EVERY_S = 1.0  # at most one restore per topic this often: two writers never spin


@dataclass(frozen=True)
class Intrusion:
    """A message on one of the aggregator's topics that it did not publish."""

    topic: str
    counter: str  # "foreign_downlink" | "replayed_downlink" | "" (a leftover: not counted)
    why: str


@dataclass
class _Topic:
    # digests of its publications whose echo is still to come, oldest first: the broker
    # delivers one client's messages in order, and each echo once, so a copy of an older
    # publication that arrives after its echo (a replay) is not taken for one
    pending: deque[bytes] = field(default_factory=lambda: deque(maxlen=KEEP))
    current: bytes | None = None  # what this aggregator last published there
    will: bytes | None = None  # its own Last Will there: the broker publishes it, not a peer
    restore_at: float | None = None
    restored_at: float = float("-inf")


class OwnTopics:
    """Tells the aggregator's own messages from others' and schedules restores."""

    def __init__(self, *, topics: list[str], restore_every_s: float = RESTORE_EVERY_S) -> None:
        self._t = {t: _Topic() for t in topics}
        self.restore_every_s = restore_every_s

    def published(self, topic: str, payload: bytes) -> None:
        """The aggregator published payload (retained) on topic."""
        t = self._t[topic]
        t.pending.append(hashlib.sha256(payload).digest())
        t.current = payload
        t.restore_at = None  # what it just published is what the broker now holds

    def will(self, topic: str, payload: bytes) -> None:
        """The aggregator's Last Will is payload on topic: when it arrives (the broker
        published it after a lost connection), it is the aggregator's own word, not an
        intrusion; its live message is published there again."""
        self._t[topic].will = payload

    def current(self, topic: str) -> bytes | None:
        """What the aggregator last published on topic (None: nothing yet)."""
        return self._t[topic].current

    def observe(
        self, topic: str, payload: bytes, *, retained: bool, signed_by_us: bool | None, now: float
    ) -> Intrusion | None:
        """A message arrived on topic; None when it is the aggregator's own echo.

        retained: delivered because of the subscription (what the broker held when the
        aggregator (re)subscribed), not published live. signed_by_us: whether it carries a
        valid signature by the aggregator's key (None: the topic carries no signatures)."""
        t = self._t[topic]
        digest = hashlib.sha256(payload).digest()
        if retained and (digest in t.pending or payload == t.current):
            # what the broker held on (re)subscribing, identical to one of its publications
            # (a restart announces its resumed round exactly as before): not an echo, so the
            # echoes still to come stay expected
            return None
        if digest in t.pending:  # its echo; echoes before it that never came are forgotten
            while t.pending.popleft() != digest:
                pass
            return None
        if payload == t.current:
            return None  # what it published last (redelivered on a resubscription): no harm
        if payload == t.will:
            # its own Will, kept retained or queued in its session while it was away (or a
            # copy of it: the same words): not counted, overwritten with what is true now
            if t.current is not None and t.restore_at is None:
                t.restore_at = max(now, t.restored_at + self.restore_every_s)
            return None
        if t.current is not None and t.restore_at is None:
            t.restore_at = max(now, t.restored_at + self.restore_every_s)
        if retained and signed_by_us is not False:
            # the broker's leftover of an earlier run (or of an older broker autosave)
            return Intrusion(topic, "", "a leftover retained message of an earlier publication")
        if signed_by_us:
            return Intrusion(topic, "replayed_downlink", "an older message signed by this "
                                                         "aggregator, published again")  # fmt: skip
        return Intrusion(topic, "foreign_downlink", "a message this aggregator did not publish "
                                                    "(no valid signature by its key)")  # fmt: skip

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """(topic, payload) to publish again now, retained."""
        out = []
        for topic, t in self._t.items():
            if t.restore_at is not None and now >= t.restore_at and t.current is not None:
                out.append((topic, t.current))
                t.restore_at, t.restored_at = None, now
        return out

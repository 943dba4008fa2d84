"""Updates on their way to the aggregator: on disk until acknowledged, sent again after a
reconnect or when the ack is overdue (update ids make resends idempotent), and held back
while the hold_dir test hook says so."""

from __future__ import annotations

import logging
from typing import Any

from edge_agent.hold import UpdateHold
from edge_agent.outbox import Outbox
from fedmq.chunks import encode_chunks
from fedmq.link import Link
from fedmq.wire import Ack

# an update with no ack after this long is sent again (the ack, or the aggregator's copy,
# may have been lost in a crash)
ACK_TIMEOUT_S = 30.0


class Uplink:
    """Sends a device's updates on its update topic and keeps them until acknowledged."""

    def __init__(
        self,
        *,
        link: Link,
        topic: str,
        outbox: Outbox,
        hold: UpdateHold | None,
        log: logging.LoggerAdapter[Any],
    ) -> None:
        self.link = link
        self.topic = topic
        self.outbox = outbox
        self.hold = hold
        self.log = log
        self._sent_at: dict[str, float] = {}

    def keep(self, update_id: str, payload: bytes) -> None:
        """Put a new update in the outbox (before sending it: it survives a crash)."""
        self.outbox.put(update_id, payload)

    def send_new(self, update_id: str, round_id: int, payload: bytes, *, now: float) -> bool:
        """Send a kept update; False when the hold_dir hook holds it back instead."""
        if self.hold is not None:
            self.hold.hold(update_id, round_id)
            return False
        self._send(update_id, payload, now=now)
        return True

    def on_ack(self, ack: Ack) -> bool:
        """Forget an acknowledged update; False if it was not waiting for one."""
        self._sent_at.pop(ack.update_id, None)
        return self.outbox.remove(ack.update_id)

    def resend_all(self, *, now: float) -> None:
        """After a (re)connect: send every unacknowledged update that is not held."""
        for update_id, payload in self.outbox.pending():
            if not (self.hold and update_id in self.hold.held):
                self.log.info("resending unacknowledged update %s", update_id)
                self._send(update_id, payload, now=now)

    def tick(self, now: float) -> None:
        """Send released updates, and again those whose ack is overdue."""
        released = self.hold.release() if self.hold else set()
        overdue = {uid for uid, at in self._sent_at.items() if now - at > ACK_TIMEOUT_S}
        if not released and not (overdue and self.link.connected):
            return
        pending = dict(self.outbox.pending())
        for update_id in sorted(released | overdue if self.link.connected else released):
            if update_id not in pending:
                self._sent_at.pop(update_id, None)
                continue
            if update_id in released:
                self.log.info("released held update %s; sending it", update_id)
            else:
                self.log.warning("no ack for update %s after %.0fs; sending it again",
                                 update_id, ACK_TIMEOUT_S)  # fmt: skip
            self._send(update_id, pending[update_id], now=now)

    def _send(self, update_id: str, payload: bytes, *, now: float) -> None:
        self._sent_at[update_id] = now
        for chunk in encode_chunks(payload, update_id, self.link.max_message_bytes):
            self.link.publish(self.topic, chunk, qos=1)

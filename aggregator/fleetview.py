"""The fleet mirror: one readable, retained JSON document per device of the job, on
`<p>/<job>/fleet/<device>`, so that stock MQTT tools (mosquitto_sub) and `fedmq status
--devices` show the fleet without decoding msgpack.

Pure bookkeeping: the service reports what it saw (a device's state, bytes on its update
topic, the verdict on one of its updates) with `now`, and asks for the documents that
changed (`due`). Bounded by the device table: only devices in it have a record, and a
device that leaves it gets its retained mirror cleared (an empty retained payload).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fedmq.topics import Topics
from fedmq.wire import Ack, DeviceState

MIRROR_EVERY_S = 1.0  # at most one batch of changed documents this often
MAX_REASON_CHARS = 512  # a verdict's reason as mirrored (acks carry at most this much)


@dataclass
class _Device:
    state: DeviceState
    last_seen: float
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    bytes_up: int = 0
    last_verdict: str = ""
    last_reason: str = ""
    last_round: int | None = None
    last_verdict_at: float | None = None
    published: bytes = field(default=b"", repr=False)  # the document last handed out


class FleetView:
    """Per-device records for the mirror, kept only for devices in the device table."""

    def __init__(self, *, topics: Topics, every_s: float = MIRROR_EVERY_S) -> None:
        self.topics = topics
        self.every_s = every_s
        self._devices: dict[str, _Device] = {}
        self._dirty: set[str] = set()
        self._cleared: set[str] = set()  # left the table: their retained mirror is to go
        self._due_at = float("-inf")

    def __len__(self) -> int:
        return len(self._devices)

    def observe(self, device: str, state: DeviceState, table: Mapping[str, Any],
                now: float) -> None:  # fmt: skip
        """A state arrived from device; table is the device table after it was taken in."""
        if device in table:
            d = self._devices.get(device)
            if d is None:
                self._devices[device] = _Device(state=state, last_seen=now)
                self._cleared.discard(device)
            else:
                d.state, d.last_seen = state, now
            self._dirty.add(device)
        elif device in self._devices:
            self._forget(device)
        if len(self._devices) > len(table):  # someone gave way to a new device
            for gone in [d for d in self._devices if d not in table]:
                self._forget(gone)

    def sent(self, device: str, nbytes: int, now: float) -> None:
        """device published nbytes on its update topic."""
        d = self._devices.get(device)
        if d is not None:
            d.bytes_up += nbytes
            d.last_seen = now
            self._dirty.add(device)

    def verdict(self, device: str, ack: Ack, now: float) -> None:
        """The aggregator answered one of device's updates."""
        d = self._devices.get(device)
        if d is None:
            return
        status = ack.status
        if status == "accepted" and ack.reason.startswith("duplicate"):
            status = "duplicate"
            d.duplicates += 1
        elif status == "accepted":
            d.accepted += 1
        elif status == "late":
            d.late += 1
        else:
            d.rejected += 1
        d.last_verdict, d.last_reason = status, ack.reason[:MAX_REASON_CHARS]
        d.last_round = ack.round_id if ack.round_id >= 0 else None
        d.last_verdict_at = now
        self._dirty.add(device)

    def refused(self, device: str, reason: str, now: float) -> None:
        """A message from device was refused without an answer (e.g. an unreadable chunk)."""
        d = self._devices.get(device)
        if d is not None:
            d.rejected += 1
            d.last_verdict, d.last_reason = "rejected", reason[:MAX_REASON_CHARS]
            d.last_round, d.last_verdict_at = None, now
            self._dirty.add(device)

    def republish(self) -> None:
        """Hand out every document again at the next `due` (after a reconnect: a restarted
        broker may have lost them)."""
        for d in self._devices.values():
            d.published = b""
        self._dirty.update(self._devices)

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """(topic, payload) to publish retained now: documents that changed, b"" for
        devices that left the table; at most once every `every_s`."""
        if now < self._due_at or not (self._dirty or self._cleared):
            return []
        self._due_at = now + self.every_s
        out = [(self.topics.fleet_device(dev), b"") for dev in sorted(self._cleared)]
        self._cleared.clear()
        for dev in sorted(self._dirty):
            d = self._devices.get(dev)
            if d is None:
                continue
            body = json.dumps(mirror_document(dev, d), separators=(",", ":")).encode()
            if body != d.published:
                d.published = body
                out.append((self.topics.fleet_device(dev), body))
        self._dirty.clear()
        return out

    def document(self, device: str) -> dict[str, Any] | None:
        """The mirror document of device as it stands (None: not in the table)."""
        d = self._devices.get(device)
        return None if d is None else mirror_document(device, d)

    def _forget(self, device: str) -> None:
        self._devices.pop(device, None)
        self._dirty.discard(device)
        self._cleared.add(device)


def mirror_document(device: str, d: _Device) -> dict[str, Any]:
    """The JSON document of one device (docs/protocol.md section 4.10)."""
    s = d.state
    return {
        "device": device,
        "job": s.job,
        "class": s.profile,
        "status": s.status,
        "trains": s.trains,
        "model_version": s.model_version,
        "agent_version": s.agent_version,
        "state_reason": s.reason,
        "not_ready": "" if s.ready else s.not_ready or "not ready",  # its gates (readiness)
        "last_seen": round(d.last_seen, 3),
        "last_seen_iso": _iso(d.last_seen),
        "last_verdict": d.last_verdict,
        "last_reason": d.last_reason,
        "last_round": d.last_round,
        "last_verdict_at": None if d.last_verdict_at is None else round(d.last_verdict_at, 3),
        "accepted": d.accepted,
        "duplicates": d.duplicates,
        "late": d.late,
        "rejected": d.rejected,
        "bytes_up": d.bytes_up,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")

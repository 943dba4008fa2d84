"""What an operator's view knows about one job, fed by the messages it reads: the
aggregator's status (or its Will), the fleet mirror, the devices' own states and the
round announcement. Pure: no socket, no clock (`now` comes in), no terminal.

Every byte comes from the broker and is hostile (a broker without ACLs lets anyone write
these topics): payloads are size-capped before they are parsed, every field is checked
for its type and range, text is stripped of control characters (no terminal escapes reach
the screen) and shortened, and every table is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fedmq.errors import ProtocolError
from fedmq.topics import Topics
from fedmq.wire import decode_round, decode_state

MAX_STATUS_BYTES = 512 * 1024  # a status with 1 000 dropped ids and its tail is ~80 KiB
MAX_MIRROR_BYTES = 16 * 1024  # one device's mirror document is well under 2 KiB
MAX_DEVICES = 10_000  # rows kept; more are counted in `overflow`, not shown
MAX_TEXT = 160  # characters of any one text field kept
MAX_COUNTERS = 256
MAX_POINTS = 120  # sparkline points kept
FLAP_WINDOW_S = 60.0
FLAP_CHANGES = 3  # online/offline changes within the window that make a device "flapping"
SPIKE_WINDOW_S = 60.0
SPIKE_REJECTIONS = 5  # rejections within the window that raise an alert
DEVICE_STATUSES = ("online", "training", "offline")


def clean_text(value: Any, limit: int = MAX_TEXT) -> str:
    """A peer's string as it may appear on a terminal: printable characters only, short."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isprintable() else "?" for c in value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ago(ts: float | None, now: float) -> str:
    """A past moment for people: 'just now', '12 s ago', '3 min ago', '2 h ago', '4 d ago'."""
    if ts is None:
        return "never"
    s = now - ts
    if s < 1.5:
        return "just now" if s > -5 else "in the future (clocks differ)"
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def clock(ts: float | None) -> str:
    """A moment as a UTC time of day ('08:53:01 UTC'), with the date when not today."""
    if ts is None:
        return "-"
    try:
        t = datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "-"
    today = datetime.now(timezone.utc).date()
    return t.strftime("%H:%M:%S UTC" if t.date() == today else "%Y-%m-%d %H:%M:%S UTC")


def human_bytes(n: int) -> str:
    """A byte count for people: '950 B', '12.3 kB', '4.1 MB'."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _int(value: Any, default: int | None = 0) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    return default


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return v if math.isfinite(v) else None
    return None


def _json_object(payload: bytes, cap: int) -> dict[str, Any] | None:
    """payload as a JSON object, or None (too big, not UTF-8 JSON, not an object)."""
    if len(payload) > cap:
        return None
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(frozen=True)
class RoundInfo:
    """The open round as the status says it (counts) and the round topic lists it (ids)."""

    round_id: int
    selected: int
    received: int
    target: int
    dropped: tuple[str, ...]
    deadline_in_s: float | None


@dataclass(frozen=True)
class Federated:
    """The status's `federated`: the devices' evaluation of one version (docs/devices.md)."""

    version: int
    accuracy: float
    loss: float | None
    devices: int
    examples: int
    p10: float | None
    p90: float | None


def _federated(doc: Any) -> Federated | None:
    if not isinstance(doc, dict):
        return None
    version, accuracy = _int(doc.get("version"), None), _num(doc.get("accuracy"))
    if version is None or accuracy is None:
        return None
    return Federated(version=version, accuracy=accuracy, loss=_num(doc.get("loss")),
                     devices=_int(doc.get("devices")) or 0,
                     examples=_int(doc.get("examples")) or 0,
                     p10=_num(doc.get("accuracy_p10")), p90=_num(doc.get("accuracy_p90")))


@dataclass(frozen=True)
class Status:
    """The aggregator's status document, checked field by field."""

    job: str
    task: str
    mode: str
    phase: str
    aggregator: str  # "online" | "offline" | "" (an aggregator before the field existed)
    done_reason: str
    model_version: int | None
    accuracy: float | None
    loss: float | None
    federated: Federated | None  # the devices' evaluation of the newest version they report
    rounds_closed: int
    round: RoundInfo | None
    online: int
    trainers_online: int
    known: int
    counters: dict[str, int]
    recent: tuple[tuple[int, float | None, float | None], ...]  # (round, accuracy, loss)
    updated_at: float | None
    offline_reason: str
    codec: str
    # per device class: (class, online, ready, training, {not-ready reason kind: count})
    classes: tuple[tuple[str, int, int, int, dict[str, int]], ...] = ()

    @property
    def rejected(self) -> int:
        """Every rejection the aggregator counted, whatever the reason."""
        return sum(v for k, v in self.counters.items() if k.startswith("rejected"))


def parse_status(payload: bytes) -> Status | None:
    """The status (or the aggregator's Will) from its topic; None when it is not one."""
    doc = _json_object(payload, MAX_STATUS_BYTES)
    if doc is None:
        return None
    r = doc.get("round")
    rnd = None
    if isinstance(r, dict) and _int(r.get("id"), None) is not None:
        dropped = r.get("dropped")
        rnd = RoundInfo(
            round_id=_int(r.get("id")) or 0, selected=_int(r.get("selected")) or 0,
            received=_int(r.get("received")) or 0, target=_int(r.get("target")) or 0,
            dropped=tuple(clean_text(d, 64) for d in dropped[:1000] if isinstance(d, str))
            if isinstance(dropped, list) else (),
            deadline_in_s=_num(r.get("deadline_in_s")),
        )  # fmt: skip
    devices = doc.get("devices") if isinstance(doc.get("devices"), dict) else {}
    assert isinstance(devices, dict)
    counters: dict[str, int] = {}
    raw = doc.get("counters")
    if isinstance(raw, dict):
        for k, v in list(raw.items())[:MAX_COUNTERS]:
            n = _int(v, None)
            if isinstance(k, str) and n is not None:
                counters[clean_text(k, 64)] = n
    recent = []
    tail = doc.get("recent_rounds")
    if isinstance(tail, list):
        for p in tail[-MAX_POINTS:]:
            if isinstance(p, dict) and _int(p.get("round"), None) is not None:
                # no central test set: the devices' evaluation of the round's base version
                fed = _federated(p.get("federated"))
                central = _num(p.get("accuracy"))
                recent.append((_int(p.get("round")) or 0,
                               central if central is not None or fed is None else fed.accuracy,
                               _num(p.get("loss")) if central is not None or fed is None
                               else fed.loss))  # fmt: skip
    codec = doc.get("codec")
    aggregator = clean_text(doc.get("aggregator"), 16)
    return Status(
        job=clean_text(doc.get("job"), 64), task=clean_text(doc.get("task"), 64),
        mode=clean_text(doc.get("mode"), 16), phase=clean_text(doc.get("phase"), 32),
        aggregator=aggregator if aggregator in ("online", "offline") else "",
        done_reason=clean_text(doc.get("done_reason")),
        model_version=_int(doc.get("model_version"), None),
        accuracy=_num(doc.get("accuracy")), loss=_num(doc.get("loss")),
        federated=_federated(doc.get("federated")),
        rounds_closed=_int(doc.get("rounds_closed")) or 0, round=rnd,
        online=_int(devices.get("online")) or 0,
        trainers_online=_int(devices.get("trainers_online")) or 0,
        known=_int(devices.get("known")) or 0, counters=counters, recent=tuple(recent),
        updated_at=_num(doc.get("updated_at")),
        offline_reason=clean_text(doc.get("offline_reason")),
        codec=clean_text(codec.get("updates"), 64) if isinstance(codec, dict) else "",
        classes=_classes(devices.get("classes")),
    )  # fmt: skip


MAX_CLASSES = 32


def _classes(raw: Any) -> tuple[tuple[str, int, int, int, dict[str, int]], ...]:
    """The status's fleet by class, checked entry by entry (bounded)."""
    if not isinstance(raw, dict):
        return ()
    out = []
    for name, c in list(raw.items())[:MAX_CLASSES]:
        if not isinstance(name, str) or not isinstance(c, dict):
            continue
        why = c.get("not_ready") if isinstance(c.get("not_ready"), dict) else {}
        assert isinstance(why, dict)
        reasons = {clean_text(k, 32): _int(v) or 0 for k, v in list(why.items())[:8]
                   if isinstance(k, str)}  # fmt: skip
        out.append((clean_text(name, 64), _int(c.get("online")) or 0, _int(c.get("ready")) or 0,
                    _int(c.get("training")) or 0, reasons))  # fmt: skip
    return tuple(out)


@dataclass
class Device:
    """One row of the device table."""

    id: str
    cls: str = ""
    status: str = ""
    trains: bool | None = None
    model_version: int | None = None
    last_seen: float | None = None
    last_verdict: str = ""
    last_reason: str = ""
    last_round: int | None = None
    accepted: int = 0
    rejected: int = 0
    late: int = 0
    duplicates: int = 0
    bytes_up: int = 0
    from_state: bool = False  # its own state was seen: that, not the mirror, says its status
    changes: deque[float] = field(default_factory=lambda: deque(maxlen=16))  # online<->offline

    def mirror(self) -> dict[str, Any]:
        """The row as a JSON-able dict (`fedmq status --json --devices`)."""
        return {"device": self.id, "class": self.cls, "status": self.status,
                "trains": self.trains, "model_version": self.model_version,
                "last_seen": self.last_seen, "last_verdict": self.last_verdict,
                "last_reason": self.last_reason, "last_round": self.last_round,
                "accepted": self.accepted, "rejected": self.rejected, "late": self.late,
                "duplicates": self.duplicates, "bytes_up": self.bytes_up}  # fmt: skip


@dataclass(frozen=True)
class Alert:
    level: str  # "error" | "warning"
    text: str


@dataclass(frozen=True)
class Progress:
    """One selected device's part in the open round."""

    device: str
    stage: str  # waiting | training | delivered | rejected | late | dropped | offline


class FleetState:
    """Everything the operator's views show, updated message by message."""

    def __init__(self, *, topics: Topics, max_devices: int = MAX_DEVICES) -> None:
        self.topics = topics
        self.max_devices = max_devices
        self.status: Status | None = None
        self.status_doc: dict[str, Any] | None = None  # as published, for --json
        self.status_at: float | None = None  # when it arrived
        self.offline_since: float | None = None  # seen going offline (live), if we saw it
        self.devices: dict[str, Device] = {}
        self.overflow = 0  # devices not kept: the table was full
        self.ignored = 0  # messages that were not what their topic says
        self.round_ids: tuple[str, ...] = ()  # selected ids of the announced round
        self.round_state = ""
        self.round_id: int | None = None
        self.points: dict[int, tuple[float | None, float | None]] = {}
        self._rejections: deque[tuple[float, int]] = deque(maxlen=512)

    # ------------------------------------------------------------ messages in

    def on_message(self, topic: str, payload: bytes, *, retained: bool, now: float) -> bool:
        """Take one message; True when it changed what the views show."""
        kind = self.topics.kind_of(topic)
        device = self.topics.device_of(topic)
        if kind == "status":
            return self._on_status(payload, retained=retained, now=now)
        if kind == "fleet" and device is not None:
            return self._on_mirror(device, payload)
        if kind == "state" and device is not None:
            return self._on_state(device, payload, retained=retained, now=now)
        if kind == "round":
            return self._on_round(payload)
        return False

    def _on_status(self, payload: bytes, *, retained: bool, now: float) -> bool:
        if not payload:
            self.status = self.status_doc = None
            return True
        status = parse_status(payload)
        if status is None:
            self.ignored += 1
            return False
        was_online = self.status is not None and self.status.aggregator != "offline"
        if status.aggregator == "offline":
            if not retained and (was_online or self.offline_since is None):
                self.offline_since = now  # seen live: the broker published the Will now
            if self.status is not None and status.updated_at is None:
                # a Will says only "offline": what the last live status said still stands
                status = dataclasses.replace(self.status, phase=status.phase, round=None,
                                             aggregator="offline",
                                             offline_reason=status.offline_reason)  # fmt: skip
        else:
            self.offline_since = None
        self.status, self.status_at = status, now
        self.status_doc = json.loads(payload)
        for rnd, acc, loss in status.recent:
            self.points[rnd] = (acc, loss)
        if not status.recent and status.model_version is not None and status.accuracy is not None:
            self.points[status.model_version] = (status.accuracy, status.loss)
        for old in sorted(self.points)[:-MAX_POINTS]:
            del self.points[old]
        self._rejections.append((now, status.rejected))
        return True

    def _row(self, device: str) -> Device | None:
        row = self.devices.get(device)
        if row is None:
            if len(self.devices) >= self.max_devices:
                self.overflow += 1
                return None
            row = self.devices[device] = Device(id=clean_text(device, 64))
        return row

    def _set_status(self, row: Device, status: str, now: float) -> None:
        if status not in DEVICE_STATUSES:
            return
        if row.status and (row.status == "offline") != (status == "offline"):
            row.changes.append(now)
        row.status = status

    def _on_mirror(self, device: str, payload: bytes) -> bool:
        if not payload:  # the aggregator forgot the device: it goes unless its state is here
            row = self.devices.get(device)
            if row is None or row.from_state:
                return False
            del self.devices[device]
            return True
        doc = _json_object(payload, MAX_MIRROR_BYTES)
        if doc is None or doc.get("device") != device:
            self.ignored += 1
            return False
        row = self._row(device)
        if row is None:
            return False
        if not row.from_state:  # the device's own state, when seen, says these
            row.cls = clean_text(doc.get("class"), 32)
            if doc.get("status") in DEVICE_STATUSES:
                row.status = str(doc["status"])
            trains = doc.get("trains")
            row.trains = trains if isinstance(trains, bool) else None
            row.model_version = _int(doc.get("model_version"), None)
        seen = _num(doc.get("last_seen"))
        if seen is not None and (row.last_seen is None or seen > row.last_seen):
            row.last_seen = seen
        row.last_verdict = clean_text(doc.get("last_verdict"), 16)
        row.last_reason = clean_text(doc.get("last_reason"))
        row.last_round = _int(doc.get("last_round"), None)
        for name in ("accepted", "rejected", "late", "duplicates", "bytes_up"):
            setattr(row, name, max(0, _int(doc.get(name)) or 0))
        return True

    def _on_state(self, device: str, payload: bytes, *, retained: bool, now: float) -> bool:
        if not payload:
            return False
        try:
            state = decode_state(payload)  # capped, checked (fedmq.wire)
        except ProtocolError:
            self.ignored += 1
            return False
        if state.device != device:
            self.ignored += 1
            return False
        if state.job != self.topics.job:  # another job's device, or one that moved on
            return self.devices.pop(device, None) is not None
        row = self._row(device)
        if row is None:
            return False
        row.from_state = True
        self._set_status(row, state.status, now)
        row.cls = clean_text(state.profile, 32)
        row.trains = state.trains
        if state.status != "offline" or row.model_version is None:
            row.model_version = state.model_version  # a Will's is the one held at its start
        if not retained:  # a retained state is old news: when, only the mirror says
            row.last_seen = now
        return True

    def _on_round(self, payload: bytes) -> bool:
        if not payload:
            self.round_ids, self.round_state, self.round_id = (), "", None
            return True
        try:
            r = decode_round(payload)  # capped, checked; display only: not verified
        except ProtocolError:
            self.ignored += 1
            return False
        if r.job != self.topics.job:
            self.ignored += 1
            return False
        self.round_ids = tuple(clean_text(d, 64) for d in r.selected)
        self.round_state, self.round_id = r.state, r.round_id
        return True

    # ------------------------------------------------------------ what the views show

    @property
    def aggregator_offline(self) -> bool:
        return self.status is not None and self.status.aggregator == "offline"

    def offline_at(self) -> float | None:
        """When the aggregator went offline, as far as anyone can tell: seen live, or the
        time of its last status (a clean stop); None when only its Will is known."""
        if not self.aggregator_offline:
            return None
        assert self.status is not None
        return self.offline_since or self.status.updated_at

    def progress(self) -> list[Progress]:
        """Each selected device's stage in the open round (empty when none is open)."""
        s = self.status
        if s is None or s.round is None:
            return []
        rid = s.round.round_id
        ids = self.round_ids if self.round_id == rid and self.round_state == "open" else ()
        dropped = set(s.round.dropped)
        out = []
        for device in sorted(ids):
            row = self.devices.get(device)
            if device in dropped:
                stage = "dropped"
            elif row is not None and row.last_round == rid and row.last_verdict:
                stage = {"accepted": "delivered", "duplicate": "delivered"}.get(
                    row.last_verdict, row.last_verdict)
            elif row is not None and row.status == "training":
                stage = "training"
            elif row is not None and row.status == "offline":
                stage = "offline"
            else:
                stage = "waiting"
            out.append(Progress(device, stage))
        return out

    def series(self) -> list[tuple[int, float | None, float | None]]:
        """(round, accuracy, loss) oldest first, for the sparklines."""
        return [(r, *self.points[r]) for r in sorted(self.points)]

    def flapping(self, now: float) -> list[tuple[str, int]]:
        """(device, online/offline changes in the window) for devices that flap."""
        out = []
        for d in self.devices.values():
            n = sum(1 for t in d.changes if now - t <= FLAP_WINDOW_S)
            if n >= FLAP_CHANGES:
                out.append((d.id, n))
        return sorted(out)

    def rejections_in_window(self, now: float) -> int:
        """Rejections the aggregator counted within the last window."""
        while self._rejections and now - self._rejections[0][0] > SPIKE_WINDOW_S:
            if len(self._rejections) == 1:
                break  # the newest sample stays: the baseline of what comes next
            self._rejections.popleft()
        if not self._rejections:
            return 0
        return max(0, self._rejections[-1][1] - self._rejections[0][1])

    def alerts(self, now: float) -> list[Alert]:
        """What needs a person's attention now, worst first."""
        out = []
        if self.status is None:
            out.append(Alert("warning", f"no status for job {self.topics.job!r} (yet)"))
        elif self.aggregator_offline:
            at = self.offline_at()
            if at is not None:
                out.append(Alert("error", f"aggregator offline since {clock(at)} "
                                          f"({ago(at, now)})"))  # fmt: skip
            else:
                out.append(Alert("error", "aggregator offline: its connection was lost "
                                          "(its Last Will); when is unknown"))  # fmt: skip
        for device, n in self.flapping(now):
            out.append(Alert("warning", f"device {device} flapping: {n} online/offline "
                                        f"changes in {FLAP_WINDOW_S:.0f} s"))  # fmt: skip
        spike = self.rejections_in_window(now)
        if spike >= SPIKE_REJECTIONS:
            out.append(Alert("warning", f"rejections spiking: {spike} in the last "
                                        f"{SPIKE_WINDOW_S:.0f} s"))  # fmt: skip
        if self.overflow:
            out.append(Alert("warning", f"{self.overflow} device messages not shown: more "
                                        f"than {self.max_devices} devices"))  # fmt: skip
        return out

    def table(self) -> list[Device]:
        """The device table, by id."""
        return [self.devices[d] for d in sorted(self.devices)]

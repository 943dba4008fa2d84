"""Whether this device may train now: its firmware profile's thermal and battery gates,
read from Linux sysfs where the files are present.

    <root>/sys/class/thermal/thermal_zone*/temp        millidegrees C; the hottest counts
    <root>/sys/class/power_supply/*/type               Battery | Mains | USB | ...
    <root>/sys/class/power_supply/<battery>/capacity   percent
    <root>/sys/class/power_supply/<battery>/status     Charging | Discharging | Full | ...

`root` is the agent setting `sysfs_root` ("/" on a device; a test writes a tree of its
own). A board without these files has no gate: a missing or unreadable file, or a value
out of any sensor's range, is "unknown", never "not ready". Pure apart from reading the
files; the agent re-reads them on a timer (`readiness_interval_s`) and before it trains.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware_profiles import Profile

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings

MAX_ZONES = 64  # thermal zones and power supplies read, at most
MAX_FILE_BYTES = 64
TEMP_RANGE_C = (-60.0, 200.0)  # a reading outside is a broken sensor, not a temperature
REPUBLISH_S = 60.0  # a changed reason with unchanged readiness is published this often


@dataclass(frozen=True)
class Reading:
    """What sysfs said: None where it says nothing."""

    temp_c: float | None = None  # the hottest thermal zone
    battery_pct: float | None = None  # the lowest battery's capacity
    discharging: bool | None = None  # a battery discharges (no mains power)


@dataclass(frozen=True)
class Readiness:
    """A decision: ready, or the reason why not (e.g. "thermal: 83.0 C at or over the
    profile's 80 C limit")."""

    ready: bool
    reason: str
    reading: Reading


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_FILE_BYTES).decode("ascii", "replace").strip()
    except OSError:
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_sysfs(root: Path) -> Reading:
    """The hottest thermal zone and the batteries under root (see the module doc)."""
    temps = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*"))[:MAX_ZONES]:
        milli = _number(_read(zone / "temp"))
        if milli is not None and TEMP_RANGE_C[0] <= milli / 1000.0 <= TEMP_RANGE_C[1]:
            temps.append(milli / 1000.0)
    levels, discharging, mains = [], False, False
    for supply in sorted((root / "sys/class/power_supply").glob("*"))[:MAX_ZONES]:
        kind = (_read(supply / "type") or "").lower()
        if kind == "battery":
            pct = _number(_read(supply / "capacity"))
            if pct is not None and 0 <= pct <= 100:
                levels.append(pct)
            discharging |= (_read(supply / "status") or "").lower() == "discharging"
        elif kind in ("mains", "usb", "usb_pd", "usb_c") and _read(supply / "online") == "1":
            mains = True
    return Reading(
        temp_c=max(temps) if temps else None,
        battery_pct=min(levels) if levels else None,
        discharging=(discharging and not mains) if levels or discharging else None,
    )


def decide(reading: Reading, profile: Profile) -> Readiness:
    """Ready, or not with the first gate that closes (thermal, then battery)."""
    t, pct = reading.temp_c, reading.battery_pct
    if not profile.can_train:  # the gates guard training; serving goes on regardless
        return Readiness(True, "", reading)
    if profile.max_temp_c and t is not None and t >= profile.max_temp_c:
        return Readiness(False, f"thermal: {t:.1f} C at or over the profile's "
                                f"{profile.max_temp_c:g} C limit", reading)  # fmt: skip
    if reading.discharging and not profile.train_on_battery:
        return Readiness(False, "battery: discharging, and the profile trains only on mains "
                                "power", reading)  # fmt: skip
    if profile.min_battery_pct and reading.discharging and pct is not None and (
            pct < profile.min_battery_pct):  # fmt: skip
        return Readiness(False, f"battery: {pct:.0f}% on battery, under the profile's "
                                f"{profile.min_battery_pct:g}% minimum", reading)  # fmt: skip
    return Readiness(True, "", reading)


class ReadinessWatch:
    """The agent's view of its readiness: re-read on a timer, and forced before training;
    whether the state should be published again (rate-limited)."""

    def __init__(self, *, root: Path, profile: Profile, interval_s: float,
                 republish_s: float = REPUBLISH_S) -> None:  # fmt: skip
        self.root, self.profile, self.interval_s = Path(root), profile, interval_s
        self.republish_s = republish_s
        self.declined = 0  # the last round declined (0: none), announced in the state
        self.checked_at = -math.inf
        self.now = decide(read_sysfs(self.root), profile)
        self.announced = (self.now.ready, self.now.reason)  # what the last state said
        self.announced_at = -math.inf

    def check(self, now: float, *, force: bool = False) -> Readiness:
        """Read the gates again when due (or forced); the decision."""
        if force or now - self.checked_at >= self.interval_s:
            self.checked_at = now
            self.now = decide(read_sysfs(self.root), self.profile)
        return self.now

    def due(self, now: float) -> bool:
        """Publish the state again? At once when readiness flips; when only the reason's
        text changes (a temperature moving while over the limit) at most every
        republish_s seconds."""
        ready, reason = self.now.ready, self.now.reason
        if ready != self.announced[0]:
            return True
        return reason != self.announced[1] and now - self.announced_at >= self.republish_s

    def tick(self, now: float) -> bool:
        """The timer: read when due; True when the state should be published again."""
        self.check(now)
        return self.due(now)

    @classmethod
    def of(cls, settings: AgentSettings, profile: Profile) -> ReadinessWatch:
        """The agent's watch: its settings' sysfs_root and readiness_interval_s."""
        return cls(root=settings.sysfs_root, profile=profile,
                   interval_s=settings.readiness_interval_s)  # fmt: skip

    def declines(self, round_id: int, now: float, log: logging.LoggerAdapter[Any]) -> bool:
        """Before a round is taken: the gates read again; True (logged, `declined` set)
        when not ready and the round was not declined already: the device does not train
        it and says why at once. A round declined once stays declined."""
        if round_id == self.declined or self.check(now, force=True).ready:
            return False
        self.declined = round_id
        log.warning("round %d: declined, not ready (%s)", round_id, self.now.reason)
        return True

    def state_fields(self, now: float) -> dict[str, Any]:
        """The readiness fields of the device's state (fedmq.wire.DeviceState), marked as
        published (the state is built to be sent)."""
        self.published(now)
        r = self.now
        return {"ready": r.ready, "not_ready": r.reason, "temp_c": r.reading.temp_c,
                "battery_pct": r.reading.battery_pct, "declined": self.declined}  # fmt: skip

    def published(self, now: float) -> None:
        """The state (with the current decision) went out."""
        self.announced, self.announced_at = (self.now.ready, self.now.reason), now

"""Which devices of the job are there: their retained states, and Wills turned into
dropouts once a grace has passed. Pure: the service passes `now`."""

from __future__ import annotations

from fedmq.errors import Unauthorized
from fedmq.wire import DeviceState

# an offline state counts as a dropout only after this long (and this long after our own
# reconnect): longer than a device's first reconnect after a broker restart, since
# Mosquitto publishes every client's Will when it shuts down
DROP_GRACE_S = 8.0


class Presence:
    """The device table of one job."""

    def __init__(self, *, job: str, grace_s: float = DROP_GRACE_S) -> None:
        self.job = job
        self.grace_s = grace_s
        self.devices: dict[str, DeviceState] = {}
        self.pending_drops: dict[str, float] = {}  # device -> when its Will arrived

    def observe(self, device: str, state: DeviceState, now: float) -> bool:
        """Take a device's state from its topic; True when its status changed."""
        if state.device != device:
            raise Unauthorized(f"state for {state.device!r} published on another device's topic")
        if state.job != self.job:
            self.devices.pop(device, None)  # a device of another job (or one that moved on)
            self.pending_drops.pop(device, None)
            return False
        before = self.devices.get(device)
        self.devices[device] = state
        if state.status == "offline":
            self.pending_drops.setdefault(device, now)
        else:
            self.pending_drops.pop(device, None)
        return before is None or before.status != state.status

    def trains(self, device: str) -> bool | None:
        """Whether a device trains; None when it has not said."""
        state = self.devices.get(device)
        return None if state is None else state.trains

    def trainers_online(self) -> list[str]:
        """Devices that are online and train (inference-only devices are never selected)."""
        return sorted(d for d, s in self.devices.items() if s.status != "offline" and s.trains)

    def online(self) -> list[str]:
        """Every device not offline."""
        return [d for d, s in self.devices.items() if s.status != "offline"]

    def due_drops(self, now: float, *, connected_at: float) -> list[str]:
        """Devices whose Will is older than the grace (counted from our own reconnect too)."""
        due = [d for d, since in self.pending_drops.items()
               if now - max(since, connected_at) >= self.grace_s]  # fmt: skip
        for device in due:
            del self.pending_drops[device]
        return due

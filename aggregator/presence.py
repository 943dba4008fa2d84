"""Which devices of the job are there: their retained states, and Wills turned into
dropouts once a grace has passed. Pure: the service passes `now`."""

from __future__ import annotations

from fedmq.errors import OverCapacity, Unauthorized
from fedmq.wire import DeviceState

# an offline state counts as a dropout only after this long (and this long after our own
# reconnect): longer than a device's first reconnect after a broker restart, since
# Mosquitto publishes every client's Will when it shuts down
DROP_GRACE_S = 8.0
MAX_DEVICES = 10_000


class Presence:
    """The device table of one job, bounded: only enrolled devices when a fleet file says
    who is, at most `max_devices` in any case (offline ones give way to new ones)."""

    def __init__(self, *, job: str, grace_s: float = DROP_GRACE_S,
                 enrolled: frozenset[str] | None = None,
                 max_devices: int = MAX_DEVICES) -> None:  # fmt: skip
        if max_devices < 1:
            raise ValueError(f"max_devices must be at least 1, got {max_devices}")
        self.job = job
        self.grace_s = grace_s
        self.enrolled = enrolled
        self.max_devices = max_devices
        self.devices: dict[str, DeviceState] = {}
        self.pending_drops: dict[str, float] = {}  # device -> when its Will arrived
        self.arrived_at = 0.0  # when a device last came online (new, or back from offline)

    def observe(self, device: str, state: DeviceState, now: float) -> bool:
        """Take a device's state from its topic; True when its status changed.

        ProtocolError for a state that may not enter the table: on another device's topic,
        from a device the fleet file does not enrol, or a new device when the table is
        full of online ones."""
        if state.device != device:
            raise Unauthorized(f"state for {state.device!r} published on another device's topic")
        if state.job != self.job:
            self.devices.pop(device, None)  # a device of another job (or one that moved on)
            self.pending_drops.pop(device, None)
            return False
        before = self.devices.get(device)
        if before is None:
            if state.status == "offline":
                return False  # an unknown device's Will (or a storm of them) tells us nothing
            if self.enrolled is not None and device not in self.enrolled:
                raise Unauthorized("device is not enrolled in this job's fleet file")
            if len(self.devices) >= self.max_devices:
                gone = next((d for d, s in self.devices.items() if s.status == "offline"), None)
                if gone is None:
                    raise OverCapacity(f"device table full ({self.max_devices} online devices)")
                del self.devices[gone]
        self.devices[device] = state
        if state.status != "offline" and (before is None or before.status == "offline"):
            self.arrived_at = now
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

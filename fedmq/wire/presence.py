"""What devices say about themselves: presence (state, also the Last Will) and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.errors import SchemaError
from fedmq.wire.framing import get_field, num_map, pack_message, unpack_message

# ---------------------------------------------------------------- device state


DEVICE_STATUSES = ("online", "training", "offline")
MAX_REASON_CHARS = 1024
MAX_LABEL_CHARS = 128  # device, job, profile, agent_version: a table holds one per device
TEMP_RANGE_C = (-60.0, 200.0)  # temp_c outside is refused: no sensor reads it


@dataclass(frozen=True)
class DeviceState:
    """A device's retained presence; the offline form is also its Last Will."""

    device: str
    status: str
    job: str = ""
    profile: str = ""
    agent_version: str = ""
    num_examples: int = 0
    model_version: int = -1
    ts: float = 0.0
    trains: bool = True  # False: inference only, never selected for a round
    reason: str = ""  # why the device last refused a global model; "" once it holds a newer one
    # readiness (optional; agents before it send none and count as ready): whether the
    # device may train now, why not, what its sysfs said, and the round it declined
    ready: bool = True
    not_ready: str = ""  # e.g. "thermal: 83.0 C at or over the profile's 80 C limit"
    temp_c: float | None = None  # the hottest thermal zone; None: no sensor
    battery_pct: float | None = None  # None: no battery
    declined: int = 0  # the id of an open round it was selected for and will not train


def encode_state(s: DeviceState) -> bytes:
    """The retained message on devices/<device>/state."""
    return pack_message(
        "state",
        {
            "device": s.device,
            "status": s.status,
            "job": s.job,
            "profile": s.profile,
            "agent_version": s.agent_version,
            "num_examples": s.num_examples,
            "model_version": s.model_version,
            "ts": s.ts,
            "trains": s.trains,
            "reason": s.reason[:MAX_REASON_CHARS],
            "ready": s.ready,
            "not_ready": s.not_ready[:MAX_REASON_CHARS],
            **({"temp_c": s.temp_c} if s.temp_c is not None else {}),
            **({"battery_pct": s.battery_pct} if s.battery_pct is not None else {}),
            **({"declined": s.declined} if s.declined else {}),
        },
    )


def decode_state(payload: bytes, *, max_bytes: int = 64 * 1024) -> DeviceState:
    """Inverse of encode_state."""
    obj = unpack_message(payload, "state", max_bytes)
    s = DeviceState(
        device=get_field(obj, "device", "str"),
        status=get_field(obj, "status", "str"),
        job=get_field(obj, "job", "str"),
        profile=get_field(obj, "profile", "str"),
        agent_version=get_field(obj, "agent_version", "str"),
        num_examples=get_field(obj, "num_examples", "int"),
        model_version=get_field(obj, "model_version", "int"),
        ts=float(get_field(obj, "ts", "num")),
        trains=get_field(obj, "trains", "bool"),
        # optional: agents before this field was added do not send it
        reason=get_field(obj, "reason", "str", optional=True) or "",
        # optional, newer still: absent means ready (an agent without readiness gates)
        ready=get_field(obj, "ready", "bool", optional=True) is not False,
        not_ready=get_field(obj, "not_ready", "str", optional=True) or "",
        temp_c=_optional_num(obj, "temp_c"),
        battery_pct=_optional_num(obj, "battery_pct"),
        declined=get_field(obj, "declined", "int", optional=True) or 0,
    )
    if s.status not in DEVICE_STATUSES:
        raise SchemaError(f"state: unknown status {s.status!r}")
    if max(len(s.device), len(s.job), len(s.profile), len(s.agent_version)) > MAX_LABEL_CHARS:
        raise SchemaError(
            f"state: device, job, profile and agent_version are at most {MAX_LABEL_CHARS} "
            "characters"
        )
    if max(len(s.reason), len(s.not_ready)) > MAX_REASON_CHARS:
        raise SchemaError(f"state: reason and not_ready are at most {MAX_REASON_CHARS} "
                          "characters")  # fmt: skip
    if s.temp_c is not None and not TEMP_RANGE_C[0] <= s.temp_c <= TEMP_RANGE_C[1]:
        raise SchemaError(f"state: temp_c {s.temp_c} outside {TEMP_RANGE_C} C")
    if s.battery_pct is not None and not 0 <= s.battery_pct <= 100:
        raise SchemaError(f"state: battery_pct {s.battery_pct} outside [0, 100]")
    if s.declined < 0:
        raise SchemaError(f"state: declined must be a round id >= 0, got {s.declined}")
    return s


def _optional_num(obj: dict[str, object], key: str) -> float | None:
    value = get_field(obj, key, "num", optional=True)
    return None if value is None else float(value)


# ---------------------------------------------------------------- device metrics


@dataclass(frozen=True)
class DeviceMetrics:
    """Local evaluation a device reports after a round or an inference pass."""

    device: str
    round_id: int
    model_version: int
    metrics: dict[str, float]


def encode_metrics(m: DeviceMetrics) -> bytes:
    """The message on <job>/metrics/<device>."""
    return pack_message(
        "metrics",
        {
            "device": m.device,
            "round": m.round_id,
            "model_version": m.model_version,
            "metrics": dict(m.metrics),
        },
    )


def decode_metrics(payload: bytes, *, max_bytes: int = 64 * 1024) -> DeviceMetrics:
    """Inverse of encode_metrics."""
    obj = unpack_message(payload, "metrics", max_bytes)
    return DeviceMetrics(
        device=get_field(obj, "device", "str"),
        round_id=get_field(obj, "round", "int"),
        model_version=get_field(obj, "model_version", "int"),
        metrics=num_map(obj, "metrics"),
    )

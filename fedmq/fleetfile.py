"""The fleet file: which devices are enrolled in a job, and what each may claim.

`fedmq fleet` writes and maintains it next to the fleet's security material; the
aggregator reads it (`fleet_file`) to admit updates only from enrolled, unrevoked devices
and to cap the example count each may claim. Format (TOML)::

    job = "demo"
    prefix = "fedmq"

    [broker]
    host = "127.0.0.1"
    port = 8883

    [[device]]
    id = "device-00"
    class = "rpi4"          # firmware profile name (optional)
    max_examples = 600      # most examples an update may claim (optional)
    revoked = false         # a revoked device stays listed so its certificate stays revoked

    [[operator]]            # a further read-only identity, operator.<job>.<name>
    id = "operator.demo.alice"
    serial = 1234
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.config import ConfigError, read_toml
from fedmq.topics import check_name

_TOP_KEYS = {"job", "prefix", "broker", "device", "aggregator", "operator"}
_DEVICE_KEYS = {"id", "class", "max_examples", "revoked", "serial"}


@dataclass(frozen=True)
class DeviceEntry:
    """One enrolled device."""

    id: str
    device_class: str = ""
    max_examples: int | None = None
    revoked: bool = False
    serial: int | None = None  # serial number of its client certificate


@dataclass(frozen=True)
class FleetFile:
    """A job's fleet: broker address and enrolled devices (by id, in file order)."""

    job: str
    prefix: str = "fedmq"
    host: str = "127.0.0.1"
    port: int = 8883
    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    # read-only identities besides operator.<job>, one per person or tool that watches at
    # once (a certificate is its client id: two tools sharing one would knock each other off)
    operators: dict[str, DeviceEntry] = field(default_factory=dict)

    def enrolled(self, device: str) -> DeviceEntry | None:
        """The device's entry when it is enrolled and not revoked, else None."""
        entry = self.devices.get(device)
        return entry if entry is not None and not entry.revoked else None


def read_fleet(path: Path) -> FleetFile:
    """Parse a fleet file; ConfigError naming the file and key on anything wrong."""
    doc = read_toml(Path(path))
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known: {', '.join(sorted(_TOP_KEYS))}")
    try:
        job = check_name("job", doc.get("job", ""))
        prefix = str(doc.get("prefix", "fedmq"))
        broker = doc.get("broker", {})
        if not isinstance(broker, dict):
            raise ValueError("[broker] must be a table")
        host = str(broker.get("host", "127.0.0.1"))
        port = int(broker.get("port", 8883))
        devices = _entries(doc.get("device", []), "device")
        operators = _entries(doc.get("operator", []), "operator")
        for name in operators:
            if not name.startswith(f"operator.{job}."):
                raise ValueError(f"operator {name!r} must be named operator.{job}.<name>")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from err
    return FleetFile(job=job, prefix=prefix, host=host, port=port, devices=devices,
                     operators=operators)  # fmt: skip


def _entries(raws: Any, table: str) -> dict[str, DeviceEntry]:
    if not isinstance(raws, list):
        raise ValueError(f"[[{table}]] must be an array of tables")
    entries: dict[str, DeviceEntry] = {}
    for i, raw in enumerate(raws):
        entry = _device(raw, i, table)
        if entry.id in entries:
            raise ValueError(f"{table} {entry.id!r} is listed twice")
        entries[entry.id] = entry
    return entries


def _device(raw: Any, index: int, table: str = "device") -> DeviceEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"[[{table}]] number {index + 1} must be a table")
    unknown = sorted(set(raw) - _DEVICE_KEYS)
    if unknown:
        raise ValueError(f"[[{table}]] number {index + 1}: unknown keys {unknown}")
    max_examples = raw.get("max_examples")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"device {raw.get('id')!r}: max_examples must be a positive integer")
    return DeviceEntry(
        id=check_name(f"{table} id", raw.get("id", "")),
        device_class=str(raw.get("class", "")),
        max_examples=max_examples,
        revoked=bool(raw.get("revoked", False)),
        serial=raw.get("serial"),
    )

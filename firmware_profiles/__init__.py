"""Per-class device budgets: one flat TOML file per device class, validated into a profile.

A profile bounds what one round may cost the device (time, memory, batch, message sizes,
threads, what a round may ask) and gates when it may train at all: the hottest thermal
zone at or above `max_temp_c`, or a battery below `min_battery_pct` (or discharging when
`train_on_battery` is false), make the device not ready (edge_agent/readiness.py). Every
error names the file and the key."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PROFILE_DIR = Path(__file__).parent
MAX_TEMP_C = 150.0  # above any silicon's shutdown point: a higher limit is a typo


class ProfileError(ValueError):
    """A profile that may not be used: names the file (or profile) and the key."""

    def __init__(self, where: str, key: str, problem: str) -> None:
        self.where, self.key, self.problem = where, key, problem
        super().__init__(f"profile {where}: {key}: {problem}" if key else
                         f"profile {where}: {problem}")  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """What a device class may spend on one round, and when it may train at all."""

    name: str
    description: str = ""
    can_train: bool = True  # False: inference only (no torch on the device)
    max_train_seconds: float = 300.0  # local training stops when this is spent
    max_memory_mb: int = 512  # resident memory the agent may grow to while training
    max_batch_size: int = 64  # larger round batch sizes are capped to this
    max_update_bytes: int = 0  # 0: no uplink budget of its own
    max_message_bytes: int = 256 * 1024  # largest MQTT payload the device's link takes
    torch_threads: int = 1
    # the most a round may ask of this device: a round beyond them is refused, not trained
    max_epochs: int = 20
    max_lr: float = 1.0
    max_prox_mu: float = 10.0  # FedProx's mu (the paper's grid tops out at 1)
    # readiness gates (edge_agent/readiness.py), read from Linux sysfs where present:
    max_temp_c: float = 80.0  # not ready while the hottest thermal zone is at or above (0: off)
    min_battery_pct: float = 0.0  # not ready on battery below this charge (0: off)
    train_on_battery: bool = True  # False: not ready while the battery discharges

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            key, problem = problems[0]
            raise ProfileError(repr(self.name), key, problem)

    def problems(self) -> list[tuple[str, str]]:
        """(key, problem) for every value out of range, in field order."""
        checks: list[tuple[str, bool, str]] = [
            ("max_train_seconds", self.max_train_seconds > 0, "must be positive"),
            ("max_memory_mb", self.max_memory_mb >= 32, "must be at least 32"),
            ("max_batch_size", self.max_batch_size >= 1, "must be at least 1"),
            ("max_update_bytes", self.max_update_bytes >= 0, "must be >= 0 (0 = no budget)"),
            ("max_message_bytes", self.max_message_bytes >= 1024, "must be at least 1024"),
            ("torch_threads", 1 <= self.torch_threads <= 256, "must be in [1, 256]"),
            ("max_epochs", self.max_epochs >= 1, "must be at least 1"),
            ("max_lr", self.max_lr > 0, "must be positive"),
            ("max_prox_mu", self.max_prox_mu >= 0, "must be >= 0 (0: FedProx refused)"),
            ("max_temp_c", 0 <= self.max_temp_c <= MAX_TEMP_C,
             f"must be 0 (no thermal gate) or a limit up to {MAX_TEMP_C:g} C"),
            ("min_battery_pct", 0 <= self.min_battery_pct <= 100,
             "must be a percentage in [0, 100] (0: no battery gate)"),
        ]  # fmt: skip
        # inf and NaN pass some comparisons and fail others: refuse them first, by name
        out = [(f.name, f"{getattr(self, f.name)!r} must be a finite number")
               for f in fields(self) if isinstance(getattr(self, f.name), float)
               and not math.isfinite(getattr(self, f.name))]  # fmt: skip
        bad = {key for key, _ in out}
        return out + [(key, f"{getattr(self, key)!r} {why}") for key, ok, why in checks
                      if not ok and key not in bad]  # fmt: skip


def list_profiles() -> list[str]:
    """Names of the bundled profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_path(name_or_path: str) -> Path:
    """The file a profile name (bundled) or path names; ProfileError when there is none."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(
            repr(name_or_path),
            "",
            f"no such firmware profile; bundled: {', '.join(list_profiles())}",
        )
    return path


def load_profile(name_or_path: str) -> Profile:
    """A bundled profile by name, or a profile TOML file by path; ProfileError (a
    ValueError naming the file and the key) if invalid."""
    path = profile_path(name_or_path)
    where = str(path)
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ProfileError(where, "", f"not valid TOML: {err}") from err
    known = {f.name: f.type for f in fields(Profile)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ProfileError(where, unknown[0], f"unknown key; known: {', '.join(sorted(known))}")
    raw.setdefault("name", path.stem)
    kinds: dict[str, type | tuple[type, ...]] = {
        "str": str, "bool": bool, "int": int, "float": (int, float)
    }  # fmt: skip
    for key, value in raw.items():
        want = kinds[str(known[key])]
        if isinstance(value, bool) and want is not bool or not isinstance(value, want):
            raise ProfileError(where, key, f"{value!r} has the wrong type (wants {known[key]})")
    try:
        return Profile(**raw)
    except ProfileError as err:
        raise ProfileError(where, err.key, err.problem) from None


def bundled(name: str) -> Profile | None:
    """The bundled profile of that name, or None (a name a device announced: never a path)."""
    if not _bundled_cache:
        _bundled_cache.update((n, load_profile(n)) for n in list_profiles())
    return _bundled_cache.get(name)


_bundled_cache: dict[str, Profile] = {}  # every bundled profile, loaded once

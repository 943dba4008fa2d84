"""Per-class device budgets: one flat TOML file per device class, validated into a profile."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PROFILE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Profile:
    """What a device class may spend on one round."""

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

    def __post_init__(self) -> None:
        problems = []
        if self.max_train_seconds <= 0:
            problems.append("max_train_seconds must be positive")
        if self.max_memory_mb < 32:
            problems.append("max_memory_mb must be at least 32")
        if self.max_batch_size < 1:
            problems.append("max_batch_size must be at least 1")
        if self.max_update_bytes < 0:
            problems.append("max_update_bytes must be >= 0 (0 = no budget)")
        if self.max_message_bytes < 1024:
            problems.append("max_message_bytes must be at least 1024")
        if self.torch_threads < 1:
            problems.append("torch_threads must be at least 1")
        if self.max_epochs < 1 or not self.max_lr > 0:
            problems.append("max_epochs must be at least 1 and max_lr positive")
        if not self.max_prox_mu >= 0:
            problems.append("max_prox_mu must be >= 0 (0: FedProx refused)")
        if problems:
            raise ValueError(f"profile {self.name!r}: " + "; ".join(problems))


def list_profiles() -> list[str]:
    """Names of the bundled profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A bundled profile by name, or a profile TOML file by path; ValueError if invalid."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ValueError(
            f"no firmware profile {name_or_path!r}; bundled: {', '.join(list_profiles())}"
        )
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"profile {path} is not valid TOML: {err}") from err
    known = {f.name: f.type for f in fields(Profile)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"profile {path}: unknown keys {unknown}; known: {sorted(known)}")
    raw.setdefault("name", path.stem)
    for key, value in raw.items():
        kinds: dict[str, type | tuple[type, ...]] = {
            "str": str, "bool": bool, "int": int, "float": (int, float)
        }  # fmt: skip
        want = kinds[str(known[key])]
        if isinstance(value, bool) and want is not bool or not isinstance(value, want):
            raise ValueError(f"profile {path}: {key} = {value!r} has the wrong type")
    return Profile(**raw)

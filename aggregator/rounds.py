"""Rounds as pure data: how they are sized, who is selected, what an open one holds.

No sockets, no clock: the service passes `now`. The rules for judging updates and ending
a round are each mode's own (aggregator.modes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds are sized and when they end."""

    target: int = 0  # updates that complete a round; 0 means every online device
    over_select: float = 0.0  # select this fraction more devices than target
    min_devices: int = 1  # quorum: updates needed to close at the deadline
    timeout_s: float = 60.0  # deadline after opening
    max_selected: int = 1000  # the most devices one round selects (its message must fit)

    def __post_init__(self) -> None:
        if self.max_selected < 1:
            raise ValueError(f"max_selected must be at least 1, got {self.max_selected}")
        if max(self.target, self.min_devices) > self.max_selected:
            raise ValueError(
                f"target ({self.target}) and min_devices ({self.min_devices}) cannot exceed "
                f"the {self.max_selected} devices a round may select"
            )
        if self.target < 0:
            raise ValueError(f"target must be >= 0 (0 = all online devices), got {self.target}")
        if not 0 <= self.over_select <= 10:
            raise ValueError(f"over_select must be a fraction in [0, 10], got {self.over_select}")
        if self.min_devices < 1:
            raise ValueError(f"min_devices must be at least 1, got {self.min_devices}")
        if self.target and self.min_devices > self.target:
            raise ValueError(
                f"min_devices ({self.min_devices}) cannot exceed target ({self.target})"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def ready(self, online: int) -> bool:
        """Enough devices are online to open a round at full size."""
        return online >= max(self.min_devices, self.target)

    def should_open(self, online: int, *, waited: bool) -> bool:
        """Open a round now? At full size at once; smaller once the start wait is over.

        waited: the first round's start_wait_s is over (or this is not the first round);
        with target = 0 ("all online") that wait is the only way to know all are online."""
        full = self.ready(online) and (self.target > 0 or waited)
        return full or (waited and online >= self.min_devices)

    def round_target(self, online: int) -> int:
        """Updates that complete a round opened with this many devices online."""
        return max(self.min_devices, min(self.target or online, online))


def select_devices(
    online: Sequence[str], *, target: int, over_select: float, rng: np.random.Generator,
    max_selected: int = 0,
) -> tuple[str, ...]:  # fmt: skip
    """Pick ceil(target * (1 + over_select)) devices at random among the online ones, at
    most max_selected (0: no cap)."""
    want = min(len(online), math.ceil(target * (1.0 + over_select)))
    if max_selected:
        want = min(want, max_selected)
    chosen = rng.choice(sorted(online), size=want, replace=False)
    return tuple(sorted(str(d) for d in chosen))


@dataclass
class OpenRound:
    """One open round (sync) or buffer (async): who may contribute, who did, its deadline."""

    round_id: int
    model_version: int
    selected: frozenset[str]
    opened_at: float
    deadline: float
    target: int
    min_devices: int
    accepted: dict[str, str] = field(default_factory=dict)  # update id -> device, in order
    dropped: set[str] = field(default_factory=set)
    contributors: set[str] = field(default_factory=set)  # devices in accepted (derived)
    # most examples one update may claim in this round (adaptive, see service._example_cap);
    # 0: only the admission's caps
    example_cap: int = 0
    # selected devices that declined (not ready: aggregator.eligibility) -> their reason
    declined: dict[str, str] = field(default_factory=dict)

    def record(self, update_id: str, device: str) -> None:
        """Count an accepted update."""
        self.accepted[update_id] = device
        self.contributors.add(device)

    def forget(self, update_id: str) -> None:
        """Take back an update recorded before its validation failed."""
        if self.accepted.pop(update_id, None) is not None:
            self.contributors = set(self.accepted.values())

    def drop(self, device: str) -> None:
        """A selected device went offline (its Last Will): stop waiting for it."""
        if device in self.selected and device not in self.contributors:
            self.dropped.add(device)

    def rejoin(self, device: str) -> None:
        """A dropped device came back within the round: wait for it again."""
        self.dropped.discard(device)

    @property
    def waiting_for(self) -> frozenset[str]:
        return self.selected - self.contributors - self.dropped - self.declined.keys()

    def history_record(self, outcome: str, now: float) -> dict[str, Any]:
        """The round's line in the history, as it closes (stats and metrics are added)."""
        return {"round": self.round_id, "outcome": outcome, "base_version": self.model_version,
                "selected": sorted(self.selected), "dropped": sorted(self.dropped),
                "declined": dict(sorted(self.declined.items())),
                "accepted": len(self.accepted), "opened_at": self.opened_at, "closed_at": now,
                "wall_s": round(now - self.opened_at, 3)}  # fmt: skip

    def meta(self) -> dict[str, object]:
        """What the journal keeps of the round as announced."""
        return {"round": self.round_id, "model_version": self.model_version,
                "selected": sorted(self.selected), "opened_at": self.opened_at,
                "deadline": self.deadline, "target": self.target,
                "min_devices": self.min_devices, "example_cap": self.example_cap,
                "declined": dict(self.declined)}  # fmt: skip

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> OpenRound:
        """The round as announced, back from the journal."""
        return cls(
            round_id=int(meta["round"]), model_version=int(meta["model_version"]),
            selected=frozenset(meta["selected"]), opened_at=float(meta["opened_at"]),
            deadline=float(meta["deadline"]), target=int(meta["target"]),
            min_devices=int(meta["min_devices"]), example_cap=int(meta.get("example_cap", 0)),
            declined={str(k): str(v) for k, v in (meta.get("declined") or {}).items()},
        )  # fmt: skip

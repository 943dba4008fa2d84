"""Synchronous round policy as pure code: selection, judging updates, deciding to close.

No sockets, no clock: the service passes `now`. Failures are data: dropouts and late
arrivals come in as inputs and the policy decides (complete, quorum at the deadline,
abandon).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmq.errors import DuplicateUpdate, StaleUpdate, Unauthorized


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds are sized and when they end."""

    target: int = 0  # updates that complete a round; 0 means every online device
    over_select: float = 0.0  # select this fraction more devices than target
    min_devices: int = 1  # quorum: updates needed to close at the deadline
    timeout_s: float = 60.0  # deadline after opening

    def __post_init__(self) -> None:
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

    def round_target(self, online: int) -> int:
        """Updates that complete a round opened with this many devices online."""
        return max(self.min_devices, min(self.target or online, online))


def select_devices(
    online: Sequence[str], *, target: int, over_select: float, rng: np.random.Generator
) -> tuple[str, ...]:
    """Pick ceil(target * (1 + over_select)) devices at random among the online ones."""
    want = min(len(online), math.ceil(target * (1.0 + over_select)))
    chosen = rng.choice(sorted(online), size=want, replace=False)
    return tuple(sorted(str(d) for d in chosen))


@dataclass
class OpenRound:
    """One synchronous round while it is open."""

    round_id: int
    model_version: int
    selected: frozenset[str]
    opened_at: float
    deadline: float
    target: int
    min_devices: int
    accepted: dict[str, str] = field(default_factory=dict)  # device -> update id
    dropped: set[str] = field(default_factory=set)

    def judge(self, *, update_id: str, device: str, round_id: int, base_version: int,
              now: float, counted_ids: Container[str]) -> str:  # fmt: skip
        """'accept' or 'late' for an update; raises a ProtocolError saying why it is refused."""
        if update_id in counted_ids or update_id in self.accepted.values():
            raise DuplicateUpdate(f"update {update_id} was already counted", device=device)
        if round_id < self.round_id:
            return "late"
        if round_id > self.round_id:
            raise StaleUpdate(
                f"update is for round {round_id}, but round {self.round_id} is open",
                device=device,
            )
        if device not in self.selected:
            raise Unauthorized(f"device was not selected for round {round_id}", device=device)
        if device in self.accepted:
            raise DuplicateUpdate(
                f"device already contributed {self.accepted[device]} to round {round_id}",
                device=device,
            )
        if base_version != self.model_version:
            raise StaleUpdate(
                f"update trained on version {base_version}, round {round_id} uses "
                f"version {self.model_version}",
                device=device,
            )
        if now > self.deadline:
            return "late"
        return "accept"

    def record(self, device: str, update_id: str) -> None:
        """Count an accepted update."""
        self.accepted[device] = update_id

    def drop(self, device: str) -> None:
        """A selected device went offline (its Last Will): stop waiting for it."""
        if device in self.selected and device not in self.accepted:
            self.dropped.add(device)

    def rejoin(self, device: str) -> None:
        """A dropped device came back within the round: wait for it again."""
        self.dropped.discard(device)

    @property
    def waiting_for(self) -> frozenset[str]:
        return self.selected - set(self.accepted) - self.dropped

    def outcome(self, now: float) -> str | None:
        """'complete', 'quorum' or 'abandoned' once the round must end; None while open."""
        got = len(self.accepted)
        if got >= self.target:
            return "complete"
        if now >= self.deadline or not self.waiting_for:
            return "quorum" if got >= self.min_devices else "abandoned"
        return None

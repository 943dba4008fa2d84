"""Asynchronous FedBuff rules as pure code: staleness weights and the stale cut-off.

Devices train on the newest version whenever they are free; each update is folded in
with weight num_examples * (1 + s)^-a, where s is how many versions the global model
moved on since the device's base version. Every `buffer_size` updates make a version:
the sum divided by the examples behind it, so stale updates move the model less.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.errors import StaleUpdate


@dataclass(frozen=True)
class BufferPolicy:
    """How an asynchronous aggregator buffers and discounts updates."""

    buffer_size: int = 10  # K: updates per new version
    staleness_exponent: float = 0.5  # a in (1 + s)^-a
    max_staleness: int = 20  # versions; older updates are rejected as stale

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {self.buffer_size}")
        if not 0 <= self.staleness_exponent <= 10:
            raise ValueError(
                f"staleness_exponent must be in [0, 10], got {self.staleness_exponent}"
            )
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    def staleness(self, *, current_version: int, base_version: int, device: str) -> int:
        """Versions between an update's base and now; StaleUpdate beyond max_staleness."""
        s = current_version - base_version
        if s < 0:
            raise StaleUpdate(
                f"update trained on version {base_version}, newer than {current_version}",
                device=device,
            )
        if s > self.max_staleness:
            raise StaleUpdate(
                f"update is {s} versions stale (at most {self.max_staleness} are folded in)",
                device=device,
            )
        return s

    def weight(self, staleness: int) -> float:
        """The polynomial staleness discount (1 + s)^-a."""
        return float((1.0 + staleness) ** -self.staleness_exponent)

"""Local differential privacy on the device: clip the delta, add Gaussian noise, before it
is compressed and sent. For fleets that do not trust the aggregator (or the broker):
what leaves the device is already private, whatever the aggregator does with it.

Pure numpy. The noise comes from OS entropy, never from the seeded update generator:
noise anyone can regenerate protects nothing. The epsilon a setting spends is computed on
the aggregator's side (aggregator.privacy.local_epsilon): a device needs no accountant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocalDP:
    """The device's own privacy: clip its delta to `clip` (L2), then add Gaussian noise of
    std noise_multiplier x clip to every coordinate."""

    clip: float
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip > 0 or self.noise_multiplier < 0:
            raise ValueError("local DP needs clip > 0 and noise_multiplier >= 0")


def privatize(delta: Mapping[str, np.ndarray], *, clip: float, noise_multiplier: float,
              rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The delta scaled to L2 norm <= clip, plus N(0, (noise_multiplier x clip)^2) in every
    coordinate (float32)."""
    if not clip > 0 or noise_multiplier < 0:
        raise ValueError("local DP needs clip > 0 and noise_multiplier >= 0")
    rng = rng if rng is not None else np.random.default_rng()
    norm = float(np.sqrt(sum(float(np.dot(d.reshape(-1).astype(np.float64),
                                          d.reshape(-1).astype(np.float64)))
                             for d in delta.values())))  # fmt: skip
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    return {k: (np.asarray(d, np.float64) * scale + rng.normal(0.0, std, np.shape(d)))
            .astype(np.float32) for k, d in delta.items()}  # fmt: skip

"""Admission bounds as pure functions: an update's L2 norm, clipping to a bound, the
adaptive bound from the previous round, and the cap on the example count it claims.

An update above the norm bound is scaled down to it (clipped), not refused: an honest
device with an unusual round loses only its excess. An update with a non-finite norm, or
one `ABSURD_FACTOR` times over the bound, is refused with a reason: no honest device
sends it, and folding it in scaled down would still let it choose the direction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedmq.codecs import Decoded, SparseTensor
from fedmq.errors import OutOfBounds

# the most max_examples may be set to: the old per-update plausibility cap
MAX_EXAMPLES_LIMIT = 10_000_000
# an update this many times over the bound is an attack or a bug, never a device's round
ABSURD_FACTOR = 1e4


def update_norm(delta: Mapping[str, Decoded]) -> float:
    """The L2 norm of a whole update (all tensors as one vector), in float64."""
    total = 0.0
    for t in delta.values():
        v = t.values if isinstance(t, SparseTensor) else np.asarray(t)
        flat = v.reshape(-1).astype(np.float64, copy=False)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings an update of this norm within the bound (1: within it);
    OutOfBounds when the norm is not finite or absurdly over the bound. bound 0: none."""
    if not math.isfinite(norm):
        raise OutOfBounds(f"update L2 norm is {norm}")
    if bound <= 0 or norm <= bound:
        return 1.0
    if norm > ABSURD_FACTOR * bound:
        raise OutOfBounds(f"update L2 norm {norm:.4g} is over {ABSURD_FACTOR:g} x the bound "
                          f"{bound:.4g}")  # fmt: skip
    return bound / norm


def adaptive_bound(norms: Iterable[float], factor: float) -> float:
    """factor x the median of the norms (those of the previous round's accepted updates);
    0 (no bound) when there are none or factor is 0."""
    values = [n for n in norms if math.isfinite(n) and n > 0]
    if not values or factor <= 0:
        return 0.0
    return float(factor * np.median(values))


def first_round_bound(weights: Mapping[str, np.ndarray]) -> float:
    """The L2 bound before any round has shown what an honest update's norm is: the global
    model's own norm (an update that moves the model by more than the model itself is not
    training; delta = -global, model replacement, is at it, and is refused far beyond it)."""
    return update_norm(weights)


def round_example_cap(factor: float, median_examples: float) -> int:
    """The round's adaptive cap on the examples an update may claim: factor x the median
    claim of the previous round's accepted updates; 1 (updates weigh alike) before any
    round has shown what an honest claim is; 0 (no adaptive cap) when factor is 0."""
    if factor <= 0:
        return 0
    if median_examples <= 0:
        return 1
    return max(1, int(factor * median_examples))


def example_cap(device: str, *, max_examples: int, enrolled: Mapping[str, int]) -> int:
    """The most examples (FedAvg weight) an update from device may claim: the policy's cap,
    or what the device enrolled with in the fleet file when that is lower."""
    own = enrolled.get(device)
    return max_examples if own is None else min(max_examples, own)

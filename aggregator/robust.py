"""Robust aggregation rules: coordinate-wise median, trimmed mean, (Multi-)Krum, and the
choice of a round's rule from the settings.

The rules are free functions over a list of flat float vectors (one per update), as in
Flower's aggregate.py; `KeptUpdates` is the AggregationRule that keeps each round's
updates for them. They need every update at once: a round holds n x P float32 values
(P parameters; 0.8 MB per update of mnist-2nn, 13 MB of mnist-cnn), and closing it
takes up to 4 x that again for a float64 copy and its sorted or partitioned copy: a
round of 100 mnist-cnn updates holds 1.3 GB and peaks near 6.6 GB. FedAvg and `clip`
stay streaming, O(P) whatever n (aggregator.fedavg).

Every rule treats updates alike, whatever examples they claim (the count is a claim an
attacker makes up); in async mode each update is first scaled by its staleness discount.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.bounds import clip_scale, update_norm
from aggregator.fedavg import AggregationRule, Prepared, RunningSum
from fedmq.codecs import Decoded, SparseTensor
from fedmq.wire import TensorSpec

RULES = ("fedavg", "median", "trimmed_mean", "krum", "clip")

# updates as rows: a list of flat vectors, or one n x P array (used as it is, not copied)
Rows = Sequence[np.ndarray] | np.ndarray


def _rows(updates: Rows) -> np.ndarray:
    return updates if isinstance(updates, np.ndarray) else np.stack(updates)


def coordinate_median(updates: Rows) -> np.ndarray:
    """The coordinate-wise median of flat updates (Yin et al. 2018)."""
    return np.median(_rows(updates), axis=0)


def trimmed_mean(updates: Rows, trim: float) -> np.ndarray:
    """Per coordinate, the mean after dropping the floor(trim x n) largest and smallest
    values (at least one value is kept)."""
    n = len(updates)
    k = min(int(np.floor(trim * n)), (n - 1) // 2)
    ordered = np.sort(_rows(updates), axis=0)
    return ordered[k : n - k].mean(axis=0)


def krum_scores(updates: Rows, f: int) -> np.ndarray:
    """Krum's score of each update: the sum of squared distances to its n - f - 2 nearest
    others (Blanchard et al. 2017); at least one neighbour when the round is small."""
    x = _rows(updates)
    sq = np.einsum("ij,ij->i", x, x)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    n = len(updates)
    k = max(1, n - f - 2)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(d[i], i)
        scores[i] = np.sort(others)[: min(k, len(others))].sum() if len(others) else 0.0
    return scores


def multi_krum(updates: Rows, f: int, m: int = 0) -> np.ndarray:
    """The mean of the m updates with the lowest Krum scores (m = 1: Krum; m = 0: n - f)."""
    n = len(updates)
    m = m or max(1, n - f)
    chosen = np.argsort(krum_scores(updates, f), kind="stable")[: min(m, n)]
    return _rows(updates)[np.sort(chosen)].mean(axis=0)


class KeptUpdates:
    """An AggregationRule that keeps every update (flat float32, clipped to the round's
    bound and scaled by its staleness discount) and applies a robust rule at the end."""

    streaming = False

    def __init__(self, *, specs: tuple[TensorSpec, ...], rule: str, clip_to: float = 0.0,
                 trim: float = 0.2, krum_f: int = 1, krum_m: int = 0) -> None:  # fmt: skip
        if rule not in ("median", "trimmed_mean", "krum"):
            raise ValueError(f"KeptUpdates applies median, trimmed_mean or krum, not {rule!r}")
        if not 0 <= trim < 0.5 or krum_f < 0 or krum_m < 0:
            raise ValueError("trim must be in [0, 0.5), krum_f and krum_m >= 0")
        self.specs, self.rule, self.clip_to = specs, rule, clip_to
        self.trim, self.krum_f, self.krum_m = trim, krum_f, krum_m
        self.sizes = [int(np.prod(s.shape, dtype=np.int64)) for s in specs]
        self.kept: list[np.ndarray] = []
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, Decoded], weight: float, *, norm: float | None = None
            ) -> None:  # fmt: skip
        """Keep one update."""
        self.add_prepared(self.prepare(delta, weight, norm=norm))

    def prepare(self, delta: Mapping[str, Decoded], weight: float, *,
                norm: float | None = None) -> Prepared:  # fmt: skip
        """The update as one clipped, discounted flat float32 vector (no state touched)."""
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        discount = weight / (weight if norm is None else norm)
        l2 = update_norm(delta)
        scale = clip_scale(l2, self.clip_to)
        flat = np.zeros(sum(self.sizes), dtype=np.float32)
        at = 0
        for spec, size in zip(self.specs, self.sizes, strict=True):
            t = delta[spec.name]
            if isinstance(t, SparseTensor):
                flat[at + t.indices] = t.values
            else:
                flat[at : at + size] = np.asarray(t, dtype=np.float32).reshape(-1)
            at += size
        flat *= np.float32(discount * scale)
        return Prepared(parts={"": flat}, norm=1.0, l2=l2, clipped=scale < 1.0)

    def add_prepared(self, p: Prepared) -> None:
        """Keep a prepared update."""
        part = p.parts[""]
        assert isinstance(part, np.ndarray)
        self.kept.append(part)
        self.total_weight += p.norm
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The robust aggregate of the kept updates, per tensor (float64)."""
        if not self.kept:
            raise ValueError("no updates were added, there is no aggregate")
        # one float64 copy of every kept update (n x P x 8 bytes); sort and median make
        # one more of the same size
        vectors = np.stack(self.kept, dtype=np.float64)
        if self.rule == "median":
            flat = coordinate_median(vectors)
        elif self.rule == "trimmed_mean":
            flat = trimmed_mean(vectors, self.trim)
        else:
            flat = multi_krum(vectors, self.krum_f, self.krum_m)
        out, at = {}, 0
        for spec, size in zip(self.specs, self.sizes, strict=True):
            out[spec.name] = flat[at : at + size].reshape(spec.shape)
            at += size
        return out


def round_bound(*, fixed: float, factor: float, median_norm: float) -> float:
    """The round's L2 bound: the fixed one, else factor x the previous round's median norm
    (0: none, e.g. in the first round of an adaptive bound)."""
    if fixed > 0:
        return fixed
    return factor * median_norm if factor > 0 and median_norm > 0 else 0.0


def make_rule(*, specs: tuple[TensorSpec, ...], rule: str, bound: float, clip_norm: float = 0.0,
              median_norm: float = 0.0, noise_multiplier: float = 0.0, trim: float = 0.2,
              krum_f: int = 1, krum_m: int = 0,
              rng: np.random.Generator | None = None) -> AggregationRule:  # fmt: skip
    """A round's aggregation rule. bound: the admission bound every rule clips to (0: none).
    `clip` clips to clip_norm (else the previous round's median norm, else the bound),
    weighs updates alike, and with noise_multiplier > 0 (central DP) clips to clip_norm
    alone and adds Gaussian noise of noise_multiplier x clip_norm to the sum."""
    if rule == "fedavg":
        return RunningSum(specs=specs, clip_to=bound)
    if rule == "clip" and noise_multiplier > 0:
        # central DP: C must not depend on the updates (a learnt bound would leak them)
        if not clip_norm > 0:
            raise ValueError("central DP needs a fixed clip_norm > 0")
        return RunningSum(specs=specs, clip_to=clip_norm, uniform=True,
                          noise_std=noise_multiplier * clip_norm, rng=rng)  # fmt: skip
    if rule == "clip":
        c = clip_norm or median_norm or bound
        c = min(c, bound) if bound > 0 and c > 0 else c
        return RunningSum(specs=specs, clip_to=c, uniform=True)
    if rule in ("median", "trimmed_mean", "krum"):
        return KeptUpdates(specs=specs, rule=rule, clip_to=bound, trim=trim, krum_f=krum_f,
                           krum_m=krum_m)  # fmt: skip
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")

"""FedAvg as a running weighted sum: memory O(model), not O(devices).

Pure numpy. Each accepted update is folded in as it arrives; closing a round divides by
the total weight and applies the mean delta to the global weights. A sparse update is
scattered into the sum at its indices: no dense per-device copy is ever made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from aggregator.bounds import clip_scale, update_norm
from fedmq.codecs import Decoded, SparseTensor
from fedmq.wire import TensorSpec

# a dense weighted delta, or (flat indices, weighted values) of a sparse one
Contribution = np.ndarray | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Prepared:
    """One update's weighted contribution to a sum, and what it adds to the divisor."""

    parts: dict[str, Contribution]
    norm: float
    l2: float = 0.0  # the update's L2 norm as sent (before clipping)
    clipped: bool = False  # scaled down to the round's norm bound


class RunningSum:
    """A weighted sum of deltas, one float64 accumulator per tensor.

    clip_to > 0 scales every update down to that L2 norm first (the admission bound, or
    the `clip` rule's C). uniform: every update weighs 1 (times its staleness discount)
    whatever examples it claims: the `clip` rule and central DP, where one device's
    influence must be bounded by C. noise_std > 0 adds Gaussian noise of that standard
    deviation to every coordinate of the sum before it is divided (central DP)."""

    streaming = True  # memory O(model): the journal's snapshots hold its whole state

    def __init__(self, *, specs: tuple[TensorSpec, ...], clip_to: float = 0.0,
                 uniform: bool = False, noise_std: float = 0.0,
                 rng: np.random.Generator | None = None) -> None:  # fmt: skip
        if not specs:
            raise ValueError("a running sum needs at least one tensor spec")
        if clip_to < 0 or noise_std < 0:
            raise ValueError("clip_to and noise_std must be >= 0")
        self.specs = specs
        self.sums = {s.name: np.zeros(s.shape, dtype=np.float64) for s in specs}
        self.total_weight = 0.0  # what mean() divides by
        self.count = 0
        self.clip_to = clip_to
        self.uniform = uniform
        self.noise_std = noise_std
        # the noise must be unpredictable to devices: OS entropy unless a test passes a seed
        self.rng = rng if rng is not None else np.random.default_rng()

    def add(
        self, delta: Mapping[str, Decoded], weight: float, *, norm: float | None = None
    ) -> None:
        """Fold one validated delta in with its weight (usually its example count).

        norm, when given, is what this update adds to the divisor instead of its weight:
        FedBuff weighs by examples x staleness discount but divides by examples, so that
        stale updates move the model less.
        """
        self.add_prepared(self.prepare(delta, weight, norm=norm))

    def prepare(
        self, delta: Mapping[str, Decoded], weight: float, *, norm: float | None = None
    ) -> Prepared:
        """The weighted float64 contribution of one delta; touches no state, so it may run
        on another thread while the sum takes earlier updates (the same numbers either way)."""
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        divisor = weight if norm is None else norm
        if self.uniform:  # one vote each, discounted by staleness (weight / norm) in async
            weight, divisor = weight / divisor, 1.0
        l2 = update_norm(delta)
        scale = clip_scale(l2, self.clip_to)
        factor = weight * scale
        parts: dict[str, Contribution] = {}
        for name in self.sums:
            t = delta[name]
            if isinstance(t, SparseTensor):
                parts[name] = (t.indices, factor * t.values.astype(np.float64))
            else:
                parts[name] = factor * np.asarray(t, dtype=np.float64)
        return Prepared(parts=parts, norm=divisor, l2=l2, clipped=scale < 1.0)

    def add_prepared(self, p: Prepared) -> None:
        """Fold in a prepared contribution."""
        for name, acc in self.sums.items():
            part = p.parts[name]
            if isinstance(part, tuple):
                # indices are unique (checked when decoded): add.at adds each value once,
                # like += on the view, and numpy 2 runs it about twice as fast
                np.add.at(acc.reshape(-1), part[0], part[1])
            else:
                acc += part
        self.total_weight += p.norm
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta; ValueError if nothing was added."""
        if self.count == 0 or not self.total_weight > 0:
            raise ValueError("no updates were added, there is no mean")
        if self.noise_std > 0:
            return {name: (acc + self.rng.normal(0.0, self.noise_std, size=acc.shape))
                    / self.total_weight for name, acc in self.sums.items()}  # fmt: skip
        return {name: acc / self.total_weight for name, acc in self.sums.items()}


def apply_delta(
    weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], *, server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """New global weights: weights + server_lr * delta, kept in each tensor's dtype
    (a value beyond the dtype becomes inf: the caller checks the model before using it)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return {
            name: (w + server_lr * delta[name]).astype(w.dtype, copy=False)
            for name, w in weights.items()
        }


def aggregate(
    weights: Mapping[str, np.ndarray], results: list[tuple[Mapping[str, np.ndarray], float]]
) -> dict[str, np.ndarray]:
    """FedAvg in one call: the global weights plus the example-weighted mean of deltas."""
    acc = RunningSum(
        specs=tuple(TensorSpec(n, "float32", tuple(w.shape)) for n, w in weights.items())
    )
    for delta, weight in results:
        acc.add(delta, weight)
    return apply_delta(weights, acc.mean())


class AggregationRule(Protocol):
    """What the service folds admitted updates into: FedAvg's running sum (with clipping
    and noise) or a robust rule of aggregator.robust; secure aggregation plugs in here."""

    total_weight: float
    count: int
    streaming: bool  # False: it keeps every update, a restart replays them all

    def add(self, delta: Mapping[str, Decoded], weight: float, *, norm: float | None = None
            ) -> None: ...  # fmt: skip

    def prepare(self, delta: Mapping[str, Decoded], weight: float, *,
                norm: float | None = None) -> Prepared:  # fmt: skip
        """Per-update work that needs no state (it runs on a decoding thread)."""

    def add_prepared(self, p: Prepared) -> None:
        """Fold a prepared update in; called in arrival order."""

    def mean(self) -> dict[str, np.ndarray]: ...


class ServerOptimizer(Protocol):
    """What turns the round's mean delta into the next global weights (plain server SGD
    with ServerSGD, FedAvgM and the adaptive ones with aggregator.server_opt.FedOpt, whose
    state is kept per version in the state directory)."""

    def step(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global weights; any state moves on only at commit."""

    def commit(self, version: int) -> None:
        """The last step's weights became `version`: keep (durably) the state that made them."""

    def resume(self, version: int, quarantine: Path) -> int:
        """Take the state saved with the committed `version`; the files moved into
        `quarantine` (a state that cannot be trusted: the optimiser starts afresh)."""


class ServerSGD:
    """weights + lr * mean delta: FedAvg with a server learning rate."""

    def __init__(self, *, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"server learning rate must be positive, got {lr}")
        self.lr = lr

    def step(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global weights."""
        return apply_delta(weights, delta, server_lr=self.lr)

    def commit(self, version: int) -> None:
        """Stateless: nothing to keep."""

    def resume(self, version: int, quarantine: Path) -> int:
        """Stateless: nothing to take."""
        return 0

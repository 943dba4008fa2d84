"""FedAvg as a running weighted sum: memory O(model), not O(devices).

Pure numpy. Each accepted update is folded in as it arrives; closing a round divides by
the total weight and applies the mean delta to the global weights. A sparse update is
scattered into the sum at its indices: no dense per-device copy is ever made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmq.codecs import Decoded, SparseTensor
from fedmq.wire import TensorSpec

# a dense weighted delta, or (flat indices, weighted values) of a sparse one
Contribution = np.ndarray | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Prepared:
    """One update's weighted contribution to a sum, and what it adds to the divisor."""

    parts: dict[str, Contribution]
    norm: float


class RunningSum:
    """A weighted sum of deltas, one float64 accumulator per tensor."""

    def __init__(self, *, specs: tuple[TensorSpec, ...]) -> None:
        if not specs:
            raise ValueError("a running sum needs at least one tensor spec")
        self.specs = specs
        self.sums = {s.name: np.zeros(s.shape, dtype=np.float64) for s in specs}
        self.total_weight = 0.0  # what mean() divides by
        self.count = 0

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
        parts: dict[str, Contribution] = {}
        for name in self.sums:
            t = delta[name]
            if isinstance(t, SparseTensor):
                parts[name] = (t.indices, weight * t.values.astype(np.float64))
            else:
                parts[name] = weight * np.asarray(t, dtype=np.float64)
        return Prepared(parts=parts, norm=weight if norm is None else norm)

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
    """What the service folds admitted updates into (FedAvg's running sum today; robust
    rules, clipping + noise or secure aggregation plug in here)."""

    total_weight: float
    count: int

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
    today; momentum, Adam, Yogi plug in here, their state kept in the state directory)."""

    def step(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]: ...


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

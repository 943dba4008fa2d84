"""Central differential privacy: the (epsilon, delta) a run has spent, from Google's
dp-accounting library (RDP accountant, Poisson-sampled Gaussian mechanism).

Each round that closes with noise is one sampled Gaussian mechanism: every enrolled
device takes part with probability q = selected / enrolled, its clipped update (L2 <= C)
moves the sum by at most C, and the sum gets N(0, (z C)^2) noise on every coordinate.
The unit of privacy is a device (user-level DP, as DP-FedAvg): epsilon bounds what the
published models reveal about whether any one device took part, whatever its data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting import rdp


class _SkippedOrders(logging.Filter):
    """dp-accounting warns each time an RDP order does not converge for a sampled event and
    leaves that order out: epsilon is then the minimum over the other orders, still an upper
    bound. Once per order per round would drown the aggregator's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrders())


def _event(noise_multiplier: float, q: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def epsilon_of(steps: Sequence[tuple[float, float, int]], delta: float) -> float:
    """The epsilon at delta after rounds of (noise multiplier z, sampling rate q, count)."""
    acc = rdp.RdpAccountant()
    for z, q, count in steps:
        acc.compose(_event(z, q), count)
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(*, epsilon: float, delta: float, rounds: int, q: float) -> float:
    """The noise multiplier z that spends exactly epsilon at delta over `rounds` rounds."""
    if not epsilon > 0 or not 0 < delta < 1 or rounds < 1 or not 0 < q <= 1:
        raise ValueError("a target epsilon needs epsilon > 0, 0 < delta < 1, rounds >= 1 "
                         "and 0 < q <= 1")  # fmt: skip
    z = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, lambda z: dp_accounting.SelfComposedDpEvent(_event(z, q), rounds),
        epsilon, delta,
    )  # fmt: skip
    return float(z)


@dataclass
class PrivacySpent:
    """The rounds a run has released with noise, as (z, q, count) runs; kept in state.json."""

    delta: float
    steps: list[tuple[float, float, int]] = field(default_factory=list)

    def record(self, *, noise_multiplier: float, q: float) -> float:
        """Account for one more noised round; the epsilon spent so far."""
        q = min(1.0, max(q, 0.0))
        if self.steps and self.steps[-1][:2] == (noise_multiplier, q):
            z, q0, n = self.steps[-1]
            self.steps[-1] = (z, q0, n + 1)
        else:
            self.steps.append((noise_multiplier, q, 1))
        return self.epsilon

    @property
    def rounds(self) -> int:
        return sum(n for _z, _q, n in self.steps)

    @property
    def epsilon(self) -> float:
        """The epsilon spent at delta (0 before any noised round)."""
        return epsilon_of(self.steps, self.delta) if self.steps else 0.0

    def to_json(self) -> dict[str, object]:
        """For state.json."""
        return {"delta": self.delta, "steps": [list(s) for s in self.steps]}

    @classmethod
    def from_json(cls, obj: dict[str, object] | None, *, delta: float) -> PrivacySpent:
        """Back from state.json (a fresh ledger when there is none)."""
        if not obj:
            return cls(delta=delta)
        raw = obj.get("steps", [])
        steps = [(float(z), float(q), int(n)) for z, q, n in raw] if isinstance(raw, list) else []
        return cls(delta=delta, steps=steps)


def local_noise_for_epsilon(*, epsilon: float, delta: float, rounds: int) -> float:
    """Local DP (edge_agent.privacy): the noise multiplier that spends epsilon at delta per
    device over `rounds` updates. Any two clipped deltas differ by up to 2 x clip, so the
    Gaussian mechanism's multiplier against that sensitivity is half the one against clip."""
    return 2.0 * noise_for_epsilon(epsilon=epsilon, delta=delta, rounds=rounds, q=1.0)


def local_epsilon(*, noise_multiplier: float, delta: float, rounds: int) -> float:
    """Local DP: the epsilon per device after `rounds` updates privatized with this
    multiplier (every one released: no sampling amplification is claimed)."""
    return epsilon_of([(noise_multiplier / 2.0, 1.0, rounds)], delta)

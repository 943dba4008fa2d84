"""What the admission bounds and central DP carry from one round to the next, pure.

The adaptive L2 bound and example cap learn from the last closed round's accepted updates
(their median norm and median claimed example count); central DP has a noise multiplier
fixed at start and a privacy spent that grows with every round. All of it is kept in
state.json with the round that made it (`to_state` / `load_state`), so a restart
continues with the same bounds and the same epsilon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.bounds import adaptive_bound, first_round_bound, round_example_cap
from aggregator.privacy import PrivacySpent, noise_for_epsilon
from aggregator.robust import round_bound
from aggregator.settings import AggregatorSettings


class RoundGuards:
    """The bounds a round opens with, and the privacy each closed round spends."""

    def __init__(self, s: AggregatorSettings, *, enrolled_count: int = 0) -> None:
        self.s = s
        # devices a round could have sampled (q = selected / enrolled); 0: unknown
        self.enrolled_count = enrolled_count
        self.median_norm = 0.0  # the median L2 norm of the last closed round's updates
        self.median_examples = 0.0  # and their median example count (as claimed)
        self.privacy = PrivacySpent(delta=s.dp_delta)
        self.noise_multiplier = s.dp_noise_multiplier or (noise_for_epsilon(
            epsilon=s.dp_epsilon, delta=s.dp_delta, rounds=s.rounds,
            q=self.sample_rate(self.expected_selected())) if s.dp_epsilon else 0.0)  # fmt: skip

    def expected_selected(self) -> int:
        """How many devices a round will select, as far as the settings say."""
        p = self.s.policy
        n = self.enrolled_count or p.target
        return min(n, int(p.target * (1 + p.over_select) + 0.999999)) if p.target else n

    def sample_rate(self, selected: int) -> float:
        """q = selected / enrolled; 1 without a fleet file (no amplification is claimed)."""
        if not self.enrolled_count or selected <= 0:
            return 1.0
        return min(1.0, selected / self.enrolled_count)

    def bounds(self, base_weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The next round's norm bound: fixed, or k x the last round's median norm (the
        model's own norm before any round closed)."""
        s = self.s
        bound = round_bound(fixed=s.norm_bound, factor=s.norm_bound_factor,
                            median_norm=self.median_norm)  # fmt: skip
        if not bound and s.norm_bound_factor and not self.median_norm:
            bound = first_round_bound(base_weights)  # no median to learn from yet
        return {"bound": bound, "median_norm": self.median_norm}

    def example_cap(self) -> int:
        """The next round's adaptive example cap: k x the median claim of the last closed
        round's accepted updates; 1 (alike) before the first round closed."""
        return round_example_cap(self.s.examples_factor, self.median_examples)

    def account(self, participants: Sequence[Mapping[str, Any]], *, example_cap: int,
                selected: int) -> dict[str, Any]:  # fmt: skip
        """After a round closed: learn the next bounds from its accepted updates and, with
        central DP, record the privacy it spent; what the round's history line says."""
        norms = [float(p["l2"]) for p in participants if "l2" in p]
        self.median_norm = adaptive_bound(norms, 1.0) or self.median_norm
        # claims, not what they were capped to: the median of the honest majority's claims
        examples = [float(p.get("examples_claimed", p.get("examples", 0)))
                    for p in participants]  # fmt: skip
        self.median_examples = adaptive_bound(examples, 1.0) or self.median_examples
        out: dict[str, Any] = {"rule": self.s.rule, "median_l2": round(self.median_norm, 6),
                               "example_cap": example_cap}  # fmt: skip
        if self.noise_multiplier:
            q = self.sample_rate(selected)
            eps = self.privacy.record(noise_multiplier=self.noise_multiplier, q=q)
            out.update(dp_epsilon=eps, dp_delta=self.s.dp_delta,
                       dp_noise_multiplier=self.noise_multiplier, dp_sample_rate=q)  # fmt: skip
        return out

    def privacy_status(self) -> dict[str, Any] | None:
        """The privacy spent so far, for the status document; None without central DP."""
        if not self.noise_multiplier:
            return None
        return {"epsilon": self.privacy.epsilon, "delta": self.s.dp_delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.s.clip_norm,
                "rounds": self.privacy.rounds}  # fmt: skip

    def to_state(self) -> dict[str, Any]:
        """What state.json keeps of it."""
        return {"median_norm": self.median_norm, "median_examples": self.median_examples,
                "privacy": self.privacy.to_json()}  # fmt: skip

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from what state.json kept."""
        self.median_norm = float(state.get("median_norm", 0.0))
        self.median_examples = float(state.get("median_examples", 0.0))
        self.privacy = PrivacySpent.from_json(state.get("privacy"), delta=self.s.dp_delta)

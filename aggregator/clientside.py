"""The aggregator's share of the client-side strategies, behind a few hooks of the
service: SCAFFOLD's server control variate (aggregator.scaffold) and FedNova's local-work
normalisation (aggregator.localwork). With client_correction = "none" and
normalize_local_work off every hook is the identity: FedAvg bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.fedavg import AggregationRule
from aggregator.localwork import normalize, rescale, tau_effective
from aggregator.modes import Contribution
from aggregator.scaffold import ScaffoldRule, ServerControl
from aggregator.store import Store
from fedmq.correction import update_specs
from fedmq.wire import TensorSpec, TrainConfig, Update, encode_weights


class ClientSide:
    """SCAFFOLD and FedNova on the aggregator, as the settings ask."""

    def __init__(self, *, specs: tuple[TensorSpec, ...], train: TrainConfig,
                 normalize_local_work: bool, store: Store | None = None) -> None:  # fmt: skip
        self.specs, self.train = specs, train
        self.update_specs = update_specs(specs, train.correction)
        self.normalize = normalize_local_work
        self.control = (ServerControl(specs=specs, store=store)
                        if train.correction == "scaffold" else None)  # fmt: skip

    def rule(self, inner: AggregationRule) -> AggregationRule:
        """The round's rule; with SCAFFOLD wrapped to take the control deltas too."""
        if self.control is None:
            return inner
        return ScaffoldRule(inner=inner, specs=self.specs, lr=self.train.lr,
                            c_norm=self.control.norm())  # fmt: skip

    def weigh(self, given: Contribution, u: Update) -> Contribution:
        """An admitted update's contribution (FedNova: weight / tau_i); SchemaError when
        its reported local steps are implausible."""
        return normalize(given, u, self.train) if self.normalize else given

    def mean(self, acc: AggregationRule,
             participants: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:  # fmt: skip
        """The round's mean delta (FedNova: times tau_eff); for SCAFFOLD the next server
        control variate is computed too (adopted at commit)."""
        mean = acc.mean()
        people = list(participants)
        if self.normalize:
            mean = rescale(mean, tau_effective(people))
        if self.control is not None:
            self.control.pending = None  # a step of a refused round is never adopted
        if self.control is not None and isinstance(acc, ScaffoldRule) and acc.control_count:
            # N: every device that could have taken part is at least every one that did
            self.control.step(acc.mean_control(), participating=acc.control_count,
                              population=max(self.population, acc.control_count))  # fmt: skip
        return mean

    population = 0  # the service sets the fleet's size (enrolled or seen) before closing

    def commit(self, version: int) -> None:
        """`version` exists: keep SCAFFOLD's c with it."""
        if self.control is not None:
            self.control.commit(version)

    def resume(self, version: int, quarantine: Path) -> int:
        """Take the committed version's c; the files moved into quarantine."""
        return self.control.resume(version, quarantine) if self.control is not None else 0

    def control_body(self) -> bytes:
        """c as devices fetch it (float32 weights blob), b"" without SCAFFOLD."""
        return encode_weights(self.control.published) if self.control is not None else b""

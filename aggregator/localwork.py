"""FedNova-style local-work normalisation on the aggregator (setting normalize_local_work).

Each admitted update's weight is divided by the local steps tau_i its device reports in
its metrics (`local_steps`; a device that reports none is taken to have done the
announced work, epochs x ceil(n / B)); the divisor stays its example count. At close the
round's mean is multiplied by tau_eff, the example-weighted mean of the tau_i: the
round's delta is tau_eff sum_i p_i delta_i / tau_i (Wang et al. 2020, plain SGD). A
reported tau_i outside what its example count allows is refused with a reason (a small
claim would raise its weight). Off, nothing here runs: FedAvg bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from aggregator.modes import Contribution
from fedmq.correction import check_local_steps, effective_steps, expected_steps
from fedmq.errors import SchemaError
from fedmq.wire import TrainConfig, Update

STEPS_METRIC = "local_steps"


def local_steps(u: Update, train: TrainConfig) -> int:
    """The tau_i of an update: reported, or the announced work; SchemaError if implausible."""
    steps = u.metrics.get(STEPS_METRIC)
    if steps is None:
        return expected_steps(u.num_examples, epochs=train.epochs, batch_size=train.batch_size)
    why = check_local_steps(steps, num_examples=u.num_examples, epochs=train.epochs,
                            batch_size=train.batch_size)  # fmt: skip
    if why:
        raise SchemaError(why)
    return int(steps)


def normalize(given: Contribution, u: Update, train: TrainConfig) -> Contribution:
    """The contribution with its weight divided by tau_i (recorded as local_steps)."""
    tau = local_steps(u, train)
    return dataclasses.replace(given, weight=given.weight / tau,
                               record={**given.record, STEPS_METRIC: tau})  # fmt: skip


def tau_effective(participants: Iterable[Mapping[str, Any]]) -> float:
    """tau_eff of a closed round's accepted updates (example-weighted mean local steps)."""
    return effective_steps((float(p["examples"]), float(p[STEPS_METRIC]))
                           for p in participants if STEPS_METRIC in p)  # fmt: skip


def rescale(mean: Mapping[str, np.ndarray], tau_eff: float) -> dict[str, np.ndarray]:
    """The round's normalised mean times tau_eff."""
    return {k: v * tau_eff for k, v in mean.items()}

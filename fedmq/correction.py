"""Client-side drift correction (SCAFFOLD) and local-work normalisation (FedNova): the
names both sides agree on, and the pure arithmetic.

SCAFFOLD (Karimireddy et al., ICML 2020, option II control variates). The aggregator
keeps a server control variate c, each device its own c_i (zero until its first round).
A device's local step uses the corrected gradient g - c_i + c; after K steps of rate lr
it sets c_i+ = c_i - c + (x - y_i) / (K lr), x the global weights it started from and
y_i its trained weights, and sends its model delta y_i - x together with its control
delta c_i+ - c_i as extra tensors named CONTROL_PREFIX + <tensor> in the same update
body (the same codec compresses both). The aggregator adds |S|/N times the plain mean of
the control deltas to c.

FedNova (Wang et al., NeurIPS 2020), plain local SGD (a_i = tau_i): the round's delta is
tau_eff * sum_i p_i delta_i / tau_i with tau_eff = sum_i p_i tau_i, p_i the example
weights, so a device that stopped early (a time budget) weighs as much per unit of work
as one that did all its steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedmq.wire import TensorSpec

CORRECTIONS = ("none", "scaffold")
CONTROL_PREFIX = "control/"
# an honest control delta has L2 <= ||c|| + ||delta|| / lr (K >= 1); this much slack covers
# the codec's rounding before a larger one is refused as implausible
CONTROL_SLACK = 2.0
MAX_LOCAL_STEPS = 10_000_000
Tensors = dict[str, np.ndarray]


def control_name(name: str) -> str:
    """The update-body name of a tensor's control delta."""
    return CONTROL_PREFIX + name


def control_specs(specs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The control-delta tensors an update carries in a SCAFFOLD round (float32)."""
    return tuple(TensorSpec(control_name(s.name), "float32", s.shape) for s in specs)


def update_specs(specs: tuple[TensorSpec, ...], correction: str) -> tuple[TensorSpec, ...]:
    """What an update body must hold: the model's tensors, plus their control deltas when
    the rounds announce SCAFFOLD."""
    if correction not in CORRECTIONS:
        raise ValueError(f"client_correction must be one of {', '.join(CORRECTIONS)}, "
                         f"got {correction!r}")  # fmt: skip
    return specs + control_specs(specs) if correction == "scaffold" else specs


def split_control(tensors: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(the model's tensors, the control deltas keyed by the model tensor's name)."""
    model: dict[str, object] = {}
    control: dict[str, object] = {}
    for name, t in tensors.items():
        if name.startswith(CONTROL_PREFIX):
            control[name[len(CONTROL_PREFIX):]] = t
        else:
            model[name] = t
    return model, control


# ---------------------------------------------------------------- SCAFFOLD, device side


def zeros_like(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A control variate of zeros (float32) for these tensors."""
    return {k: np.zeros(np.shape(w), dtype=np.float32) for k, w in weights.items()}


def gradient_correction(c_server: Mapping[str, np.ndarray],
                        c_local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # fmt: skip
    """c - c_i, added to every local gradient (float32)."""
    return {k: (np.asarray(c_server[k], np.float32) - np.asarray(c_local[k], np.float32))
            for k in c_server}  # fmt: skip


def control_delta(*, c_server: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
                  steps: int, lr: float) -> dict[str, np.ndarray]:  # fmt: skip
    """c_i+ - c_i of option II: -c + (x - y_i) / (K lr) = -(c + delta / (K lr)), computed in
    float64 and returned float32; delta = y_i - x, K = steps taken (>= 1)."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"a control delta needs steps >= 1 and lr > 0, got {steps}, {lr}")
    scale = 1.0 / (steps * lr)
    return {k: (-(np.asarray(c_server[k], np.float64) + np.asarray(d, np.float64) * scale)
                ).astype(np.float32) for k, d in delta.items()}  # fmt: skip


# ---------------------------------------------------------------- SCAFFOLD, server side


def next_server_control(c: Mapping[str, np.ndarray], mean_dc: Mapping[str, np.ndarray], *,
                        participating: int, population: int) -> dict[str, np.ndarray]:  # fmt: skip
    """c + (|S| / N) mean_S(c_i+ - c_i), in float64 (N at least |S|)."""
    frac = participating / max(participating, population, 1)
    return {k: np.asarray(v, np.float64) + frac * np.asarray(mean_dc[k], np.float64)
            for k, v in c.items()}  # fmt: skip


def control_bound(*, delta_l2: float, c_l2: float, lr: float) -> float:
    """The largest L2 an honest control delta can have with this model delta: ||c|| +
    ||delta|| / lr (K >= 1), with CONTROL_SLACK for the codec's rounding."""
    return CONTROL_SLACK * (c_l2 + delta_l2 / lr) + 1e-6


# ---------------------------------------------------------------- FedNova


def expected_steps(num_examples: int, *, epochs: int, batch_size: int) -> int:
    """The local steps an update of num_examples made under the announced config, for a
    device that does not report them: epochs x ceil(n / B)."""
    return max(1, epochs * math.ceil(num_examples / batch_size))


def check_local_steps(steps: float, *, num_examples: int, epochs: int,
                      batch_size: int) -> str:  # fmt: skip
    """"" when a reported tau_i is plausible, else why not: an integer between
    ceil(n / B) (every batch at most B) and epochs x n (batches of one)."""
    if not (math.isfinite(steps) and steps == int(steps)):
        return f"local_steps {steps!r} is not an integer"
    low = max(1, math.ceil(num_examples / batch_size))
    high = min(MAX_LOCAL_STEPS, max(low, epochs * num_examples))
    if not low <= steps <= high:
        return (f"local_steps {int(steps)} is implausible for {num_examples} examples "
                f"(between {low} and {high})")  # fmt: skip
    return ""


def effective_steps(work: Iterable[tuple[float, float]]) -> float:
    """tau_eff = sum p_i tau_i over (weight, tau_i) pairs (p_i = weight / total)."""
    pairs = list(work)
    total = sum(w for w, _ in pairs)
    if not total > 0:
        raise ValueError("no work to normalise")
    return sum(w * t for w, t in pairs) / total


def fednova_mean(deltas: list[tuple[Mapping[str, np.ndarray], float, float]]
                 ) -> dict[str, np.ndarray]:  # fmt: skip
    """The reference FedNova mean of (delta, weight, tau) triples, float64:
    tau_eff * sum p_i delta_i / tau_i."""
    total = sum(w for _, w, _ in deltas)
    tau_eff = effective_steps((w, t) for _, w, t in deltas)
    out: Tensors = {}
    for k in deltas[0][0]:
        acc = np.zeros(np.shape(deltas[0][0][k]), dtype=np.float64)
        for d, w, t in deltas:
            acc += (w / total) * np.asarray(d[k], np.float64) / t
        out[k] = tau_eff * acc
    return out


def with_control(*, base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
                 c_server: Mapping[str, np.ndarray], c_local: Mapping[str, np.ndarray],
                 steps: int, lr: float) -> tuple[Tensors, Tensors, Tensors]:  # fmt: skip
    """A device's SCAFFOLD round end: (base, trained) extended by c_i and c_i+ under the
    control names, so that trained - base is the update body (model delta and control
    delta, compressed together by edge_agent.updates.build_update), and c_i+ to keep."""
    delta = {k: np.asarray(trained[k], np.float32) - np.asarray(base[k], np.float32)
             for k in base}  # fmt: skip
    dc = control_delta(c_server=c_server, delta=delta, steps=steps, lr=lr)
    c_new = {k: (np.asarray(c_local[k], np.float32) + dc[k]).astype(np.float32) for k in dc}
    return ({**base, **{control_name(k): np.asarray(c_local[k], np.float32) for k in dc}},
            {**trained, **{control_name(k): c_new[k] for k in dc}}, c_new)  # fmt: skip

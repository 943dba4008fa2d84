"""Server optimisers on the round's mean delta (the pseudo-gradient): FedAvgM, FedAdam,
FedYogi and FedAdagrad, as in Reddi et al. 2021, "Adaptive Federated Optimization"
(Algorithm 2; FedAvgM as in Hsu et al. 2019), with their state kept per version.

The arithmetic is pure numpy in float64: the moments are float64 whatever the model's
dtype, each step is computed in float64 and the new weights are cast back to each
tensor's own dtype. With the mean delta d (a float64 dict from the aggregation rule):

    avgm     m = b1 m + d                                   w += lr m
    adam     m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2   w += lr m / (sqrt(v) + tau)
    yogi     m as adam, v = v - (1 - b2) d^2 sign(v - d^2)    w += lr m / (sqrt(v) + tau)
    adagrad  m as adam, v = v + d^2                          w += lr m / (sqrt(v) + tau)

v starts at tau^2 (the paper's v_-1 >= tau^2), m at 0; no bias correction (as in the
paper). `step` changes nothing: `commit(version)` adopts the state that made `version`
once that version exists, so a refused model or a crash before the commit point leaves
the state of the committed version, and a round closed again after a restart steps from
that same state (never twice). The state of each version is saved next to it
(`versions/<version>.opt`, see aggregator.store) and loaded at start by `resume`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.fedavg import ServerOptimizer, ServerSGD
from aggregator.globals import ModelRefused
from aggregator.store import Store
from fedmq.errors import ProtocolError
from fedmq.wire import TensorSpec, check_tensors, decode_weights, encode_weights
from fedmq.wire.framing import get_field, pack_message, unpack_message

log = logging.getLogger("fedmq.aggregator")

SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi", "adagrad")
ADAPTIVE = ("adam", "yogi", "adagrad")
# server_lr = 0 takes these (see default_server_lr)
DEFAULT_SERVER_LR = {"sgd": 1.0, "avgm": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.1}
STATE_KIND = "server_opt"
MAX_STATE_BYTES = 2 * 1024 * 1024 * 1024  # two float64 copies of a model up to ~128M params


def default_server_lr(optimizer: str) -> float:
    """The server learning rate server_lr = 0 stands for: 1 for sgd (FedAvg) and avgm,
    1e-2 for adam and yogi, 1e-1 for adagrad (where Reddi et al.'s tuned rates mostly lie)."""
    return DEFAULT_SERVER_LR[optimizer]


@dataclass(frozen=True)
class OptState:
    """What an optimiser carries from one version to the next: steps taken, the first
    moment (avgm: the velocity) and, for the adaptive ones, the second moment."""

    step: int
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]  # empty for avgm


def fresh_state(kind: str, specs: tuple[TensorSpec, ...], tau: float) -> OptState:
    """The state before the first step: m = 0 and, for adaptive rules, v = tau^2."""
    m = {s.name: np.zeros(s.shape, dtype=np.float64) for s in specs}
    v = ({s.name: np.full(s.shape, tau * tau, dtype=np.float64) for s in specs}
         if kind in ADAPTIVE else {})  # fmt: skip
    return OptState(step=0, m=m, v=v)


def opt_step(kind: str, state: OptState, delta: Mapping[str, np.ndarray], *, b1: float,
             b2: float, tau: float) -> tuple[dict[str, np.ndarray], OptState]:  # fmt: skip
    """(the float64 step to add to the weights, lr not applied; the next state)."""
    steps: dict[str, np.ndarray] = {}
    m_next: dict[str, np.ndarray] = {}
    v_next: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # checked by the caller
        for name, m in state.m.items():
            d = np.asarray(delta[name], dtype=np.float64)
            if kind == "avgm":
                m_next[name] = b1 * m + d
                steps[name] = m_next[name]
                continue
            m_next[name] = b1 * m + (1.0 - b1) * d
            v, d2 = state.v[name], d * d
            if kind == "adam":
                v_next[name] = b2 * v + (1.0 - b2) * d2
            elif kind == "yogi":
                v_next[name] = v - (1.0 - b2) * d2 * np.sign(v - d2)
            else:  # adagrad
                v_next[name] = v + d2
            steps[name] = m_next[name] / (np.sqrt(v_next[name]) + tau)
    return steps, OptState(step=state.step + 1, m=m_next, v=v_next)


def encode_opt_state(kind: str, state: OptState) -> bytes:
    """An optimiser's state as the bytes of a `.opt` file (msgpack, tensors as in `weights`)."""
    tensors = {f"m/{k}": a for k, a in state.m.items()} | {f"v/{k}": a for k, a in state.v.items()}
    return pack_message(STATE_KIND, {"optimizer": kind, "step": state.step,
                                     "tensors": encode_weights(tensors)})  # fmt: skip


def decode_opt_state(blob: bytes, kind: str, specs: tuple[TensorSpec, ...]) -> OptState:
    """Inverse of encode_opt_state, checked against the model's specs (float64, finite, v >= 0);
    ProtocolError or ValueError when it cannot be trusted."""
    obj = unpack_message(blob, STATE_KIND, MAX_STATE_BYTES)
    if get_field(obj, "optimizer", "str") != kind:
        raise ValueError(f"it is the state of {obj['optimizer']!r}, not {kind!r}")
    step = get_field(obj, "step", "int")
    if step < 0:
        raise ValueError(f"step {step} is negative")
    tensors = decode_weights(get_field(obj, "tensors", "bytes"), max_bytes=MAX_STATE_BYTES)
    parts = ("m", "v") if kind in ADAPTIVE else ("m",)
    want = tuple(TensorSpec(f"{p}/{s.name}", "float64", s.shape) for p in parts for s in specs)
    check_tensors(tensors, want, what="server optimiser state")
    if kind in ADAPTIVE and any((tensors[f"v/{s.name}"] < 0).any() for s in specs):
        raise ValueError("its second moment has negative values")
    return OptState(step=step, m={s.name: tensors[f"m/{s.name}"].copy() for s in specs},
                    v={s.name: tensors[f"v/{s.name}"].copy() for s in specs
                       if kind in ADAPTIVE})  # fmt: skip


class FedOpt:
    """FedAvgM or an adaptive server optimiser (Reddi et al.'s FedOpt); its state is saved
    with every version (when a store is given) and resumed from the committed one."""

    def __init__(self, *, kind: str, specs: tuple[TensorSpec, ...], lr: float,
                 momentum: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 store: Store | None = None) -> None:  # fmt: skip
        if kind not in SERVER_OPTIMIZERS or kind == "sgd":
            raise ValueError(f"kind must be one of avgm, {', '.join(ADAPTIVE)}, got {kind!r}")
        check_hyperparameters(lr=lr, momentum=momentum, beta2=beta2, tau=tau)
        self.kind, self.specs, self.lr = kind, specs, lr
        self.b1, self.b2, self.tau = momentum, beta2, tau
        self.store = store
        self.state = fresh_state(kind, specs, tau)
        self.pending: OptState | None = None  # made by step, adopted by commit

    def step(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global weights, in each tensor's dtype; the state moves on at commit.
        ModelRefused when the new state would not be finite (an absurd mean delta)."""
        steps, nxt = opt_step(self.kind, self.state, delta, b1=self.b1, b2=self.b2,
                              tau=self.tau)  # fmt: skip
        for part in (nxt.m, nxt.v):
            for name, a in part.items():
                if not np.isfinite(a).all():
                    raise ModelRefused(f"the {self.kind} server optimiser's state of tensor "
                                       f"{name!r} would not be finite")  # fmt: skip
        self.pending = nxt
        with np.errstate(over="ignore", invalid="ignore"):
            return {name: (w.astype(np.float64) + self.lr * steps[name]).astype(w.dtype)
                    for name, w in weights.items()}  # fmt: skip

    def commit(self, version: int) -> None:
        """The weights of the last step became `version`: adopt its state and save it
        (atomically) next to the version, before state.json names it."""
        if self.pending is None:
            raise RuntimeError("commit without a step")
        self.state, self.pending = self.pending, None
        if self.store is None:
            return
        try:
            self.store.save_optimizer(version, encode_opt_state(self.kind, self.state))
        except OSError as err:  # the version exists already: a restart would start afresh
            log.error("could not save the %s server optimiser state of version %d (%s); a "
                      "restart at this version starts it afresh", self.kind, version, err)

    def resume(self, version: int, quarantine: Path) -> int:
        """Take the state saved with the committed `version`; returns the files moved into
        `quarantine`. A state that is missing (version 0, or another optimiser before)
        or cannot be trusted (moved aside, logged) is not fatal: the optimiser starts
        afresh (m = 0, v = tau^2) from that version's weights."""
        self.state, self.pending = fresh_state(self.kind, self.specs, self.tau), None
        blob = self.store.load_optimizer(version) if self.store is not None else None
        if blob is None:
            if version > 0:
                log.warning("no %s server optimiser state for version %d: it starts afresh "
                            "from that version", self.kind, version)  # fmt: skip
            return 0
        try:
            self.state = decode_opt_state(blob, self.kind, self.specs)
        except (ProtocolError, ValueError, KeyError) as err:
            assert self.store is not None
            moved = self.store.quarantine_optimizer(version, quarantine)
            log.warning("server optimiser state of version %d cannot be trusted (%s): moved "
                        "to %s; the %s optimiser starts afresh from that version",
                        version, err, moved, self.kind)  # fmt: skip
            return 1
        log.info("resumed the %s server optimiser at version %d after %d steps",
                 self.kind, version, self.state.step)  # fmt: skip
        return 0


def check_hyperparameters(*, lr: float, momentum: float, beta2: float, tau: float) -> None:
    """ValueError, with a sentence a user can act on, unless the values make sense."""
    if not (0 < lr <= 100 and 0 <= momentum < 1 and 0 <= beta2 < 1 and 0 < tau <= 10):
        raise ValueError(f"server optimiser needs 0 < server_lr <= 100, server_momentum and "
                         f"server_beta2 in [0, 1), 0 < server_tau <= 10; got lr={lr}, "
                         f"momentum={momentum}, beta2={beta2}, tau={tau}")  # fmt: skip


def make_server_optimizer(settings: Any, specs: tuple[TensorSpec, ...],
                          store: Store | None = None) -> ServerOptimizer:  # fmt: skip
    """The settings' server optimiser (sgd: plain ServerSGD, FedAvg bit for bit)."""
    s = settings
    lr = s.server_lr or default_server_lr(s.server_optimizer)
    if s.server_optimizer == "sgd":
        return ServerSGD(lr=lr)
    return FedOpt(kind=s.server_optimizer, specs=specs, lr=lr,
                                  momentum=s.server_momentum, beta2=s.server_beta2,
                                  tau=s.server_tau, store=store)  # fmt: skip

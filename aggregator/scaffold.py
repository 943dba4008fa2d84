"""SCAFFOLD on the aggregator: the server control variate c, kept per version, and the
aggregation rule that takes each update's control delta next to its model delta.

`ServerControl` works like aggregator.server_opt.FedOpt: `step` computes the next c from
a round's mean control delta and changes nothing; `commit(version)` adopts it once that
version exists and saves it next to the version (`versions/<v>.ctl`, before state.json
names the version); `resume` takes the committed version's c at start, and a file that
cannot be trusted is moved to the quarantine and c starts afresh at zero. The c devices
train against is the one saved with the version they train on, published as the
manifest's `control` payload (fedmq.correction, docs/protocol.md).

`ScaffoldRule` wraps the round's aggregation rule (FedAvg's running sum): the model part
of each update goes to it unchanged (clipping and bounds see only the model delta), the
control part is checked (its L2 against what its model delta allows: see
fedmq.correction.control_bound) and summed unweighted, as in the paper. It keeps every
update (not streaming), so the journal replays whole bodies after a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aggregator.bounds import update_norm
from aggregator.fedavg import AggregationRule, Prepared
from aggregator.globals import ModelRefused
from aggregator.store import Store
from fedmq.codecs import Decoded, SparseTensor
from fedmq.correction import CONTROL_PREFIX, control_bound, next_server_control, split_control
from fedmq.errors import ProtocolError, SchemaError
from fedmq.wire import TensorSpec, check_tensors, decode_weights, encode_weights
from fedmq.wire.framing import get_field, pack_message, unpack_message

log = logging.getLogger("fedmq.aggregator")

STATE_KIND = "server_control"
MAX_STATE_BYTES = 1024 * 1024 * 1024
CONTROL_EXT = "ctl"


def encode_control(step: int, c: Mapping[str, np.ndarray]) -> bytes:
    """A server control variate (float64) as the bytes of a `.ctl` file."""
    return pack_message(STATE_KIND, {"step": step, "tensors": encode_weights(dict(c))})


def decode_control(blob: bytes, specs: tuple[TensorSpec, ...]) -> tuple[int, dict[str, np.ndarray]]:
    """Inverse of encode_control, checked against the model (float64, finite, its shapes);
    ProtocolError or ValueError when it cannot be trusted."""
    obj = unpack_message(blob, STATE_KIND, MAX_STATE_BYTES)
    step = get_field(obj, "step", "int")
    if step < 0:
        raise ValueError(f"step {step} is negative")
    tensors = decode_weights(get_field(obj, "tensors", "bytes"), max_bytes=MAX_STATE_BYTES)
    check_tensors(tensors, tuple(TensorSpec(s.name, "float64", s.shape) for s in specs),
                  what="server control variate")  # fmt: skip
    return step, {s.name: tensors[s.name].copy() for s in specs}


class ServerControl:
    """The server control variate c of SCAFFOLD, saved with every version."""

    def __init__(self, *, specs: tuple[TensorSpec, ...], store: Store | None = None) -> None:
        self.specs, self.store = specs, store
        self.steps = 0
        self.c = self._zeros()
        self.pending: tuple[int, dict[str, np.ndarray]] | None = None

    def _zeros(self) -> dict[str, np.ndarray]:
        return {s.name: np.zeros(s.shape, dtype=np.float64) for s in self.specs}

    @property
    def published(self) -> dict[str, np.ndarray]:
        """c as devices get it (float32)."""
        return {k: v.astype(np.float32) for k, v in self.c.items()}

    def norm(self) -> float:
        """||c||, for the control deltas' plausibility bound."""
        return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in self.c.values()))

    def step(self, mean_dc: Mapping[str, np.ndarray], *, participating: int,
             population: int) -> None:  # fmt: skip
        """Compute c + |S|/N mean dc for the next version; ModelRefused if not finite or
        beyond float32 (what devices get)."""
        nxt = next_server_control(self.c, mean_dc, participating=participating,
                                  population=population)  # fmt: skip
        for name, a in nxt.items():
            if not np.isfinite(a).all() or (a.size and np.abs(a).max() > 3e38):
                raise ModelRefused(f"the server control variate of tensor {name!r} would "
                                   "not be finite")  # fmt: skip
        self.pending = (self.steps + 1, nxt)

    def commit(self, version: int) -> None:
        """The step's round became `version`: adopt c (c stays when no step was taken, e.g.
        a round without control deltas) and save it next to the version."""
        if self.pending is not None:
            (self.steps, self.c), self.pending = self.pending, None
        if self.store is None:
            return
        try:
            self.store.save_extra(version, CONTROL_EXT, encode_control(self.steps, self.c))
        except OSError as err:
            log.error("could not save the server control variate of version %d (%s); a "
                      "restart at this version starts it at zero", version, err)  # fmt: skip

    def resume(self, version: int, quarantine: Path) -> int:
        """Take c saved with the committed `version` (zero when there is none); returns the
        files moved into quarantine (a c that cannot be trusted: it starts at zero)."""
        self.steps, self.c, self.pending = 0, self._zeros(), None
        blob = self.store.load_extra(version, CONTROL_EXT) if self.store is not None else None
        if blob is None:
            if version > 0:
                log.warning("no server control variate for version %d: SCAFFOLD starts it at "
                            "zero from that version", version)  # fmt: skip
            return 0
        try:
            self.steps, self.c = decode_control(blob, self.specs)
        except (ProtocolError, ValueError, KeyError) as err:
            assert self.store is not None
            moved = self.store.quarantine_extra(version, CONTROL_EXT, quarantine)
            log.warning("server control variate of version %d cannot be trusted (%s): moved to "
                        "%s; SCAFFOLD starts it at zero", version, err, moved)  # fmt: skip
            return 1
        log.info("resumed the server control variate at version %d after %d steps",
                 version, self.steps)  # fmt: skip
        return 0


def _dense(t: Decoded, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(t, SparseTensor):
        out = np.zeros(int(np.prod(shape)), dtype=np.float64)
        out[t.indices] = t.values.astype(np.float64)
        return out.reshape(shape)
    return np.asarray(t, dtype=np.float64)


class ScaffoldRule:
    """An aggregation rule with SCAFFOLD's control deltas summed next to it."""

    streaming = False  # the journal replays every body: the control sum comes back too

    def __init__(self, *, inner: AggregationRule, specs: tuple[TensorSpec, ...], lr: float,
                 c_norm: float) -> None:  # fmt: skip
        self.inner, self.specs, self.lr, self.c_norm = inner, specs, lr, c_norm
        self.control = {s.name: np.zeros(s.shape, dtype=np.float64) for s in specs}
        self.control_count = 0

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    @total_weight.setter
    def total_weight(self, value: float) -> None:
        self.inner.total_weight = value

    @property
    def count(self) -> int:
        return self.inner.count

    @count.setter
    def count(self, value: int) -> None:
        self.inner.count = value

    def prepare(self, delta: Mapping[str, Decoded], weight: float, *,
                norm: float | None = None) -> Prepared:  # fmt: skip
        """The model part prepared by the inner rule; the control part checked and kept
        (as float64, unweighted) under its body names. SchemaError when it is missing or
        implausible for its model delta."""
        model, control = split_control(delta)
        if set(control) != {s.name for s in self.specs}:
            raise SchemaError("the round announced scaffold: the update must carry a control "
                              "delta for every tensor")  # fmt: skip
        bound = control_bound(delta_l2=update_norm(model), c_l2=self.c_norm, lr=self.lr)  # type: ignore[arg-type]
        l2 = update_norm(control)  # type: ignore[arg-type]
        if not l2 <= bound:
            raise SchemaError(f"control delta of L2 {l2:.4g} is beyond what its model delta "
                              f"allows ({bound:.4g})")  # fmt: skip
        p = self.inner.prepare(model, weight, norm=norm)  # type: ignore[arg-type]
        extra = {CONTROL_PREFIX + s.name: _dense(control[s.name], s.shape)  # type: ignore[arg-type]
                 for s in self.specs}  # fmt: skip
        return dataclasses.replace(p, parts={**p.parts, **extra})

    def add_prepared(self, p: Prepared) -> None:
        """Fold the model part into the inner rule and the control part into its sum."""
        self.inner.add_prepared(p)
        for name, acc in self.control.items():
            acc += p.parts[CONTROL_PREFIX + name]  # type: ignore[operator]
        self.control_count += 1

    def add(self, delta: Mapping[str, Decoded], weight: float, *,
            norm: float | None = None) -> None:  # fmt: skip
        """prepare and add_prepared in one (the journal's replay)."""
        self.add_prepared(self.prepare(delta, weight, norm=norm))

    def mean(self) -> dict[str, np.ndarray]:
        """The inner rule's mean model delta."""
        return self.inner.mean()

    def mean_control(self) -> dict[str, np.ndarray]:
        """The plain mean of the control deltas; ValueError when none was added."""
        if not self.control_count:
            raise ValueError("no control deltas were added")
        return {k: v / self.control_count for k, v in self.control.items()}

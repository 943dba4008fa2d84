"""Personal models on the device: a held-out share of its data, and one round of training
that also makes (or refreshes) the personal model the device keeps and never sends.

    none      the round trains the global model on the training share, as always
    finetune  the update is trained as always (on the training share); then a copy of the
              global model is fine-tuned for personal_steps steps: the personal model
    fedper    the head tensors (the round names them) never leave the device: the device
              puts its own head on the global body, trains the head alone for
              personal_steps steps (FedRep; 0: head and body together, FedPer), then the
              body with the head frozen; the update is the body's delta alone

Under finetune and fedper the device reports, with the update's metrics, the accuracy of
the global version it trained on (global_acc) and of its personal model (personal_acc) on
its held-out share. The personal model here is what the device would serve: under fedper
the global body it trained on with its newly trained head.

The split and combination of weights are pure numpy; torch is used only to train and
evaluate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.state import DeviceStore
from fedmq.errors import SchemaError
from fedmq.wire import TrainConfig

GLOBAL_ACC = "global_acc"  # aggregator.personal reads these two names
PERSONAL_ACC = "personal_acc"
HOLDOUT_EXAMPLES = "holdout_examples"

Weights = dict[str, np.ndarray]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of n examples: a fixed seeded fraction held out,
    never all of them (at least one example trains); both sorted."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng([seed, n, 12]).permutation(n)
    k = min(int(round(n * fraction)), max(0, n - 1))
    return np.sort(order[k:]), np.sort(order[:k])


def split_head(weights: Mapping[str, np.ndarray],
               head: Sequence[str]) -> tuple[Weights, Weights]:  # fmt: skip
    """(the shared body, the personal head) of a model's weights."""
    missing = [n for n in head if n not in weights]
    if missing:
        raise ValueError(f"the model has no tensors {missing} to keep as its head")
    names = set(head)
    body = {k: v for k, v in weights.items() if k not in names}
    return body, {k: weights[k] for k in head}


def combine(global_weights: Mapping[str, np.ndarray],
            head: Mapping[str, np.ndarray]) -> Weights:  # fmt: skip
    """The global model's body with this device's head (same names and shapes, or ValueError)."""
    for name, value in head.items():
        if name not in global_weights or global_weights[name].shape != value.shape:
            raise ValueError(f"the personal head's {name!r} does not fit the global model")
    return {k: np.array(head.get(k, v), copy=True)
            for k, v in global_weights.items()}  # fmt: skip


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of (x, y) a torch model classifies correctly."""
    from fedmq.tasks.weights import evaluate

    return float(evaluate(model, x, y)["accuracy"])


@dataclass(frozen=True, eq=False)
class LocalRound:
    """One round's local work: the update's base and trained weights (fedper: the body
    only), the training result, the metrics to report, and the personal model to keep."""

    base: Weights
    trained: Weights
    result: Any  # edge_agent.training.TrainResult
    examples: int  # the examples the update was trained on (its FedAvg weight's ceiling)
    metrics: dict[str, float]
    personal: Weights | None = None
    note: dict[str, Any] = dataclasses.field(default_factory=dict)


class PersonalModels:
    """A device's training share (x, y), its held-out share (the device's evaluation data,
    edge_agent/data.py) and its kept personal model."""

    def __init__(self, *, store: DeviceStore, x: np.ndarray, y: np.ndarray,
                 held_x: np.ndarray, held_y: np.ndarray) -> None:  # fmt: skip
        self.store = store
        self.x, self.y = x, y
        self.held_x, self.held_y = held_x, held_y

    def train_round(self, model: Any, base: Mapping[str, np.ndarray], config: TrainConfig, *,
                    budget: Any, seed: int, version: int,
                    correction: Mapping[str, np.ndarray] | None = None) -> LocalRound:  # fmt: skip
        """Train for the round as config says; under none exactly the old single call.
        correction (SCAFFOLD's c - c_i) applies to the global model's training only."""
        from edge_agent.training import train_local
        from fedmq.tasks.weights import get_weights, set_weights

        if any(n not in base for n in config.personal_head):
            raise SchemaError(f"the round's personal_head {list(config.personal_head)} names "
                              "tensors this model does not have")  # fmt: skip
        set_weights(model, dict(base))
        if config.personal == "none":
            result = train_local(model, self.x, self.y, config=config, budget=budget, seed=seed,
                                 correction=correction)  # fmt: skip
            return LocalRound(dict(base), get_weights(model), result, len(self.x), {})
        x, y, xh, yh = self.x, self.y, self.held_x, self.held_y
        metrics: dict[str, float] = {}
        if len(xh):
            metrics = {GLOBAL_ACC: accuracy(model, xh, yh), HOLDOUT_EXAMPLES: float(len(xh))}
        steps = dataclasses.replace(config, prox_mu=0.0, epochs=max_epochs_hint(config, len(x)))
        note = {"mode": config.personal, "base_version": version}
        if config.personal == "finetune":
            result = train_local(model, x, y, config=config, budget=budget, seed=seed,
                                 correction=correction)  # fmt: skip
            trained = get_weights(model)
            set_weights(model, dict(base))
            if config.personal_steps:
                train_local(model, x, y, config=steps, budget=budget, seed=seed + 1,
                            max_steps=config.personal_steps)  # fmt: skip
            personal = get_weights(model)
            out_base = dict(base)
        else:
            head = config.personal_head
            kept = self._kept_head(head, base)
            set_weights(model, combine(base, kept) if kept else dict(base))
            if config.personal_steps:  # FedRep: the head first, on the global body
                with only_trainable(model, head, train=True):
                    train_local(model, x, y, config=steps, budget=budget, seed=seed + 1,
                                max_steps=config.personal_steps)  # fmt: skip
                _, new_head = split_head(get_weights(model), head)
                with only_trainable(model, head, train=False):  # then the body alone
                    result = train_local(model, x, y, config=config, budget=budget, seed=seed)
            else:  # FedPer: both together
                result = train_local(model, x, y, config=config, budget=budget, seed=seed)
                _, new_head = split_head(get_weights(model), head)
            trained, _ = split_head(get_weights(model), head)
            out_base, _ = split_head(base, head)
            personal = combine(base, new_head)
            note["head"] = list(head)
        if len(xh):
            set_weights(model, personal)
            metrics[PERSONAL_ACC] = accuracy(model, xh, yh)
        return LocalRound(out_base, trained, result, len(x), metrics, personal, note)

    def _kept_head(self, head: Sequence[str], base: Mapping[str, np.ndarray]) -> Weights | None:
        """This device's head from its kept fedper model, if it fits the round's head."""
        kept = self.store.load_personal()
        if kept is None or kept[0].get("mode") != "fedper" or kept[0].get("head") != list(head):
            return None
        try:
            _, h = split_head(kept[1], head)
            combine(base, h)
        except ValueError:
            return None
        return h

    def keep(self, local: LocalRound) -> None:
        """Keep the round's personal model on disk (none: nothing to keep)."""
        if local.personal is not None:
            self.store.save_personal(local.note, local.personal)


def serving_weights(store: DeviceStore, global_weights: Mapping[str, np.ndarray] | None
                    ) -> tuple[Weights | None, str]:  # fmt: skip
    """The weights a device serves and which they are ("personal" or "global"): its
    personal model where it keeps one (fedper: its head on the newest global body it
    holds), else the global model (None if it holds none)."""
    kept = store.load_personal()
    if kept is not None:
        note, weights = kept
        if note.get("mode") == "fedper" and global_weights is not None:
            try:
                _, head = split_head(weights, [str(n) for n in note.get("head", [])])
                return combine(global_weights, head), "personal"
            except ValueError:
                pass  # the kept head does not fit the global model: serve the global one
        elif note.get("mode") == "finetune":
            return dict(weights), "personal"
    return (dict(global_weights) if global_weights is not None else None), "global"


def max_epochs_hint(config: TrainConfig, n: int) -> int:
    """Epochs enough for personal_steps batches of config.batch_size over n examples."""
    per_epoch = max(1, -(-n // config.batch_size))
    return max(1, -(-config.personal_steps // per_epoch))


class only_trainable:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within it, only the head's parameters train (train=True) or only the body's."""

    def __init__(self, model: Any, head: Sequence[str], *, train: bool) -> None:
        self.params = list(model.named_parameters())
        self.head, self.train = set(head), train

    def __enter__(self) -> None:
        for name, p in self.params:
            p.requires_grad_((name in self.head) == self.train)

    def __exit__(self, *exc: object) -> None:
        for _, p in self.params:
            p.requires_grad_(True)

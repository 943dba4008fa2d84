"""Personal models, the aggregator's side: which tensors are fedper's head, the shared-body
form of an update, and the per-round distribution of the accuracies devices report.

Pure: tensors, specs and the round's participant records in; no clock, no files. The
devices keep their personal models (edge_agent.personal); the aggregator only learns two
numbers per update, which are hostile input like every other byte from the broker.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmq.codecs import Decoded
from fedmq.errors import ShapeMismatch
from fedmq.wire import TensorSpec, TrainConfig

# the update metrics a device reports under personalisation (edge_agent.personal)
PERSONAL_ACC = "personal_acc"  # its personal model on its held-out data
GLOBAL_ACC = "global_acc"  # the global version it trained on, on the same data


def resolve_head(names: Sequence[str], default: Sequence[str],
                 specs: Sequence[TensorSpec]) -> tuple[str, ...]:  # fmt: skip
    """fedper's head: the names set (personal_head) or else the task's own; ValueError if
    there is none, a name is not a tensor of the model, or nothing would be left to share."""
    head = tuple(names) or tuple(default)
    model = [s.name for s in specs]
    if not head:
        raise ValueError("personalization = 'fedper' needs the head tensors: set personal_head "
                         "(the task defines none)")  # fmt: skip
    unknown = [n for n in head if n not in model]
    if unknown:
        raise ValueError(f"personal_head names tensors the model does not have: {unknown}; "
                         f"its tensors are {model}")  # fmt: skip
    if len(set(head)) >= len(model):
        raise ValueError("personal_head names every tensor: nothing would be shared")
    return head


def personal_train(train: TrainConfig, *, head: Sequence[str], default_head: Sequence[str],
                   specs: Sequence[TensorSpec]) -> TrainConfig:  # fmt: skip
    """The train map a round announces: under fedper with the head resolved against the model."""
    if train.personal != "fedper":
        return train
    return dataclasses.replace(train, personal_head=resolve_head(head, default_head, specs))


def shared_body(tensors: Mapping[str, Decoded], specs: Sequence[TensorSpec],
                head: frozenset[str]) -> dict[str, Decoded]:  # fmt: skip
    """A fedper update as the sum takes it: the head's deltas are zero.

    Two forms are accepted: every head tensor left out (the form agents send under fedper),
    or every head tensor present (an agent that predates personal models): those deltas are
    discarded, never folded in. Some of the head but not all is refused: no third form."""
    present = head & set(tensors)
    if present and present != head:
        raise ShapeMismatch(f"a fedper update sends all of the head or none of it; this one "
                            f"sends {sorted(present)} of {sorted(head)}")  # fmt: skip
    out = dict(tensors)
    for s in specs:
        if s.name in head:
            out[s.name] = np.zeros(s.shape, np.float32)
    return out


def _valid(values: Iterable[Any]) -> tuple[list[float], int]:
    """The accuracies in [0, 1], and how many others there were (NaN, inf, < 0, > 1,
    not a number): those are dropped, never clipped into the statistics."""
    kept, dropped = [], 0
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and 0.0 <= v <= 1.0:
            kept.append(float(v))
        else:
            dropped += 1
    return kept, dropped


def distribution(values: Iterable[Any]) -> dict[str, Any] | None:
    """{mean, p10, n, dropped} of the valid accuracies (p10: numpy's linear percentile);
    None when none is valid and none was dropped."""
    kept, dropped = _valid(values)
    if not kept and not dropped:
        return None
    out: dict[str, Any] = {"mean": None, "p10": None, "n": len(kept), "dropped": dropped}
    if kept:
        out["mean"] = round(float(np.mean(kept)), 6)
        out["p10"] = round(float(np.percentile(kept, 10)), 6)
    return out


def personal_stats(participants: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What a round's history record says of personal models: `personal` and
    `global_local` distributions over its accepted updates' metrics; {} when no update
    reported either (a round without personalisation: its record is unchanged)."""
    reports = [p.get("metrics") for p in participants]
    maps = [m for m in reports if isinstance(m, Mapping)]
    out: dict[str, Any] = {}
    for key, metric in (("personal", PERSONAL_ACC), ("global_local", GLOBAL_ACC)):
        d = distribution(m[metric] for m in maps if metric in m)
        if d is not None:
            out[key] = d
    return out

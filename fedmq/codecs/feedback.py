"""Compressing one update on the device: error feedback and the byte budget.

Error feedback: what a sparse pipeline does not send (and what quantization changed) is
kept as the device's residual and added to its next update, so nothing a device learned
is dropped, only delayed: sent + new residual == delta + old residual, exactly, in float32.

Byte budget: when the encoded update is larger than the budget, the device sends fewer
values (a smaller top-k fraction, top-k added if the pipeline had none) until it fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.codecs.pipeline import Pipeline, decode_tensors, encode_tensors, to_dense
from fedmq.wire import specs_of

MIN_FRACTION = 1e-6
BUDGET_ATTEMPTS = 12


@dataclass(frozen=True)
class Compressed:
    """One encoded update and what the device keeps for next time."""

    body: bytes
    pipeline: Pipeline  # what was actually used (the budget may have lowered top-k)
    residual: dict[str, np.ndarray] | None  # None: nothing kept (a dense pipeline)
    sent: dict[str, np.ndarray]  # the dense values the aggregator will decode


def compress_update(
    delta: Mapping[str, np.ndarray],
    pipeline: Pipeline,
    *,
    rng: np.random.Generator,
    residual: Mapping[str, np.ndarray] | None = None,
    max_body_bytes: int = 0,
) -> Compressed:
    """Encode delta (+ residual) with pipeline, within max_body_bytes (0: no budget).

    ValueError when even one value per tensor does not fit the budget.
    """
    x = {name: np.asarray(d, dtype=np.float32) for name, d in delta.items()}
    if residual is not None:
        if set(residual) != set(x) or any(residual[n].shape != x[n].shape for n in x):
            raise ValueError("the residual does not match the model; it must be reset")
        x = {name: x[name] + residual[name].astype(np.float32) for name in x}
    p = pipeline
    body = encode_tensors(x, p, rng=rng)
    if max_body_bytes and len(body) > max_body_bytes:
        p, body = _fit_budget(x, p, body, max_body_bytes, rng)
    decoded = decode_tensors(body, p.name, specs_of(x))
    sent = {name: to_dense(t) for name, t in decoded.items()}
    kept = {name: x[name] - sent[name] for name in x} if p.sparse else None
    return Compressed(body=body, pipeline=p, residual=kept, sent=sent)


def _fit_budget(
    x: Mapping[str, np.ndarray],
    p: Pipeline,
    body: bytes,
    budget: int,
    rng: np.random.Generator,
) -> tuple[Pipeline, bytes]:
    """The largest top-k fraction (within a few tries) whose encoding fits the budget.

    The size is about fixed + fraction x per-value bytes, so each try scales the variable
    part, measured against the smallest encoding (one value per tensor).
    """
    smallest = p.with_topk(MIN_FRACTION)
    floor_body = encode_tensors(x, smallest, rng=rng)
    if len(floor_body) > budget:
        raise ValueError(
            f"an update of this model cannot fit {budget} bytes: even one value per tensor "
            f"({smallest.name}) takes {len(floor_body)}; raise max_update_bytes"
        )
    fraction = p.topk or 1.0
    for _ in range(BUDGET_ATTEMPTS):
        variable = max(1, len(body) - len(floor_body))
        scaled = fraction * (budget - len(floor_body)) / variable * 0.97
        # three significant digits, so the name the update carries parses back exactly
        fraction = max(MIN_FRACTION, float(f"{min(scaled, fraction * 0.97):.3g}"))
        p = p.with_topk(fraction)
        body = encode_tensors(x, p, rng=rng)
        if len(body) <= budget:
            return p, body
    return smallest, floor_body

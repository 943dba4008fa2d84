"""Building one update on the device: the trained delta, compressed with the round's
pipeline within the byte budget, the error-feedback residual carried, encoded once.

Pure: weights, the round and a seeded generator in; the payload to publish and the
residual to keep out. The update id comes in too (the shell draws it), so a resend of the
outbox is the same update to the aggregator.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_agent.fetch import same_specs
from edge_agent.privacy import LocalDP, privatize
from fedmq.codecs import Pipeline, compress_update, parse_pipeline
from fedmq.wire import RoundAnnouncement, Update, encode_update, specs_of

# a top-k fraction whose name is as long as any `:g` formats one in (0, 1] (11 characters)
_LONGEST_TOPK = 0.000123457
# an empty body encodes as bin 8 (2 bytes of header); a body of 64 KiB or more needs bin 32 (5)
_BODY_HEADER_GROWTH = 3


@dataclass(frozen=True, eq=False)
class BuiltUpdate:
    """An update ready for the outbox, and the residual to keep for the next one."""

    update: Update
    payload: bytes  # encode_update(update), at most `budget` bytes when there is one
    residual: dict[str, np.ndarray] | None  # None: nothing kept (a dense pipeline)
    pipeline: Pipeline  # what was used: the budget may have lowered (or added) top-k
    budget: int  # bytes the payload had to fit; 0: no budget
    residual_reset: bool  # the residual given did not fit the model and was left out

    @property
    def update_id(self) -> str:
        return self.update.update_id


@dataclass(frozen=True)
class NoUpdate:
    """Why no update could be built (e.g. the budget cannot hold even one value per tensor)."""

    reason: str


def update_budget(round_bytes: int, profile_bytes: int) -> int:
    """The byte budget of one update: the smaller of the round's and the profile's (0: none)."""
    budgets = [b for b in (round_bytes, profile_bytes) if b > 0]
    return min(budgets) if budgets else 0


def update_rng(round_id: int, device: str) -> np.random.Generator:
    """The generator of one device's update in one round (stochastic rounding, top-k ties)."""
    return np.random.default_rng([round_id, zlib.crc32(device.encode())])


def header_bytes(update: Update, pipeline: Pipeline) -> int:
    """Bytes an encoded update takes besides its body's bytes, for any codec name the
    budget may give it: the update encoded once with an empty body and the longest name."""
    longest = dataclasses.replace(update, codec=pipeline.with_topk(_LONGEST_TOPK).name, body=b"")
    return len(encode_update(longest)) + _BODY_HEADER_GROWTH


def build_update(
    *,
    announcement: RoundAnnouncement,
    device: str,
    update_id: str,
    base: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    profile_max_bytes: int,
    num_examples: int,
    metrics: Mapping[str, float],
    fetched_bytes: int,
    rng: np.random.Generator,
    local_dp: LocalDP | None = None,
) -> BuiltUpdate | NoUpdate:
    """The update of (trained - base) + residual for the announced round, within the
    smaller of the round's and the profile's byte budget; NoUpdate(reason) if it cannot be.

    With local_dp the delta is clipped and noised before anything else sees it (its noise
    from OS entropy, not rng: seeded noise could be regenerated and taken off)."""
    r = announcement
    try:
        pipeline = parse_pipeline(r.codec)
    except ValueError as err:
        return NoUpdate(f"round {r.round_id}: {err}")
    if set(trained) != set(base):
        return NoUpdate(f"round {r.round_id}: the trained model's tensors are not the global's")
    delta = {name: np.asarray(trained[name], np.float32) - base[name] for name in base}
    if local_dp is not None:
        delta = privatize(delta, clip=local_dp.clip, noise_multiplier=local_dp.noise_multiplier)
    reset = residual is not None and not same_specs(specs_of(dict(residual)), specs_of(delta))
    update = Update(
        update_id=update_id,
        device=device,
        round_id=r.round_id,
        base_version=r.model_version,
        num_examples=num_examples,
        codec="",
        body=b"",
        metrics=dict(metrics),
        fetched_bytes=fetched_bytes,
    )
    budget = update_budget(r.max_update_bytes, profile_max_bytes)
    max_body = budget - header_bytes(update, pipeline) if budget else 0
    if budget and max_body < 1:
        return NoUpdate(f"round {r.round_id}: a {budget}-byte budget cannot hold an update")
    try:
        c = compress_update(
            delta, pipeline, rng=rng, residual=None if reset else residual, max_body_bytes=max_body
        )
    except ValueError as err:  # the budget cannot hold even one value per tensor
        return NoUpdate(f"round {r.round_id}: no update fits the {budget}-byte budget ({err})")
    update = dataclasses.replace(update, codec=c.pipeline.name, body=c.body)
    payload = encode_update(update)
    return BuiltUpdate(update, payload, c.residual, c.pipeline, budget, reset)

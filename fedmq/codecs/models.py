"""The downlink: a global version as a full model in a codec, or as a delta from the one
before it, such that every device ends up with exactly the aggregator's weights.

The aggregator's version v is defined as what devices can rebuild: the decoding of its
full encoding (for fp16 / int8 the weights themselves are rounded). A delta is applied
on the device and the result passed through the same full codec with the same seeded
rounding, so the delta path and the full path give the same float32 weights bit for bit;
the manifest's `model_sha256` (of the float32 weights blob) lets a device check that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.codecs.pipeline import Pipeline, decode_tensors, encode_tensors, to_dense
from fedmq.errors import ShapeMismatch
from fedmq.wire import TensorSpec, specs_of

_MODEL_SEED = 0x6D6F64656C  # "model": the full codec's rounding stream, one per version
_DELTA_SEED = 0x64656C7461  # "delta"


def check_downlink(full: Pipeline, delta: Pipeline | None) -> None:
    """ValueError unless these pipelines can carry global models: a full model is dense.

    A delta may be sparse: the aggregator then keeps its own weights, and what a delta
    leaves out stays in (own weights - published weights) for the next delta."""
    del delta  # any delta pipeline will do
    if full.sparse:
        raise ValueError(f"downlink codec {full.name} cannot be sparse: a full model is dense")


def encode_model(
    weights: Mapping[str, np.ndarray], full: Pipeline, *, version: int
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(full payload, the weights devices decode from it) of version `version`."""
    body = encode_tensors(weights, full, rng=np.random.default_rng([_MODEL_SEED, version]))
    return body, decode_model(body, full, specs_of(weights))


def decode_model(
    body: bytes, full: Pipeline, specs: tuple[TensorSpec, ...]
) -> dict[str, np.ndarray]:
    """A full model payload back to float32 weights; ProtocolError on anything malformed."""
    return {name: to_dense(t) for name, t in decode_tensors(body, full.name, specs).items()}


@dataclass(frozen=True)
class ModelDelta:
    """Version v as a delta payload from version v - 1, and the full payload of v."""

    delta_body: bytes
    full_body: bytes
    weights: dict[str, np.ndarray]  # version v as devices rebuild it


def encode_model_delta(
    new: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray],
    *,
    full: Pipeline,
    delta: Pipeline,
    version: int,
) -> ModelDelta:
    """Encode new - previous with `delta`; version v is previous + decoded delta, rounded
    by the full codec, so devices that apply the delta and those that fetch the full
    payload hold the same weights. `new` is the aggregator's own weights: with a sparse
    delta, new - version v is what is still to be sent (server-side error feedback)."""
    diff = {name: np.asarray(new[name], np.float32) - previous[name] for name in previous}
    rng = np.random.default_rng([_DELTA_SEED, version])
    delta_body = encode_tensors(diff, delta, rng=rng)
    summed = _add_delta(previous, delta_body, delta)
    full_body, rebuilt = encode_model(summed, full, version=version)
    return ModelDelta(delta_body=delta_body, full_body=full_body, weights=rebuilt)


def apply_model_delta(
    previous: Mapping[str, np.ndarray],
    delta_body: bytes,
    *,
    full: Pipeline,
    delta: Pipeline,
    version: int,
) -> dict[str, np.ndarray]:
    """Version v from version v - 1 and the delta payload (what a device does);
    ProtocolError when the payload is malformed or leaves the model non-finite or beyond
    what the full codec carries."""
    summed = _add_delta(previous, delta_body, delta)
    if not all(np.isfinite(w).all() for w in summed.values()):
        raise ShapeMismatch("the delta makes the model non-finite")
    try:
        return encode_model(summed, full, version=version)[1]
    except ValueError as err:  # e.g. beyond float16
        raise ShapeMismatch(f"the delta leaves the model beyond its codec: {err}") from err


def _add_delta(
    previous: Mapping[str, np.ndarray], delta_body: bytes, delta: Pipeline
) -> dict[str, np.ndarray]:
    decoded = decode_tensors(delta_body, delta.name, specs_of(previous))
    with np.errstate(over="ignore", invalid="ignore"):  # checked by the caller
        return {name: previous[name] + to_dense(decoded[name]) for name in previous}

"""Global versions as the aggregator publishes them (manifest + chunk messages), built
from plain numpy weights so the fetch tests need no torch and no broker."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedmq.chunks import split_payload
from fedmq.codecs import encode_model, encode_model_delta, parse_pipeline
from fedmq.wire import Chunk, DeltaRef, Manifest, PayloadRef, encode_weights, specs_of

LIMIT = 1024  # bytes per chunk message: several chunks per payload


def small_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny two-tensor model."""
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(40, 30)).astype(np.float32),
            "b": rng.normal(size=30).astype(np.float32)}  # fmt: skip


def _ref(payload_id: str, body: bytes, first: int) -> tuple[PayloadRef, list[Chunk]]:
    chunks = split_payload(body, payload_id, LIMIT)
    ref = PayloadRef(payload_id=payload_id, size=len(body),
                     sha256=hashlib.sha256(body).hexdigest(), chunks=len(chunks),
                     first_index=first)  # fmt: skip
    return ref, chunks


@dataclass
class Version:
    """One published version: its manifest, its chunks by payload, the weights it holds."""

    manifest: Manifest
    full: list[Chunk]
    delta: list[Chunk]
    onnx: list[Chunk]
    weights: dict[str, np.ndarray]


def make_version(
    weights: dict[str, np.ndarray],
    version: int,
    *,
    codec: str = "float32",
    previous: dict[str, np.ndarray] | None = None,
    delta_codec: str = "int8+zstd",
    base_sha: str = "",
    onnx: bytes | None = None,
    job: str = "j",
    task: str = "t",
) -> Version:
    """Version `version` of weights, as a delta from `previous` too when it is given."""
    full = parse_pipeline(codec)
    if previous is not None:
        made = encode_model_delta(weights, previous, full=full,
                                  delta=parse_pipeline(delta_codec), version=version)  # fmt: skip
        body, delta_body, held = made.full_body, made.delta_body, made.weights
    else:
        (body, held), delta_body = encode_model(weights, full, version=version), b""
    wref, wchunks = _ref(f"w{version}", body, 0)
    oref, ochunks = _ref(f"o{version}", onnx, wref.chunks) if onnx else (None, [])
    dref, dchunks, delta = None, [], None
    if delta_body:
        dref, dchunks = _ref(f"d{version}", delta_body, wref.chunks + len(ochunks))
        delta = DeltaRef(base_version=version - 1, base_sha256=base_sha, codec=delta_codec,
                         payload=dref)  # fmt: skip
    m = Manifest(job=job, version=version, round_id=version, created=0.0, task=task,
                 codec=codec, tensors=specs_of(held), weights=wref, onnx=oref,
                 model_sha256=hashlib.sha256(encode_weights(held)).hexdigest(),
                 delta=delta)  # fmt: skip
    return Version(manifest=m, full=wchunks, delta=dchunks, onnx=ochunks, weights=held)

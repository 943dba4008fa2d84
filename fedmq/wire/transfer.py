"""Moving large payloads: chunks, and the manifest that announces a global version."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmq.errors import SchemaError
from fedmq.wire.framing import (
    MAX_MESSAGE_BYTES,
    get_field,
    num_map,
    pack_message,
    unpack_message,
)
from fedmq.wire.signed import Signature, SignFn, read_signature, sign_body
from fedmq.wire.tensors import TensorSpec

# ---------------------------------------------------------------- chunk


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload too large for one MQTT message."""

    payload_id: str
    index: int
    count: int
    total_size: int
    digest: bytes  # sha256 of the whole payload
    data: bytes


def encode_chunk(c: Chunk) -> bytes:
    """A chunk as a wire message."""
    return pack_message(
        "chunk",
        {
            "id": c.payload_id,
            "i": c.index,
            "n": c.count,
            "size": c.total_size,
            "sha256": c.digest,
            "data": c.data,
        },
    )


CHUNK_OVERHEAD = (
    len(encode_chunk(Chunk("x" * 64, 2**31, 2**31, 2**62, b"\0" * 32, b""))) + 5
)  # +5: the bin header of data can grow to 5 bytes


def decode_chunk(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Chunk:
    """Inverse of encode_chunk; checks index, count and digest length."""
    obj = unpack_message(payload, "chunk", max_bytes)
    c = Chunk(
        payload_id=get_field(obj, "id", "str"),
        index=get_field(obj, "i", "int"),
        count=get_field(obj, "n", "int"),
        total_size=get_field(obj, "size", "int"),
        digest=get_field(obj, "sha256", "bytes"),
        data=get_field(obj, "data", "bytes"),
    )
    if not 0 < len(c.payload_id) <= 64:
        raise SchemaError("chunk: payload id must be 1-64 characters")
    if not (c.count > 0 and 0 <= c.index < c.count):
        raise SchemaError(f"chunk: index {c.index} outside count {c.count}")
    if c.total_size < 0 or len(c.digest) != 32:
        raise SchemaError("chunk: bad total size or digest")
    return c


# ---------------------------------------------------------------- global manifest


@dataclass(frozen=True)
class PayloadRef:
    """Where a chunked payload lives and how to check it."""

    payload_id: str
    size: int
    sha256: str
    chunks: int
    first_index: int  # index of its first chunk under global/<version>/

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.payload_id,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": self.chunks,
            "first": self.first_index,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> PayloadRef:
        if not isinstance(obj, dict):
            raise SchemaError("payload reference must be a map")
        ref = cls(
            payload_id=get_field(obj, "id", "str"),
            size=get_field(obj, "size", "int"),
            sha256=get_field(obj, "sha256", "str"),
            chunks=get_field(obj, "chunks", "int"),
            first_index=get_field(obj, "first", "int"),
        )
        if ref.size < 0 or ref.chunks < 1 or ref.first_index < 0 or len(ref.sha256) != 64:
            raise SchemaError(f"bad payload reference {obj!r}")
        return ref


@dataclass(frozen=True)
class DeltaRef:
    """A global version as a delta from the version before it, for devices that hold it."""

    base_version: int
    base_sha256: str  # model_sha256 of the base version
    codec: str
    payload: PayloadRef

    def to_wire(self) -> dict[str, Any]:
        return {
            "base_version": self.base_version,
            "base_sha256": self.base_sha256,
            "codec": self.codec,
            "payload": self.payload.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> DeltaRef:
        if not isinstance(obj, dict):
            raise SchemaError("delta reference must be a map")
        ref = cls(
            base_version=get_field(obj, "base_version", "int"),
            base_sha256=get_field(obj, "base_sha256", "str"),
            codec=get_field(obj, "codec", "str"),
            payload=PayloadRef.from_wire(get_field(obj, "payload", "map")),
        )
        if ref.base_version < 0 or len(ref.base_sha256) != 64:
            raise SchemaError(f"bad delta reference {obj!r}")
        return ref


@dataclass(frozen=True)
class Manifest:
    """The current global model: which version, where its chunks are, how to check them."""

    job: str
    version: int
    round_id: int
    created: float
    task: str
    codec: str
    tensors: tuple[TensorSpec, ...]
    weights: PayloadRef
    onnx: PayloadRef | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_sha256: str = ""  # sha256 of the float32 weights blob devices rebuild
    delta: DeltaRef | None = None
    epoch: int = 0  # the aggregator state directory's lineage (ms since 1970); 0: unknown
    control: PayloadRef | None = None  # SCAFFOLD's server control variate (float32 weights)
    # set by decode_manifest when the message was signed; never compared
    sig: Signature | None = field(default=None, compare=False, repr=False)

    @property
    def num_params(self) -> int:
        return sum(s.size for s in self.tensors)


def encode_manifest(m: Manifest, *, sign: SignFn | None = None) -> bytes:
    """The retained message on <job>/global; signed over every field when sign is given."""
    body = {
        "job": m.job,
        "version": m.version,
        "round": m.round_id,
        "created": m.created,
        "task": m.task,
        "codec": m.codec,
        "tensors": [s.to_wire() for s in m.tensors],
        "num_params": m.num_params,
        "weights": m.weights.to_wire(),
        "onnx": m.onnx.to_wire() if m.onnx else None,
        "metrics": dict(m.metrics),
        "model_sha256": m.model_sha256,
        "delta": m.delta.to_wire() if m.delta else None,
        "epoch": m.epoch,
        # only with SCAFFOLD: a manifest without it is byte for byte what it was before
        **({"control": m.control.to_wire()} if m.control else {}),
    }
    return pack_message("global", sign_body("global", body, sign))


def decode_manifest(payload: bytes, *, max_bytes: int = 1 << 20) -> Manifest:
    """Inverse of encode_manifest."""
    obj = unpack_message(payload, "global", max_bytes)
    specs = tuple(TensorSpec.from_wire(s) for s in get_field(obj, "tensors", "list"))
    onnx = get_field(obj, "onnx", "map", optional=True)
    delta = get_field(obj, "delta", "map", optional=True)
    control = get_field(obj, "control", "map", optional=True)
    m = Manifest(
        job=get_field(obj, "job", "str"),
        version=get_field(obj, "version", "int"),
        round_id=get_field(obj, "round", "int"),
        created=float(get_field(obj, "created", "num")),
        task=get_field(obj, "task", "str"),
        codec=get_field(obj, "codec", "str"),
        tensors=specs,
        weights=PayloadRef.from_wire(get_field(obj, "weights", "map")),
        onnx=PayloadRef.from_wire(onnx) if onnx is not None else None,
        metrics=num_map(obj, "metrics"),
        model_sha256=get_field(obj, "model_sha256", "str"),
        delta=DeltaRef.from_wire(delta) if delta is not None else None,
        # optional: aggregators before signed downlink do not send it
        epoch=get_field(obj, "epoch", "int", optional=True) or 0,
        control=PayloadRef.from_wire(control) if control is not None else None,
        sig=read_signature(obj),
    )
    if len(m.model_sha256) != 64:
        raise SchemaError("global: model_sha256 must be 64 hex digits")
    if m.version < 0 or m.round_id < 0:
        raise SchemaError("global: version and round must be non-negative")
    return m

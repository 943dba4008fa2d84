"""The wire schema: every message fedmq sends, as msgpack maps with a schema version.

This module is the only place that defines message fields. Encode and decode come in
symmetric pairs; every decoder caps the size before unpacking and raises only the
`ProtocolError` family. Arrays travel as raw little-endian bytes + dtype + shape from an
allow-list. Never pickle: loading pickled bytes runs code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import DecodeError, SchemaError, ShapeMismatch

SCHEMA_VERSION = 1

# Little-endian on the wire whatever the host; bool/object/complex are never accepted.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

MAX_TENSORS = 4096
MAX_DIMS = 8
# Hard ceiling for any single decoded message; callers pass tighter caps.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


# ---------------------------------------------------------------- low-level helpers


def _pack(kind: str, body: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": kind, **body}, use_bin_type=True)


def _unpack(payload: bytes, kind: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{kind}: payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise DecodeError(f"{kind}: message of {len(payload)} bytes exceeds the {max_bytes} cap")
    try:
        obj = msgpack.unpackb(
            bytes(payload),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max(MAX_TENSORS, 1 << 16),
            max_map_len=1024,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as err:  # fmt: skip
        raise DecodeError(f"{kind}: not valid msgpack ({err.__class__.__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DecodeError(f"{kind}: expected a map, got {type(obj).__name__}")
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"{kind}: unsupported schema version {obj.get('v')!r}")
    if obj.get("kind") != kind:
        raise SchemaError(f"expected a {kind!r} message, got {obj.get('kind')!r}")
    return obj


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "num": (int, float),
    "bytes": (bytes,),
    "bool": (bool,),
    "list": (list,),
    "map": (dict,),
}


def _get(obj: Mapping[str, Any], key: str, typ: str, *, optional: bool = False) -> Any:
    """One field of a decoded map, type-checked; raises SchemaError on absence or type."""
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise SchemaError(f"{obj.get('kind', 'message')}: missing field {key!r}")
    value = obj[key]
    ok = isinstance(value, _TYPES[typ]) and not (typ in ("int", "num") and isinstance(value, bool))
    if not ok:
        raise SchemaError(
            f"{obj.get('kind', 'message')}: field {key!r} must be {typ}, got {type(value).__name__}"
        )
    if typ == "num" and not math.isfinite(value):
        raise SchemaError(f"{obj.get('kind', 'message')}: field {key!r} must be finite")
    return value


def _str_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = _get(obj, key, "list")
    if not all(isinstance(s, str) for s in items):
        raise SchemaError(f"{obj.get('kind')}: field {key!r} must be a list of strings")
    return tuple(items)


def _num_map(obj: Mapping[str, Any], key: str) -> dict[str, float]:
    raw = _get(obj, key, "map", optional=True) or {}
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{obj.get('kind')}: field {key!r} must map names to numbers")
        out[k] = float(v)
    return out


# ---------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of a model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, obj: Any) -> TensorSpec:
        if not isinstance(obj, dict):
            raise SchemaError("tensor spec must be a map")
        name = _get(obj, "name", "str")
        dtype = _get(obj, "dtype", "str")
        if dtype not in DTYPES:
            raise SchemaError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        shape = _get(obj, "shape", "list")
        if len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
        ):
            raise SchemaError(f"tensor {name!r}: bad shape {shape!r}")
        return cls(name=name, dtype=dtype, shape=tuple(shape))


def specs_of(tensors: Mapping[str, np.ndarray]) -> tuple[TensorSpec, ...]:
    """The specs of named arrays, in order."""
    out = []
    for name, arr in tensors.items():
        dtype = arr.dtype.newbyteorder("=").name if arr.dtype.byteorder == ">" else arr.dtype.name
        out.append(TensorSpec(name=name, dtype=dtype, shape=tuple(int(d) for d in arr.shape)))
    return tuple(out)


def encode_array(name: str, arr: np.ndarray) -> dict[str, Any]:
    """One named array as a wire map: raw little-endian bytes + dtype + shape."""
    dtype_name = np.dtype(arr.dtype).name
    if dtype_name not in DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype_name} cannot go on the wire")
    data = np.ascontiguousarray(arr, dtype=DTYPES[dtype_name]).tobytes()
    return {"name": name, "dtype": dtype_name, "shape": list(arr.shape), "data": data}


def decode_array(obj: Any) -> tuple[str, np.ndarray]:
    """A wire map back to (name, array); checks dtype allow-list and byte count."""
    spec = TensorSpec.from_wire(obj)
    data = _get(obj, "data", "bytes")
    dtype = DTYPES[spec.dtype]
    if len(data) != spec.size * dtype.itemsize:
        raise DecodeError(
            f"tensor {spec.name!r}: {len(data)} bytes for shape {spec.shape} of {spec.dtype}"
        )
    # never pickle: np.frombuffer reads plain numbers and nothing else
    arr = np.frombuffer(data, dtype=dtype).reshape(spec.shape)
    return spec.name, arr.astype(dtype.newbyteorder("="), copy=False)


def _encode_tensors(tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [encode_array(name, arr) for name, arr in tensors.items()]


def _decode_tensors(obj: Mapping[str, Any], key: str = "tensors") -> dict[str, np.ndarray]:
    items = _get(obj, key, "list")
    if len(items) > MAX_TENSORS:
        raise SchemaError(f"{len(items)} tensors exceeds the limit of {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    for item in items:
        name, arr = decode_array(item)
        if name in out:
            raise SchemaError(f"tensor {name!r} appears twice")
        out[name] = arr
    return out


def check_tensors(
    tensors: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, what: str = "update"
) -> None:
    """Raise ShapeMismatch unless tensors have exactly the specs' names and shapes, all finite."""
    expected = {s.name: s for s in specs}
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise ShapeMismatch(f"{what}: tensor names differ (missing {missing}, extra {extra})")
    for name, arr in tensors.items():
        if arr.dtype != DTYPES[expected[name].dtype].newbyteorder("="):
            raise ShapeMismatch(
                f"{what}: tensor {name!r} is {arr.dtype.name}, expected {expected[name].dtype}"
            )
        if tuple(arr.shape) != expected[name].shape:
            raise ShapeMismatch(
                f"{what}: tensor {name!r} has shape {tuple(arr.shape)}, "
                f"expected {expected[name].shape}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ShapeMismatch(f"{what}: tensor {name!r} has non-finite values")


# ---------------------------------------------------------------- weights blob


def encode_weights(tensors: Mapping[str, np.ndarray]) -> bytes:
    """A full set of model weights (the payload behind a global manifest)."""
    return _pack("weights", {"tensors": _encode_tensors(tensors)})


def decode_weights(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, np.ndarray]:
    """Inverse of encode_weights."""
    return _decode_tensors(_unpack(payload, "weights", max_bytes))


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
    return _pack(
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
    obj = _unpack(payload, "chunk", max_bytes)
    c = Chunk(
        payload_id=_get(obj, "id", "str"),
        index=_get(obj, "i", "int"),
        count=_get(obj, "n", "int"),
        total_size=_get(obj, "size", "int"),
        digest=_get(obj, "sha256", "bytes"),
        data=_get(obj, "data", "bytes"),
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
            payload_id=_get(obj, "id", "str"),
            size=_get(obj, "size", "int"),
            sha256=_get(obj, "sha256", "str"),
            chunks=_get(obj, "chunks", "int"),
            first_index=_get(obj, "first", "int"),
        )
        if ref.size < 0 or ref.chunks < 1 or ref.first_index < 0 or len(ref.sha256) != 64:
            raise SchemaError(f"bad payload reference {obj!r}")
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

    @property
    def num_params(self) -> int:
        return sum(s.size for s in self.tensors)


def encode_manifest(m: Manifest) -> bytes:
    """The retained message on <job>/global."""
    return _pack(
        "global",
        {
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
        },
    )


def decode_manifest(payload: bytes, *, max_bytes: int = 1 << 20) -> Manifest:
    """Inverse of encode_manifest."""
    obj = _unpack(payload, "global", max_bytes)
    specs = tuple(TensorSpec.from_wire(s) for s in _get(obj, "tensors", "list"))
    onnx = _get(obj, "onnx", "map", optional=True)
    m = Manifest(
        job=_get(obj, "job", "str"),
        version=_get(obj, "version", "int"),
        round_id=_get(obj, "round", "int"),
        created=float(_get(obj, "created", "num")),
        task=_get(obj, "task", "str"),
        codec=_get(obj, "codec", "str"),
        tensors=specs,
        weights=PayloadRef.from_wire(_get(obj, "weights", "map")),
        onnx=PayloadRef.from_wire(onnx) if onnx is not None else None,
        metrics=_num_map(obj, "metrics"),
    )
    if m.version < 0 or m.round_id < 0:
        raise SchemaError("global: version and round must be non-negative")
    return m


# ---------------------------------------------------------------- round announcement


@dataclass(frozen=True)
class TrainConfig:
    """What a device does locally in a round."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not (0 < self.lr < 100):
            raise ValueError(
                f"training config needs epochs >= 1, batch_size >= 1 and 0 < lr < 100, "
                f"got epochs={self.epochs} batch_size={self.batch_size} lr={self.lr}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class RoundAnnouncement:
    """The retained message on <job>/round: the open round, or the last one's outcome."""

    job: str
    round_id: int
    model_version: int
    state: str  # "open" | "closed" | "abandoned"
    opened_at: float
    deadline: float
    selected: tuple[str, ...]
    target: int
    min_devices: int
    train: TrainConfig
    codec: str = "float32"
    max_update_bytes: int = 0  # 0: no budget


ROUND_STATES = ("open", "closed", "abandoned")


def encode_round(r: RoundAnnouncement) -> bytes:
    """The retained message on <job>/round."""
    return _pack(
        "round",
        {
            "job": r.job,
            "round": r.round_id,
            "model_version": r.model_version,
            "state": r.state,
            "opened_at": r.opened_at,
            "deadline": r.deadline,
            "selected": list(r.selected),
            "target": r.target,
            "min_devices": r.min_devices,
            "train": {
                "epochs": r.train.epochs,
                "batch_size": r.train.batch_size,
                "lr": r.train.lr,
                "momentum": r.train.momentum,
            },
            "codec": r.codec,
            "max_update_bytes": r.max_update_bytes,
        },
    )


def decode_round(payload: bytes, *, max_bytes: int = 1 << 20) -> RoundAnnouncement:
    """Inverse of encode_round."""
    obj = _unpack(payload, "round", max_bytes)
    t = _get(obj, "train", "map")
    try:
        train = TrainConfig(
            epochs=_get(t, "epochs", "int"),
            batch_size=_get(t, "batch_size", "int"),
            lr=float(_get(t, "lr", "num")),
            momentum=float(_get(t, "momentum", "num")),
        )
    except ValueError as err:
        raise SchemaError(f"round: {err}") from err
    r = RoundAnnouncement(
        job=_get(obj, "job", "str"),
        round_id=_get(obj, "round", "int"),
        model_version=_get(obj, "model_version", "int"),
        state=_get(obj, "state", "str"),
        opened_at=float(_get(obj, "opened_at", "num")),
        deadline=float(_get(obj, "deadline", "num")),
        selected=_str_list(obj, "selected"),
        target=_get(obj, "target", "int"),
        min_devices=_get(obj, "min_devices", "int"),
        train=train,
        codec=_get(obj, "codec", "str"),
        max_update_bytes=_get(obj, "max_update_bytes", "int"),
    )
    if r.state not in ROUND_STATES:
        raise SchemaError(f"round: unknown state {r.state!r}")
    return r


# ---------------------------------------------------------------- update


@dataclass(frozen=True)
class Update:
    """One device's contribution to one round: a delta from the version it trained on."""

    update_id: str
    device: str
    round_id: int
    base_version: int
    num_examples: int
    codec: str
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    fetched_bytes: int = 0  # downlink bytes this device received to take part


def encode_update(u: Update) -> bytes:
    """The payload a device publishes (chunked) on <job>/update/<device>."""
    return _pack(
        "update",
        {
            "id": u.update_id,
            "device": u.device,
            "round": u.round_id,
            "base_version": u.base_version,
            "num_examples": u.num_examples,
            "codec": u.codec,
            "tensors": _encode_tensors(u.tensors),
            "metrics": dict(u.metrics),
            "fetched_bytes": u.fetched_bytes,
        },
    )


def decode_update(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Update:
    """Inverse of encode_update (structure only; the aggregator validates against its model)."""
    obj = _unpack(payload, "update", max_bytes)
    u = Update(
        update_id=_get(obj, "id", "str"),
        device=_get(obj, "device", "str"),
        round_id=_get(obj, "round", "int"),
        base_version=_get(obj, "base_version", "int"),
        num_examples=_get(obj, "num_examples", "int"),
        codec=_get(obj, "codec", "str"),
        tensors=_decode_tensors(obj),
        metrics=_num_map(obj, "metrics"),
        fetched_bytes=_get(obj, "fetched_bytes", "int"),
    )
    if not 0 < len(u.update_id) <= 64:
        raise SchemaError("update: id must be 1-64 characters")
    if u.num_examples <= 0:
        raise SchemaError(f"update: num_examples must be positive, got {u.num_examples}")
    return u


# ---------------------------------------------------------------- ack


ACK_STATUSES = ("accepted", "rejected", "late")


@dataclass(frozen=True)
class Ack:
    """The aggregator's answer to one update."""

    update_id: str
    round_id: int
    status: str  # accepted | rejected | late
    reason: str = ""


def encode_ack(a: Ack) -> bytes:
    """The message on <job>/ack/<device>."""
    return _pack(
        "ack", {"id": a.update_id, "round": a.round_id, "status": a.status, "reason": a.reason}
    )


def decode_ack(payload: bytes, *, max_bytes: int = 64 * 1024) -> Ack:
    """Inverse of encode_ack."""
    obj = _unpack(payload, "ack", max_bytes)
    a = Ack(
        update_id=_get(obj, "id", "str"),
        round_id=_get(obj, "round", "int"),
        status=_get(obj, "status", "str"),
        reason=_get(obj, "reason", "str"),
    )
    if a.status not in ACK_STATUSES:
        raise SchemaError(f"ack: unknown status {a.status!r}")
    return a


# ---------------------------------------------------------------- device state


DEVICE_STATUSES = ("online", "training", "offline")


@dataclass(frozen=True)
class DeviceState:
    """A device's retained presence; the offline form is also its Last Will."""

    device: str
    status: str
    job: str = ""
    profile: str = ""
    agent_version: str = ""
    num_examples: int = 0
    model_version: int = -1
    ts: float = 0.0
    trains: bool = True  # False: inference only, never selected for a round


def encode_state(s: DeviceState) -> bytes:
    """The retained message on devices/<device>/state."""
    return _pack(
        "state",
        {
            "device": s.device,
            "status": s.status,
            "job": s.job,
            "profile": s.profile,
            "agent_version": s.agent_version,
            "num_examples": s.num_examples,
            "model_version": s.model_version,
            "ts": s.ts,
            "trains": s.trains,
        },
    )


def decode_state(payload: bytes, *, max_bytes: int = 64 * 1024) -> DeviceState:
    """Inverse of encode_state."""
    obj = _unpack(payload, "state", max_bytes)
    s = DeviceState(
        device=_get(obj, "device", "str"),
        status=_get(obj, "status", "str"),
        job=_get(obj, "job", "str"),
        profile=_get(obj, "profile", "str"),
        agent_version=_get(obj, "agent_version", "str"),
        num_examples=_get(obj, "num_examples", "int"),
        model_version=_get(obj, "model_version", "int"),
        ts=float(_get(obj, "ts", "num")),
        trains=_get(obj, "trains", "bool"),
    )
    if s.status not in DEVICE_STATUSES:
        raise SchemaError(f"state: unknown status {s.status!r}")
    return s


# ---------------------------------------------------------------- device metrics


@dataclass(frozen=True)
class DeviceMetrics:
    """Local evaluation a device reports after a round or an inference pass."""

    device: str
    round_id: int
    model_version: int
    metrics: dict[str, float]


def encode_metrics(m: DeviceMetrics) -> bytes:
    """The message on <job>/metrics/<device>."""
    return _pack(
        "metrics",
        {
            "device": m.device,
            "round": m.round_id,
            "model_version": m.model_version,
            "metrics": dict(m.metrics),
        },
    )


def decode_metrics(payload: bytes, *, max_bytes: int = 64 * 1024) -> DeviceMetrics:
    """Inverse of encode_metrics."""
    obj = _unpack(payload, "metrics", max_bytes)
    return DeviceMetrics(
        device=_get(obj, "device", "str"),
        round_id=_get(obj, "round", "int"),
        model_version=_get(obj, "model_version", "int"),
        metrics=_num_map(obj, "metrics"),
    )

"""Tensors on the wire: raw little-endian bytes + dtype + shape from an allow-list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import DecodeError, SchemaError, ShapeMismatch
from fedmq.wire.framing import (
    DTYPES,
    MAX_DIMS,
    MAX_MESSAGE_BYTES,
    MAX_TENSORS,
    get_field,
    pack_message,
    unpack_message,
)

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
        name = get_field(obj, "name", "str")
        dtype = get_field(obj, "dtype", "str")
        if dtype not in DTYPES:
            raise SchemaError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        shape = get_field(obj, "shape", "list")
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
    data = get_field(obj, "data", "bytes")
    dtype = DTYPES[spec.dtype]
    if len(data) != spec.size * dtype.itemsize:
        raise DecodeError(
            f"tensor {spec.name!r}: {len(data)} bytes for shape {spec.shape} of {spec.dtype}"
        )
    # never pickle: np.frombuffer reads plain numbers and nothing else
    arr = np.frombuffer(data, dtype=dtype).reshape(spec.shape)
    return spec.name, arr.astype(dtype.newbyteorder("="), copy=False)


def pack_tensor_entries(tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Named arrays as a list of wire maps (the `tensors` field of a message)."""
    return [encode_array(name, arr) for name, arr in tensors.items()]


def unpack_tensor_entries(obj: Mapping[str, Any], key: str = "tensors") -> dict[str, np.ndarray]:
    """The list of wire maps under obj[key] back to named arrays; no name twice."""
    items = get_field(obj, key, "list")
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
    return pack_message("weights", {"tensors": pack_tensor_entries(tensors)})


def decode_weights(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, np.ndarray]:
    """Inverse of encode_weights."""
    return unpack_tensor_entries(unpack_message(payload, "weights", max_bytes))

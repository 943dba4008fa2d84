"""Message framing shared by every wire message: msgpack maps with a schema version,
size caps before unpacking, typed field access. Never pickle."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import DecodeError, SchemaError

SCHEMA_VERSION = 1

# Little-endian on the wire whatever the host; bool/object/complex are never accepted.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

MAX_TENSORS = 4096
MAX_DIMS = 8
# Hard ceiling for any single decoded message; callers pass tighter caps.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def pack_message(kind: str, body: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": kind, **body}, use_bin_type=True)


MAX_SIGNED_DEPTH = 32  # fedmq's signed messages nest 4 deep; a deeper one is refused


def canonical(obj: Any) -> bytes:
    """The one msgpack encoding of a decoded message that signatures cover: every map's keys
    in ascending order of their UTF-8 bytes, floats as float64, ints, str and bin lengths in
    their shortest msgpack form, str as str and bytes as bin. SchemaError for a map key that
    is not a string or nesting deeper than MAX_SIGNED_DEPTH."""
    try:
        return msgpack.packb(_sorted(obj, 0), use_bin_type=True, use_single_float=False)
    except (ValueError, TypeError, OverflowError) as err:  # what unpacking let through
        raise DecodeError(f"cannot encode the message canonically: {err}") from err


def _sorted(obj: Any, depth: int) -> Any:
    if depth > MAX_SIGNED_DEPTH:
        raise SchemaError(f"a signed message may nest at most {MAX_SIGNED_DEPTH} levels")
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise SchemaError("a signed message may only have string keys")
        return {k: _sorted(obj[k], depth + 1) for k in sorted(obj, key=lambda k: k.encode())}
    if isinstance(obj, (list, tuple)):
        return [_sorted(v, depth + 1) for v in obj]
    return obj


def unpack_message(payload: bytes, kind: str, max_bytes: int) -> dict[str, Any]:
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


def get_field(obj: Mapping[str, Any], key: str, typ: str, *, optional: bool = False) -> Any:
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


def str_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = get_field(obj, key, "list")
    if not all(isinstance(s, str) for s in items):
        raise SchemaError(f"{obj.get('kind')}: field {key!r} must be a list of strings")
    return tuple(items)


MAX_METRICS = 64  # entries of a metrics map
MAX_METRIC_NAME = 64  # characters of a metric's name


def num_map(obj: Mapping[str, Any], key: str) -> dict[str, float]:
    """A map of at most MAX_METRICS names (1-64 characters) to finite numbers."""
    raw = get_field(obj, key, "map", optional=True) or {}
    if len(raw) > MAX_METRICS:
        raise SchemaError(f"{obj.get('kind')}: field {key!r} has over {MAX_METRICS} entries")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{obj.get('kind')}: field {key!r} must map names to numbers")
        if not 0 < len(k) <= MAX_METRIC_NAME or not math.isfinite(v):
            raise SchemaError(
                f"{obj.get('kind')}: field {key!r} needs names of 1-{MAX_METRIC_NAME} "
                "characters and finite numbers"
            )
        out[k] = float(v)
    return out

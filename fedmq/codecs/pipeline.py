"""Update and model codecs composed into a pipeline, named by a short string.

    pipeline := [ "topk:" FRACTION "+" ] VALUES [ "+zstd" ]
    VALUES   := "float32" | "fp16" | "int8" | "int8:" BLOCK

`float32` sends every value as is; `fp16` rounds to float16; `int8` quantizes with
stochastic rounding and one float32 scale per BLOCK values (default 256; `int8:0` is one
scale per tensor); `topk:F` sends the fraction F of each tensor's values largest in
magnitude (at least one), at sorted positions; `zstd` compresses the encoded message.
An update is always a delta from the global version the device trained on.

The encoded form is a "weights" message (fedmq.wire), so a float32 body is byte for byte
the classic weights blob; every tensor map is a dense array (`dtype` float32 / float16),
an int8 map (`enc: int8`) or a sparse map (`enc: sparse`) holding one of those as values.
Decoding takes the model's tensor specs and raises only the ProtocolError family.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from fedmq.codecs.quantize import dequantize_int8, num_blocks, quantize_int8, to_float16
from fedmq.codecs.sparse import (
    SparseTensor,
    decode_indices,
    encode_indices,
    topk_count,
    topk_sparsify,
)
from fedmq.errors import DecodeError, SchemaError, ShapeMismatch
from fedmq.wire import TensorSpec
from fedmq.wire.framing import DTYPES, MAX_TENSORS, get_field, pack_message, unpack_message

VALUE_CODECS = ("float32", "fp16", "int8")
DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 24
ZSTD_LEVEL = 3

Decoded = np.ndarray | SparseTensor


@dataclass(frozen=True)
class Pipeline:
    """A parsed codec pipeline: optional top-k, a value codec, optional zstd."""

    values: str = "float32"
    block: int = DEFAULT_BLOCK  # int8 only
    topk: float = 0.0  # fraction of each tensor sent; 0 = dense
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.values not in VALUE_CODECS:
            raise ValueError(f"value codec must be one of {VALUE_CODECS}, got {self.values!r}")
        if not 0 <= self.block <= MAX_BLOCK:
            raise ValueError(f"int8 block must be in [0, {MAX_BLOCK}], got {self.block}")
        if not (self.topk == 0 or 0 < self.topk <= 1) or math.isnan(self.topk):
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.topk}")
        if self.values != "int8":  # a block only means something to int8: one name, one pipeline
            object.__setattr__(self, "block", DEFAULT_BLOCK)

    @property
    def sparse(self) -> bool:
        return self.topk > 0

    @property
    def lossless(self) -> bool:
        return self.values == "float32" and not self.sparse

    @property
    def name(self) -> str:
        """The canonical string: parse(p.name) == p."""
        parts = []
        if self.sparse:
            parts.append(f"topk:{self.topk:g}")
        if self.values == "int8" and self.block != DEFAULT_BLOCK:
            parts.append(f"int8:{self.block}")
        else:
            parts.append(self.values)
        if self.zstd:
            parts.append("zstd")
        return "+".join(parts)

    def __str__(self) -> str:
        return self.name

    def with_topk(self, fraction: float) -> Pipeline:
        """The same pipeline sending `fraction` of each tensor."""
        return Pipeline(values=self.values, block=self.block, topk=fraction, zstd=self.zstd)


def parse_pipeline(text: str) -> Pipeline:
    """A pipeline from its name, e.g. 'topk:0.01+int8+zstd'; ValueError says what is wrong."""
    stages = [s.strip() for s in str(text).split("+")]
    topk, values, block, zstd = 0.0, "", DEFAULT_BLOCK, False
    order = 0  # topk (0) -> values (1) -> zstd (2)
    for stage in stages:
        head, _, arg = stage.partition(":")
        if head == "topk" and order == 0:
            try:
                topk = float(arg)
            except ValueError:
                topk = math.nan
            if not 0 < topk <= 1:  # also NaN; 0 would silently mean "dense"
                raise ValueError(f"codec {text!r}: top-k needs a fraction in (0, 1], e.g. topk:0.1")
            order = 1
        elif head in VALUE_CODECS and order <= 1 and not values:
            values = head
            if head == "int8" and arg:
                try:
                    block = int(arg)
                except ValueError:
                    raise ValueError(f"codec {text!r}: int8 block must be an integer") from None
            elif arg:
                raise ValueError(f"codec {text!r}: {head} takes no argument")
            order = 2
        elif head == "zstd" and not arg and order >= 1 and not zstd:
            zstd = True
            order = 3
        else:
            raise ValueError(
                f"codec {text!r}: unexpected stage {stage!r}; write "
                "[topk:F+](float32|fp16|int8[:BLOCK])[+zstd], e.g. topk:0.01+int8+zstd"
            )
    if not values:
        raise ValueError(f"codec {text!r} names no value codec (float32, fp16 or int8)")
    return Pipeline(values=values, block=block, topk=topk, zstd=zstd)


# ---------------------------------------------------------------- encode


def _encode_values(flat: np.ndarray, p: Pipeline, rng: np.random.Generator) -> dict[str, Any]:
    if p.values == "float32":
        return {"dtype": "float32", "data": flat.astype("<f4").tobytes()}
    if p.values == "fp16":
        return {"dtype": "float16", "data": to_float16(flat).astype("<f2").tobytes()}
    codes, scales = quantize_int8(flat, block=p.block, rng=rng)
    return {
        "enc": "int8",
        "block": p.block,
        "scales": scales.astype("<f4").tobytes(),
        "data": codes.tobytes(),
    }


def encode_tensors(
    tensors: Mapping[str, np.ndarray], p: Pipeline, *, rng: np.random.Generator
) -> bytes:
    """Tensors as one encoded body (a 'weights' message, zstd-compressed if asked)."""
    items = []
    for name, arr in tensors.items():
        flat = np.asarray(arr, dtype=np.float32).reshape(-1)
        shape = [int(d) for d in np.shape(arr)]
        if p.sparse:
            idx, vals = topk_sparsify(flat, topk_count(flat.size, p.topk))
            index_dtype, index = encode_indices(idx)
            values = _encode_values(vals, p, rng)
            item = {"name": name, "shape": shape, "enc": "sparse", "nnz": int(idx.size),
                    "index_dtype": index_dtype, "index": index, "values": values}  # fmt: skip
        else:
            values = _encode_values(flat, p, rng)
            if "dtype" in values:  # the classic tensor map, key order and all (section 3.3)
                item = {"name": name, "dtype": values["dtype"], "shape": shape,
                        "data": values["data"]}  # fmt: skip
            else:
                item = {"name": name, "shape": shape, **values}
        items.append(item)
    body = pack_message("weights", {"tensors": items})
    if p.zstd:
        body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    return body


# ---------------------------------------------------------------- decode


def decoded_bound(specs: Sequence[TensorSpec]) -> int:
    """The most bytes an honest encoding of these tensors can take before compression."""
    return sum(9 * s.size + 256 for s in specs) + 4096


def _bounded_unzstd(body: bytes, limit: int) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        raw = reader.read(limit + 1)
    except zstandard.ZstdError as err:
        raise DecodeError(f"zstd: {err}") from err
    if len(raw) > limit:
        raise DecodeError(f"zstd: decompresses past {limit} bytes, more than the model needs")
    return raw


def _decode_values(obj: Any, n: int, p: Pipeline, what: str) -> np.ndarray:
    if not isinstance(obj, dict):
        raise SchemaError(f"{what}: values must be a map")
    enc = obj.get("enc", "dense")
    data = get_field(obj, "data", "bytes")
    if enc == "int8":
        if p.values != "int8":
            raise SchemaError(f"{what}: int8 values in a {p.name} encoding")
        block = get_field(obj, "block", "int")
        if not 0 <= block <= MAX_BLOCK:
            raise SchemaError(f"{what}: int8 block {block} out of range")
        scales_raw = get_field(obj, "scales", "bytes")
        nb = num_blocks(n, block)
        if len(data) != n or len(scales_raw) != 4 * nb:
            raise DecodeError(
                f"{what}: {len(data)} codes and {len(scales_raw) // 4} scales for {n} values "
                f"in blocks of {block}"
            )
        # never pickle: np.frombuffer reads plain numbers and nothing else
        scales = np.frombuffer(scales_raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ShapeMismatch(f"{what}: int8 scales must be finite and non-negative")
        codes = np.frombuffer(data, dtype=np.int8)
        values = dequantize_int8(codes, scales, block=block)
        # finite scales can still dequantise to inf (127 x 3e38): check the values too
        if not np.isfinite(values).all():
            raise ShapeMismatch(f"{what}: int8 values dequantise to non-finite numbers")
        return values
    if enc != "dense":
        raise SchemaError(f"{what}: unknown value encoding {enc!r}")
    dtype = get_field(obj, "dtype", "str")
    want = {"float32": "float32", "fp16": "float16"}.get(p.values)
    if dtype != want:
        raise SchemaError(f"{what}: {dtype} values in a {p.name} encoding")
    if len(data) != n * DTYPES[dtype].itemsize:
        raise DecodeError(f"{what}: {len(data)} bytes for {n} {dtype} values")
    values = np.frombuffer(data, dtype=DTYPES[dtype]).astype(np.float32)
    if not np.isfinite(values).all():
        raise ShapeMismatch(f"{what}: non-finite values")
    return values


def _decode_tensor(obj: Any, spec: TensorSpec, p: Pipeline) -> Decoded:
    what = f"tensor {spec.name!r}"
    shape = get_field(obj, "shape", "list")
    if tuple(shape) != spec.shape:
        raise ShapeMismatch(f"{what} has shape {tuple(shape)}, expected {spec.shape}")
    if obj.get("enc") == "sparse":
        if not p.sparse:
            raise SchemaError(f"{what}: a sparse tensor in a dense {p.name} encoding")
        nnz = get_field(obj, "nnz", "int")
        if not 0 <= nnz <= spec.size:
            raise ShapeMismatch(f"{what}: {nnz} values for {spec.size} positions")
        index_dtype = get_field(obj, "index_dtype", "str")
        if index_dtype not in ("uint16", "uint32"):
            raise SchemaError(f"{what}: index dtype {index_dtype!r} is not allowed")
        index = get_field(obj, "index", "bytes")
        if len(index) != nnz * DTYPES[index_dtype].itemsize:
            raise DecodeError(f"{what}: {len(index)} index bytes for {nnz} {index_dtype}")
        indices = decode_indices(np.frombuffer(index, dtype=DTYPES[index_dtype]), spec.size)
        if indices is None:
            raise ShapeMismatch(f"{what}: indices not strictly increasing within {spec.size}")
        values = _decode_values(get_field(obj, "values", "map"), nnz, p, what)
        return SparseTensor(shape=spec.shape, indices=indices, values=values)
    if p.sparse:
        raise SchemaError(f"{what}: a dense tensor in a sparse {p.name} encoding")
    return _decode_values(obj, spec.size, p, what).reshape(spec.shape)


def decode_tensors(body: bytes, codec: str, specs: Sequence[TensorSpec], *,
                   optional: frozenset[str] = frozenset()) -> dict[str, Decoded]:  # fmt: skip
    """An encoded body back to tensors shaped by specs; only ProtocolErrors on bad input.
    Tensors named in optional may be missing (a fedper update leaves its head out)."""
    p = parse_or_schema_error(codec)
    limit = decoded_bound(specs)
    if not isinstance(body, (bytes, bytearray)):
        raise DecodeError("encoded tensors must be bytes")
    if p.zstd:
        body = _bounded_unzstd(bytes(body), limit)
    obj = unpack_message(body, "weights", limit)
    items = get_field(obj, "tensors", "list")
    if len(items) > MAX_TENSORS:
        raise SchemaError(f"{len(items)} tensors exceeds the limit of {MAX_TENSORS}")
    by_name = {s.name: s for s in specs}
    out: dict[str, Decoded] = {}
    for item in items:
        if not isinstance(item, dict):
            raise SchemaError("every tensor must be a map")
        name = get_field(item, "name", "str")
        if name not in by_name:
            raise ShapeMismatch(f"tensor {name!r} is not part of the model")
        if name in out:
            raise SchemaError(f"tensor {name!r} appears twice")
        out[name] = _decode_tensor(item, by_name[name], p)
    missing = sorted(set(by_name) - set(out) - optional)
    if missing:
        raise ShapeMismatch(f"tensors missing: {missing}")
    return out


def parse_or_schema_error(codec: str) -> Pipeline:
    """parse_pipeline for a name that came from the network: SchemaError, not ValueError."""
    if not isinstance(codec, str):
        raise SchemaError("codec must be a string")
    try:
        return parse_pipeline(codec)
    except ValueError as err:
        raise SchemaError(str(err)) from err


def to_dense(t: Decoded) -> np.ndarray:
    """A decoded tensor as a dense float32 array."""
    return t.to_dense() if isinstance(t, SparseTensor) else t

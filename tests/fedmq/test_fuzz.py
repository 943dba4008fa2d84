"""Fuzzing every decoder and the reassembler: whatever the bytes, only a ProtocolError.

Three kinds of input per decoder: arbitrary bytes; structured but hostile messages (the
right schema version and kind, every field drawn from msgpack values of any type and
size, NaN and inf included); and valid messages with bytes flipped or cut. Anything other
than a ProtocolError (an IndexError, a numpy warning turned error, an OverflowError)
is a way for one message to stop a service. max_examples is set on every test: about
11,400 examples in all, in well under a minute.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.chunks import Reassembler, split_payload
from fedmq.codecs import (
    apply_model_delta,
    decode_model,
    decode_tensors,
    encode_tensors,
    parse_or_schema_error,
    parse_pipeline,
)
from fedmq.errors import ChunkError, ProtocolError
from fedmq.wire import (
    Ack,
    Chunk,
    DeviceMetrics,
    DeviceState,
    Manifest,
    PayloadRef,
    RoundAnnouncement,
    TensorSpec,
    TrainConfig,
    Update,
    decode_ack,
    decode_array,
    decode_chunk,
    decode_manifest,
    decode_metrics,
    decode_round,
    decode_state,
    decode_update,
    decode_weights,
    encode_ack,
    encode_chunk,
    encode_manifest,
    encode_metrics,
    encode_round,
    encode_state,
    encode_update,
    encode_weights,
)

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
SPECS = (TensorSpec("w", "float32", (3, 4)), TensorSpec("b", "float32", (4,)))
PIPELINES = ["float32", "fp16", "int8", "int8:0", "int8:5", "topk:0.5+float32",
             "topk:0.3+int8+zstd", "fp16+zstd", "topk:1+fp16"]  # fmt: skip


def _only_protocol_errors(decode: Callable[[], Any]) -> None:
    """Run decode with warnings (numpy's overflow, invalid value) as errors; anything but a
    ProtocolError fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with contextlib.suppress(ProtocolError):
            decode()


# ---------------------------------------------------------------- valid messages

_WEIGHTS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
_REF = PayloadRef("w1", 100, "a" * 64, 1, 0)
VALID: dict[str, tuple[bytes, Callable[[bytes], Any]]] = {
    "chunk": (encode_chunk(split_payload(b"x" * 50, "p", 1024)[0]), decode_chunk),
    "global": (encode_manifest(Manifest("j", 1, 1, 0.0, "t", "float32", SPECS, _REF,
                                        model_sha256="b" * 64)), decode_manifest),
    "round": (encode_round(RoundAnnouncement("j", 1, 0, "open", 0.0, 1.0, ("a", "b"), 2, 1,
                                             TrainConfig())), decode_round),
    "update": (encode_update(Update("u", "a", 1, 0, 10, "float32", b"body",
                                    metrics={"l": 1.0})), decode_update),
    "ack": (encode_ack(Ack("u", 1, "accepted")), decode_ack),
    "state": (encode_state(DeviceState("a", "online", "j")), decode_state),
    "metrics": (encode_metrics(DeviceMetrics("a", 1, 0, {"acc": 0.5})), decode_metrics),
    "weights": (encode_weights(_WEIGHTS), decode_weights),
}  # fmt: skip
DECODERS = sorted(VALID)


@settings(FUZZ, max_examples=4500)
@given(kind=st.sampled_from(DECODERS), payload=st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_errors(kind: str, payload: bytes) -> None:
    _only_protocol_errors(lambda: VALID[kind][1](payload))


@settings(FUZZ, max_examples=2000)
@given(kind=st.sampled_from(DECODERS), data=st.data())
def test_damaged_valid_messages_raise_only_protocol_errors(kind: str, data: Any) -> None:
    good, decode = VALID[kind]
    b = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del b[i:]
        else:
            b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _only_protocol_errors(lambda: decode(bytes(b)))


# ---------------------------------------------------------------- structured but hostile

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=80),
    st.binary(max_size=80), st.sampled_from(["", "a", "..", "x" * 70, "float32", "int8"]),
)  # fmt: skip
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=6)  # fmt: skip


@settings(FUZZ, max_examples=1000)
@given(kind=st.sampled_from(DECODERS), data=st.data())
def test_hostile_fields_raise_only_protocol_errors(kind: str, data: Any) -> None:
    """The right schema version and kind, each field of the valid message replaced (or
    dropped, or joined by extras) by msgpack values of any type."""
    good, decode = VALID[kind]
    obj = msgpack.unpackb(good, raw=False)
    for key in [k for k in obj if k not in ("v", "kind")]:
        how = data.draw(st.sampled_from(["keep", "keep", "replace", "drop"]))
        if how == "replace":
            obj[key] = data.draw(_VALUES)
        elif how == "drop":
            del obj[key]
    obj.update(data.draw(st.dictionaries(st.text(max_size=6), _VALUES, max_size=2)))
    payload = msgpack.packb(obj, use_bin_type=True)
    _only_protocol_errors(lambda: decode(payload))


@settings(FUZZ, max_examples=300)
@given(obj=_VALUES)
def test_decode_array_takes_only_wellformed_maps(obj: Any) -> None:
    _only_protocol_errors(lambda: decode_array(obj))


# ---------------------------------------------------------------- codecs

_NAMES = st.sampled_from(["w", "b", "x", ""])
_SHAPES = st.sampled_from([[3, 4], [4], [12], [], [0], [2**31], [-1], ["3"]])
_ENCS = st.sampled_from(["dense", "int8", "sparse", "zstd", None, 5])
_DTYPES = st.sampled_from(["float32", "float16", "int8", "uint16", "uint32", "<f4", None])
_BLOB = st.one_of(st.binary(max_size=64), st.sampled_from([
    np.full(16, 3e38, "<f4").tobytes(), np.full(12, 127, np.int8).tobytes(),
    np.array([1, 1, 1, 1], "<u2").tobytes(), np.array([0, 0], "<u4").tobytes(),
    np.full(4, np.inf, "<f4").tobytes(), np.full(4, 65504, "<f2").tobytes()]))  # fmt: skip
_INTS = st.one_of(st.integers(-3, 20), st.sampled_from([2**24, 2**24 + 1, 2**31, 2**63 - 1]))


def _values_map() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "enc": _ENCS, "dtype": _DTYPES, "data": _BLOB, "scales": _BLOB, "block": _INTS})


_TENSOR = st.fixed_dictionaries({"name": _NAMES, "shape": _SHAPES}, optional={
    "enc": _ENCS, "dtype": _DTYPES, "data": _BLOB, "scales": _BLOB, "block": _INTS,
    "nnz": _INTS, "index_dtype": _DTYPES, "index": _BLOB, "values": _values_map()})  # fmt: skip


@settings(FUZZ, max_examples=1500)
@given(
    codec=st.one_of(st.sampled_from(PIPELINES), st.text(max_size=20)),
    tensors=st.lists(_TENSOR, max_size=3),
    zstd=st.booleans(),
)
def test_hostile_tensor_bodies_raise_only_protocol_errors(
    codec: str, tensors: list[dict[str, Any]], zstd: bool
) -> None:
    body = msgpack.packb({"v": 1, "kind": "weights", "tensors": tensors}, use_bin_type=True)
    if zstd:
        import zstandard

        body = zstandard.ZstdCompressor().compress(body)
    _only_protocol_errors(lambda: decode_tensors(body, codec, SPECS))


@settings(FUZZ, max_examples=1000)
@given(codec=st.sampled_from(PIPELINES), body=st.binary(max_size=300), data=st.data())
def test_model_payloads_and_deltas_raise_only_protocol_errors(
    codec: str, body: bytes, data: Any
) -> None:
    p = parse_pipeline(codec)
    if data.draw(st.booleans()):  # a real encoding, damaged
        good = bytearray(encode_tensors(_WEIGHTS, p, rng=np.random.default_rng(0)))
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] ^= data.draw(st.integers(1, 255))
        body = bytes(good)
    full = parse_pipeline(data.draw(st.sampled_from(["float32", "fp16", "int8"])))
    _only_protocol_errors(lambda: decode_model(body, p, SPECS))
    _only_protocol_errors(
        lambda: apply_model_delta(_WEIGHTS, body, full=full, delta=p, version=3)
    )


@settings(FUZZ, max_examples=500)
@given(name=st.text(max_size=40))
def test_pipeline_names_from_the_network_raise_only_protocol_errors(name: str) -> None:
    _only_protocol_errors(lambda: parse_or_schema_error(name))


def test_an_int8_scale_that_overflows_is_refused() -> None:
    """The finite-scale attack, as a decoder case: 127 x 3e38 is inf in float32."""
    body = encode_tensors(_WEIGHTS, parse_pipeline("int8"), rng=np.random.default_rng(0))
    obj = msgpack.unpackb(body, raw=False)
    for t in obj["tensors"]:
        t["scales"] = np.full(len(t["scales"]) // 4, 3e38, "<f4").tobytes()
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_tensors(msgpack.packb(obj, use_bin_type=True), "int8", SPECS)


# ---------------------------------------------------------------- the reassembler

_CHUNKS = st.builds(
    Chunk,
    payload_id=st.sampled_from(["p", "q", "r"]),
    index=st.integers(0, 5),
    count=st.integers(1, 6),
    total_size=st.integers(0, 3000),
    digest=st.sampled_from([b"\0" * 32, b"\1" * 32]),
    data=st.binary(max_size=1200),
)


@settings(FUZZ, max_examples=600)
@given(steps=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _CHUNKS,
                                st.floats(0, 50)), max_size=30))  # fmt: skip
def test_the_reassembler_raises_only_chunk_errors_and_keeps_its_bounds(
    steps: list[tuple[str, Chunk, float]],
) -> None:
    r = Reassembler(max_payload_bytes=2500, max_open=4, max_total_bytes=4000, max_chunks=6,
                    max_age_s=20, max_open_per_source=2, max_bytes_per_source=2500)  # fmt: skip
    for source, chunk, now in sorted(steps, key=lambda s: s[2]):
        with contextlib.suppress(ChunkError):
            r.add(chunk, source=source, now=now)
        held = sum(r.held_by(s)[1] for s in "abc")
        assert r.held_bytes == held <= r.max_total_bytes
        assert r.open_payloads <= r.max_open
        for s in "abc":
            n, nbytes = r.held_by(s)
            assert n <= r.max_open_per_source and nbytes <= r.max_bytes_per_source

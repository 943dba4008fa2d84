"""Wire schema: round trips, and arbitrary bytes raise only the protocol error family."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.errors import DecodeError, ProtocolError, SchemaError, ShapeMismatch
from fedmq.wire import (
    DTYPES,
    Ack,
    DeltaRef,
    DeviceMetrics,
    DeviceState,
    Manifest,
    PayloadRef,
    RoundAnnouncement,
    TensorSpec,
    TrainConfig,
    Update,
    check_tensors,
    decode_ack,
    decode_chunk,
    decode_manifest,
    decode_metrics,
    decode_round,
    decode_state,
    decode_update,
    decode_weights,
    encode_ack,
    encode_manifest,
    encode_metrics,
    encode_round,
    encode_state,
    encode_update,
    encode_weights,
)

names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)
arrays = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda dt: hnp.arrays(
        dtype=np.dtype(DTYPES[dt]).newbyteorder("="),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    )
)
tensor_maps = st.dictionaries(names, arrays, max_size=5)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and np.array_equal(a[k], b[k], equal_nan=True)
        for k in a
    )  # fmt: skip


@given(tensor_maps)
def test_weights_round_trip(tensors: dict[str, np.ndarray]) -> None:
    assert _same(decode_weights(encode_weights(tensors)), tensors)


@given(
    body=st.binary(max_size=256),
    uid=st.text(min_size=1, max_size=64),
    device=names,
    rnd=st.integers(0, 2**31),
    base=st.integers(0, 2**31),
    n=st.integers(1, 2**31),
    metrics=st.dictionaries(names, finite, max_size=3),
)
def test_update_round_trip(body, uid, device, rnd, base, n, metrics) -> None:  # noqa: ANN001
    u = Update(uid, device, rnd, base, n, "int8+zstd", body, metrics, fetched_bytes=7)
    back = decode_update(encode_update(u))
    assert back == u
    assert (back.update_id, back.device, back.round_id, back.base_version, back.num_examples) == (
        uid, device, rnd, base, n,
    )  # fmt: skip
    assert back.metrics == metrics and back.fetched_bytes == 7


def _manifest(onnx: bool = True) -> Manifest:
    ref = PayloadRef("w3", 1000, "ab" * 32, 2, 0)
    return Manifest(
        job="j", version=3, round_id=2, created=1.5, task="mnist-2nn", codec="float32",
        tensors=(TensorSpec("a", "float32", (2, 3)), TensorSpec("b", "float32", (3,))),
        weights=ref, onnx=PayloadRef("o3", 10, "cd" * 32, 1, 2) if onnx else None,
        metrics={"accuracy": 0.9}, model_sha256="ef" * 32,
        delta=DeltaRef(2, "12" * 32, "int8+zstd", PayloadRef("d3", 99, "34" * 32, 1, 3))
        if onnx else None,
    )  # fmt: skip


@pytest.mark.parametrize("onnx", [True, False])
def test_manifest_round_trip(onnx: bool) -> None:
    m = _manifest(onnx)
    assert decode_manifest(encode_manifest(m)) == m
    assert m.num_params == 9


def test_small_messages_round_trip() -> None:
    r = RoundAnnouncement("j", 4, 3, "open", 1.0, 61.0, ("a", "b"), 2, 1, TrainConfig(2, 10, 0.05))
    assert decode_round(encode_round(r)) == r
    a = Ack("u1", 4, "late", "round already closed")
    assert decode_ack(encode_ack(a)) == a
    s = DeviceState("d1", "online", "j", "rpi4", "0.1.0", 400, 3, 12.5, trains=False)
    assert decode_state(encode_state(s)) == s
    m = DeviceMetrics("d1", 4, 3, {"train_loss": 0.25})
    assert decode_metrics(encode_metrics(m)) == m


def test_prox_mu_travels_in_train_only_when_on_and_is_checked() -> None:
    plain = RoundAnnouncement("j", 4, 3, "open", 1.0, 61.0, ("a",), 1, 1, TrainConfig(2, 10, 0.05))
    raw = msgpack.unpackb(encode_round(plain))
    assert "prox_mu" not in raw["train"]  # FedProx off: the message is what it was before it
    assert decode_round(encode_round(plain)).train.prox_mu == 0.0
    prox = RoundAnnouncement("j", 4, 3, "open", 1.0, 61.0, ("a",), 1, 1,
                             TrainConfig(2, 10, 0.05, prox_mu=0.01))  # fmt: skip
    assert decode_round(encode_round(prox)) == prox
    for bad in (-1.0, 1e9, float("nan"), float("inf"), "0.1", True, [0.1]):
        raw["train"]["prox_mu"] = bad
        with pytest.raises(SchemaError):
            decode_round(msgpack.packb(raw))


DECODERS = [decode_weights, decode_update, decode_manifest, decode_round, decode_ack,
            decode_state, decode_metrics, decode_chunk]  # fmt: skip


@settings(max_examples=300)
@given(data=st.binary(max_size=512), which=st.sampled_from(DECODERS))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes, which) -> None:  # noqa: ANN001
    with contextlib.suppress(ProtocolError):  # anything else fails the test
        which(data)


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300)
@given(
    body=st.dictionaries(st.sampled_from(["id", "tensors", "round", "device", "data", "name",
                                          "dtype", "shape", "i", "n"]), plain, max_size=6),
    kind=st.sampled_from(["update", "weights", "chunk", "global", "round", "ack", "state"]),
    which=st.sampled_from(DECODERS),
)  # fmt: skip
def test_wellformed_msgpack_with_wrong_fields_raises_protocol_errors(body, kind, which) -> None:  # noqa: ANN001
    with contextlib.suppress(ProtocolError):
        which(msgpack.packb({"v": 1, "kind": kind, **body}, use_bin_type=True))


def test_size_cap_applies_before_unpacking() -> None:
    payload = encode_weights({"w": np.zeros(1000, np.float32)})
    with pytest.raises(DecodeError, match="exceeds"):
        decode_weights(payload, max_bytes=100)


def test_rejects_disallowed_dtype_and_bad_byte_count() -> None:
    bad = {"name": "w", "dtype": "object", "shape": [1], "data": b"\0" * 8}
    with pytest.raises(SchemaError, match="not allowed"):
        decode_weights(msgpack.packb({"v": 1, "kind": "weights", "tensors": [bad]}))
    short = {"name": "w", "dtype": "float32", "shape": [4], "data": b"\0" * 15}
    with pytest.raises(DecodeError, match="15 bytes"):
        decode_weights(msgpack.packb({"v": 1, "kind": "weights", "tensors": [short]}))


def test_unknown_schema_version_and_kind() -> None:
    with pytest.raises(SchemaError, match="schema version"):
        decode_ack(msgpack.packb({"v": 99, "kind": "ack"}))
    with pytest.raises(SchemaError, match="expected a 'ack'"):
        decode_ack(encode_state(DeviceState("d", "online")))


def test_check_tensors() -> None:
    specs = (TensorSpec("a", "float32", (2,)),)
    check_tensors({"a": np.zeros(2, np.float32)}, specs)
    with pytest.raises(ShapeMismatch, match="shape"):
        check_tensors({"a": np.zeros(3, np.float32)}, specs)
    with pytest.raises(ShapeMismatch, match="names"):
        check_tensors({"b": np.zeros(2, np.float32)}, specs)
    with pytest.raises(ShapeMismatch, match="non-finite"):
        check_tensors({"a": np.array([1.0, np.nan], np.float32)}, specs)

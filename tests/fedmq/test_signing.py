"""Signed downlink: keys, the canonical bytes a signature covers, and tampering."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.errors import ProtocolError
from fedmq.signing import (
    Signer,
    aggregator_key,
    create_key,
    key_id,
    load_private_key,
    load_public_key,
    verify,
)
from fedmq.wire import (
    DeltaRef,
    Manifest,
    PayloadRef,
    RoundAnnouncement,
    TensorSpec,
    TrainConfig,
    decode_manifest,
    decode_round,
    encode_manifest,
    encode_round,
)
from fedmq.wire.framing import canonical, unpack_message
from fedmq.wire.signed import read_signature

TOPIC, ROUND_TOPIC = "p/j/global", "p/j/round"
KEY = Ed25519PrivateKey.generate()


def manifest() -> Manifest:
    ref = PayloadRef(payload_id="w3", size=1000, sha256="a" * 64, chunks=2, first_index=0)
    return Manifest(
        job="j", version=3, round_id=3, created=12.5, task="t", codec="float32",
        tensors=(TensorSpec("w", "float32", (2, 3)),), weights=ref,
        onnx=PayloadRef(payload_id="o3", size=10, sha256="b" * 64, chunks=1, first_index=2),
        metrics={"accuracy": 0.5}, model_sha256="c" * 64, epoch=77,
        delta=DeltaRef(base_version=2, base_sha256="d" * 64, codec="int8+zstd",
                       payload=PayloadRef("d3", 50, "e" * 64, 1, 3)),
    )  # fmt: skip


def announcement() -> RoundAnnouncement:
    return RoundAnnouncement(
        job="j", round_id=4, model_version=3, state="open", opened_at=1.0, deadline=31.0,
        selected=("a", "b"), target=2, min_devices=1, train=TrainConfig(2, 10, 0.05, 0.5),
        codec="topk:0.1+int8+zstd", max_update_bytes=4096, task="t", epoch=77,
    )  # fmt: skip


def signed_manifest(m: Manifest | None = None, topic: str = TOPIC) -> bytes:
    return encode_manifest(m or manifest(), sign=Signer(key=KEY).for_topic(topic))


def checks(sig: Any, topic: str = TOPIC) -> bool:
    return sig is not None and verify(KEY.public_key(), topic, sig) is None


def test_a_signed_manifest_and_round_verify_and_decode_as_before() -> None:
    m = decode_manifest(signed_manifest())
    assert m == manifest() and checks(m.sig) and m.sig is not None
    assert m.sig.key_id == key_id(KEY.public_key()) and len(m.sig.value) == 64
    r = decode_round(encode_round(announcement(), sign=Signer(key=KEY).for_topic(ROUND_TOPIC)))
    assert r == announcement() and checks(r.sig, ROUND_TOPIC)
    assert decode_manifest(encode_manifest(manifest())).sig is None  # unsigned: no sig


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every leaf of a decoded message map, as a key path."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _paths(v, (*path, k))]
    if isinstance(obj, list) and obj:
        return [p for i, v in enumerate(obj) for p in _paths(v, (*path, i))]
    return [path]


def _tampered(obj: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        if isinstance(obj, bool):
            return not obj
        if isinstance(obj, (int, float)):
            return obj + 1
        if isinstance(obj, str):  # same length: hex digests stay well-formed
            return obj[:-1] + ("y" if obj.endswith("x") else "x") if obj else "x"
        if isinstance(obj, bytes):
            return obj[:-1] + bytes([obj[-1] ^ 1]) if obj else b"x"
        return 0 if obj is None else [1]
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    out[path[0]] = _tampered(obj[path[0]], path[1:])
    return out


@pytest.mark.parametrize("kind", ["global", "round"])
def test_changing_any_field_breaks_the_signature(kind: str) -> None:
    if kind == "global":
        topic, payload, decode = TOPIC, signed_manifest(), decode_manifest
    else:
        topic = ROUND_TOPIC
        payload = encode_round(announcement(), sign=Signer(key=KEY).for_topic(topic))
        decode = decode_round  # type: ignore[assignment]
    obj = msgpack.unpackb(payload)
    leaves = [p for p in _paths(obj) if p[0] not in ("sig", "v", "kind")]
    # every payload digest, every train setting and the selection are among them
    assert {("weights", "sha256"), ("onnx", "sha256"), ("delta", "payload", "sha256"),
            ("model_sha256",), ("epoch",)} <= set(leaves) or kind == "round"  # fmt: skip
    assert {("train", "epochs"), ("train", "lr"), ("selected", 0), ("codec",),
            ("epoch",), ("task",)} <= set(leaves) or kind == "global"  # fmt: skip
    decoded = 0
    for path in leaves:
        forged = msgpack.packb(_tampered(obj, path), use_bin_type=True)
        try:
            got = decode(forged)
        except ProtocolError:  # a tampered value the decoder refuses is fine too
            continue
        decoded += 1
        assert not checks(got.sig, topic), path
    assert decoded >= len(leaves) - 2  # nearly every change decodes: the signature catches it
    # an extra field is covered too (decoders ignore unknown keys, signatures do not)
    extra = msgpack.packb({**obj, "note": "x"}, use_bin_type=True)
    assert not checks(decode(extra).sig, topic)
    # and the untouched message, re-encoded with its keys in another order, still verifies
    shuffled = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    assert checks(decode(shuffled).sig, topic)


def test_a_signature_is_bound_to_its_topic_and_key() -> None:
    m = decode_manifest(signed_manifest())
    for topic in ("p/other/global", "q/j/global", "p/j/round"):  # another job, prefix, kind
        assert not checks(m.sig, topic)
    other = Ed25519PrivateKey.generate()
    assert m.sig is not None
    assert "trusts key" in (verify(other.public_key(), TOPIC, m.sig) or "")
    forged = decode_manifest(encode_manifest(manifest(), sign=lambda covered: (
        key_id(KEY.public_key()), other.sign(covered))))  # fmt: skip
    assert "does not match" in (verify(KEY.public_key(), TOPIC, forged.sig) or "")  # type: ignore[arg-type]


def test_canonical_encoding_sorts_keys_and_widens_floats() -> None:
    a = canonical({"b": 1.5, "a": {"y": [1, "x"], "x": b"\x00"}})
    assert a == canonical({"a": {"x": b"\x00", "y": [1, "x"]}, "b": 1.5})
    assert msgpack.unpackb(a) == {"a": {"x": b"\x00", "y": [1, "x"]}, "b": 1.5}
    assert b"\xcb" in a  # float64


def test_keys_are_created_once_with_a_private_mode_and_load_back(tmp_path: Path) -> None:
    key, pub, created = aggregator_key(None, tmp_path)
    private = tmp_path / "signing-key.pem"
    assert created and pub == tmp_path / "signing-key.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again, _, created_again = aggregator_key(None, tmp_path)
    assert not created_again and key_id(again.public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(pub)) == key_id(key.public_key())
    made = create_key(tmp_path / "k" / "agg.pem", tmp_path / "k" / "agg.pub.pem")
    configured, none, _ = aggregator_key(tmp_path / "k" / "agg.pem", tmp_path / "other")
    assert none is None and key_id(configured.public_key()) == key_id(made.public_key())
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        load_private_key(pub)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ValueError, match="PEM public key"):
        load_public_key(tmp_path / "junk.pem")


def test_dataclass_equality_ignores_the_signature() -> None:
    m = decode_manifest(signed_manifest())
    assert dataclasses.replace(m, sig=None) == m


@pytest.mark.parametrize("depth", [40, 900, 1000])
def test_a_hostile_signed_message_raises_only_protocol_errors(depth: int) -> None:
    head = msgpack.packb({"v": 1, "kind": "round", "sig": {"alg": "ed25519", "key": "0" * 16,
                                                           "value": b"0" * 64}})  # fmt: skip
    payload = bytes([0x84]) + head[1:] + msgpack.packb("junk") + b"\x91" * depth + b"\x01"
    obj = unpack_message(payload, "round", 1 << 20)  # msgpack's own limits let it through
    with pytest.raises(ProtocolError):
        read_signature(obj)
    with pytest.raises(ProtocolError):
        canonical({1: "a"})  # a non-string key (msgpack lets bytes keys through)

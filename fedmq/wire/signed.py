"""Signed downlink messages: the `sig` field and the exact bytes a signature covers.

The aggregator signs its `global` manifests and `round` announcements. A signature covers
the whole message map except `sig` itself, in a canonical msgpack encoding (`canonical`),
bound to the topic the message is published on, so it cannot be moved to another topic,
prefix or job. This module defines the field and the bytes; `fedmq.signing` holds the keys
and does the Ed25519 arithmetic over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmq.errors import SchemaError
from fedmq.wire.framing import SCHEMA_VERSION, canonical

SIG_ALGORITHM = "ed25519"
SIG_CONTEXT = b"fedmq-sig-v1\x00"  # domain separation: these bytes sign nothing else
SIG_BYTES = 64
KEY_ID_CHARS = 16

# covered bytes -> (key id, signature); fedmq.signing.Signer.for_topic makes one
SignFn = Callable[[bytes], tuple[str, bytes]]


@dataclass(frozen=True)
class Signature:
    """The `sig` field of a received message, with the canonical bytes it must cover."""

    key_id: str  # 16 hex digits: the start of the SHA-256 of the raw 32-byte public key
    value: bytes  # the 64-byte Ed25519 signature
    covered: bytes  # canonical(the message map without `sig`); not itself on the wire


def signing_input(topic: str, covered: bytes) -> bytes:
    """What the Ed25519 key signs: context, the topic, then the canonical message."""
    return SIG_CONTEXT + topic.encode() + b"\x00" + covered


def sign_body(kind: str, body: dict[str, Any], sign: SignFn | None) -> dict[str, Any]:
    """body with a `sig` field over (v, kind, body) when sign is given; body otherwise."""
    if sign is None:
        return body
    key_id, value = sign(canonical({"v": SCHEMA_VERSION, "kind": kind, **body}))
    return {**body, "sig": {"alg": SIG_ALGORITHM, "key": key_id, "value": value}}


def read_signature(obj: Mapping[str, Any]) -> Signature | None:
    """The `sig` field of a decoded message map (None when unsigned); SchemaError if malformed."""
    raw = obj.get("sig")
    if raw is None:
        return None
    kind = obj.get("kind", "message")
    if not isinstance(raw, dict):
        raise SchemaError(f"{kind}: field 'sig' must be a map")
    alg, key, value = raw.get("alg"), raw.get("key"), raw.get("value")
    if alg != SIG_ALGORITHM:
        raise SchemaError(f"{kind}: unsupported signature algorithm {alg!r}")
    if not isinstance(key, str) or len(key) != KEY_ID_CHARS:
        raise SchemaError(f"{kind}: signature key id must be {KEY_ID_CHARS} hex digits")
    if not isinstance(value, bytes) or len(value) != SIG_BYTES:
        raise SchemaError(f"{kind}: signature value must be {SIG_BYTES} bytes")
    covered = canonical({k: v for k, v in obj.items() if k != "sig"})
    return Signature(key_id=key, value=value, covered=covered)

"""The Ed25519 key that signs the downlink: load, create, sign, verify.

The aggregator signs its manifests and round announcements with a private key (PEM,
PKCS#8); every agent pins the matching public key (PEM, SubjectPublicKeyInfo). What the
signature covers is fixed in `fedmq.wire.signed`. Provisioning (`fedmq fleet`) makes keys
with `create_key`; an aggregator without a configured key makes its own once
(`aggregator_key`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.atomicfile import write_atomic
from fedmq.wire.signed import KEY_ID_CHARS, Signature, SignFn, signing_input

PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key: the start of the SHA-256 of its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """A public key as PEM SubjectPublicKeyInfo (what agents pin)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """A private key as unencrypted PEM PKCS#8."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM PKCS#8 file; ValueError saying what is wrong."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise ValueError(f"cannot read the signing key {path}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not an unencrypted PEM PKCS#8 private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; the downlink key must be Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM SubjectPublicKeyInfo file; ValueError if not one."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as err:
        raise ValueError(f"cannot read the server key {path}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; the server key must be Ed25519")
    return key


def create_key(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """A new key pair: the private key written with mode 0600, the public key beside it."""
    key = Ed25519PrivateKey.generate()
    private_path, public_path = Path(private_path), Path(public_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 before any key byte is written, then renamed into place
    tmp = private_path.with_name(private_path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, private_path)
    write_atomic(public_path, public_pem(key.public_key()))
    return key


def aggregator_key(
    configured: Path | None, state_dir: Path
) -> tuple[Ed25519PrivateKey, Path | None, bool]:
    """The aggregator's signing key: the configured file, else <state_dir>/signing-key.pem,
    created (with its .pub.pem) the first time. Returns (key, public key file or None when
    the key was configured, created now)."""
    if configured is not None:
        return load_private_key(configured), None, False
    private, public = Path(state_dir) / PRIVATE_KEY_FILE, Path(state_dir) / PUBLIC_KEY_FILE
    if private.exists():
        key = load_private_key(private)
        if not public.exists() or public.read_bytes() != public_pem(key.public_key()):
            write_atomic(public, public_pem(key.public_key()))
        return key, public, False
    return create_key(private, public), public, True


class Signer:
    """Signs downlink messages with one private key."""

    def __init__(self, *, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.key_id = key_id(key.public_key())

    def for_topic(self, topic: str) -> SignFn:
        """A sign function for the wire encoders, bound to the topic it publishes on."""

        def sign(covered: bytes) -> tuple[str, bytes]:
            return self.key_id, self.key.sign(signing_input(topic, covered))

        return sign


def verify(public_key: Ed25519PublicKey, topic: str, sig: Signature) -> str | None:
    """None when sig is a valid signature by public_key of its message on topic; else why not."""
    pinned = key_id(public_key)
    if sig.key_id != pinned:
        return f"signed by key {sig.key_id}, this device trusts key {pinned}"
    try:
        public_key.verify(sig.value, signing_input(topic, sig.covered))
    except InvalidSignature:
        return f"the signature by key {pinned} does not match the message"
    return None

"""Fetching global versions: a pure state machine the agent's shell feeds and obeys.

`ModelFetch` is fed manifests, chunks and the time (`now`) and returns actions: subscribe
to or unsubscribe from a payload's retained chunks, hold a checked model, or reject a
version with a reason. It touches no socket, clock or file. It decides which payload to
fetch (the delta when the device holds its base, else the full model; the ONNX export for
an inference-only device), ignores versions it holds or is fetching, checks the signature
(edge_agent.trust), job, task, tensor specs, version order and sizes before anything is
fetched or stored, puts chunks back together, checks size and sha256 with bounded retries,
falls back from a delta that does not rebuild the version to the full payload, and retries a
fetch that stalls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.trust import DownlinkTrust
from fedmq.chunks import MIN_MESSAGE_BYTES, Reassembler
from fedmq.codecs import apply_model_delta, decode_model, parse_pipeline
from fedmq.errors import ChunkError, ProtocolError
from fedmq.topics import Topics
from fedmq.wire import (
    CHUNK_OVERHEAD,
    Chunk,
    Manifest,
    PayloadRef,
    TensorSpec,
    decode_weights,
    encode_weights,
    specs_of,
)

MAX_ATTEMPTS = 3  # tries at one payload before the version is given up
STALL_S = 30.0  # a fetch with no new chunk for this long is tried again
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_CHUNKS = 65536
# the fewest data bytes a chunk carries: every sender's messages are at least this large
MIN_CHUNK_DATA = MIN_MESSAGE_BYTES - CHUNK_OVERHEAD
MAX_VERSION_JUMP = 1000  # unverified manifests only: how far ahead of the held version
REJECT_CODES = ("unsigned", "bad_signature", "wrong_job", "wrong_task", "wrong_specs",
                "stale_version", "version_jump", "bad_manifest", "bad_payload", "no_rebuild",
                "timeout")  # fmt: skip

# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Subscribe:
    """Subscribe to the retained chunks of one payload of a version."""

    topics: tuple[str, ...]
    version: int
    what: str  # "delta", "onnx", or the full model's codec
    attempt: int  # 1 for a first try
    verified: bool = False  # the manifest carried a valid signature by the pinned key


@dataclass(frozen=True)
class Unsubscribe:
    """Stop receiving these chunk topics."""

    topics: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Hold:
    """A checked global version to keep: its float32 weights and their blob."""

    manifest: Manifest
    weights: dict[str, np.ndarray]
    blob: bytes  # encode_weights(weights); its sha256 is manifest.model_sha256
    via: str  # "delta" or the full model's codec
    fetched_bytes: int  # every chunk byte this version took, failed tries included


@dataclass(frozen=True)
class HoldOnnx:
    """A checked ONNX export of a global version (inference-only devices)."""

    manifest: Manifest
    onnx: bytes
    fetched_bytes: int


@dataclass(frozen=True)
class Reject:
    """A version, or one try at fetching it, refused; the held model stays."""

    version: int
    code: str  # one of REJECT_CODES
    reason: str
    final: bool  # False: the version is being fetched again (or whole instead of as a delta)


@dataclass(frozen=True, eq=False)
class HoldControl:
    """SCAFFOLD's server control variate of a held version (the manifest's `control`
    payload, checked against its digest and the model's tensors)."""

    version: int
    control: dict[str, np.ndarray]
    blob: bytes
    fetched_bytes: int


Action = Subscribe | Unsubscribe | Hold | HoldOnnx | HoldControl | Reject


def same_specs(a: Sequence[TensorSpec], b: Sequence[TensorSpec]) -> bool:
    """True when two models have the same tensors (name, dtype, shape), in any order."""
    return len(a) == len(b) and {s.name: s for s in a} == {s.name: s for s in b}


# ---------------------------------------------------------------- the machine


@dataclass
class _Try:
    manifest: Manifest
    ref: PayloadRef
    what: str
    topics: tuple[str, ...]
    attempt: int
    last_progress: float
    fetched_bytes: int
    verified: bool


class ModelFetch:
    """Which global version a device holds, and the fetch of the next one."""

    def __init__(
        self,
        *,
        topics: Topics,
        task: str,
        specs: Sequence[TensorSpec] | None,
        onnx: bool = False,
        version: int = -1,
        sha256: str = "",
        weights: dict[str, np.ndarray] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        stall_s: float = STALL_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        trust: DownlinkTrust | None = None,
        epoch: int = 0,
        max_version_jump: int = MAX_VERSION_JUMP,
    ) -> None:
        if max_attempts < 1 or stall_s <= 0 or max_payload_bytes <= 0:
            raise ValueError("max_attempts, stall_s and max_payload_bytes must be positive")
        if max_version_jump < 0:
            raise ValueError("max_version_jump must be >= 0 (0: no limit)")
        if weights is not None and specs is not None and not same_specs(specs_of(weights), specs):
            raise ValueError("the held weights do not match the task's model; do not pass them")
        self.topics = topics
        self.task = task
        self.specs = tuple(specs) if specs is not None else None
        self.onnx = onnx  # inference only: fetch the ONNX export when the manifest has one
        self.version = version  # the held version, -1: none
        self.sha256 = sha256  # model_sha256 of the held version (the ONNX sha when onnx)
        self.weights = weights  # the held version's weights (a delta's base)
        self.epoch = epoch  # the held version's epoch, when its manifest was verified
        self.trust = trust or DownlinkTrust()
        self.max_version_jump = max_version_jump
        self.max_attempts = max_attempts
        self.stall_s = stall_s
        self.max_payload_bytes = max_payload_bytes
        self._try: _Try | None = None
        self._reassembler = self._new_reassembler()
        self.control_version = -1  # the version whose control variate is held (SCAFFOLD)

    @property
    def fetching(self) -> Manifest | None:
        """The manifest whose payload is being fetched, if any."""
        return self._try.manifest if self._try else None

    # ------------------------------------------------------------ events

    def on_manifest(self, m: Manifest, *, now: float) -> list[Action]:
        """A manifest arrived: fetch what it names, unless held, being fetched or refused."""
        ref, what = self._choose(m)
        held = m.onnx.sha256 if what == "onnx" and m.onnx else m.model_sha256
        if (m.version, held) == (self.version, self.sha256):
            if (m.control is None or what == "onnx" or self._try is not None
                    or self.control_version == m.version):  # fmt: skip
                return []
            # the version is held but not its control variate (e.g. after a restart)
            verified, problem = self._check(m, m.control, "control")
            if problem is not None:
                return [Reject(m.version, problem[0], problem[1], final=True)]
            return self._start(m, m.control, "control", now=now, attempt=1, fetched=0,
                               verified=verified)  # fmt: skip
        t = self._try
        if t and (m.version, ref.sha256) == (t.manifest.version, t.ref.sha256):
            return []
        verified, problem = self._check(m, ref, what)
        if problem is not None:
            return [Reject(m.version, problem[0], problem[1], final=True)]
        actions: list[Action] = [Unsubscribe(t.topics)] if t else []
        return actions + self._start(m, ref, what, now=now, attempt=1, fetched=0,
                                     verified=verified)  # fmt: skip

    def on_chunk(self, chunk: Chunk, *, now: float, wire_bytes: int = 0) -> list[Action]:
        """A chunk arrived on a global chunk topic; wire_bytes: its message's size."""
        t = self._try
        if t is None or chunk.payload_id != t.ref.payload_id:
            return []  # another version's, or a payload this device does not use
        if (chunk.total_size, chunk.count, chunk.digest.hex()) != (
            t.ref.size, t.ref.chunks, t.ref.sha256
        ):  # fmt: skip
            return []  # not of the payload the manifest names (an older publication)
        t.fetched_bytes += wire_bytes or len(chunk.data)
        try:
            done = self._reassembler.add(chunk, source="global", now=now)
        except ChunkError as err:
            return self._failed(t, "bad_payload", err.reason, now=now)
        t.last_progress = now
        return [] if done is None else self._complete(t, done.payload, now=now)

    def on_connected(self, *, now: float) -> None:
        """The link is (re)connected: the retained chunks come again, so restart the clock."""
        if self._try:
            self._try.last_progress = now

    def tick(self, *, now: float) -> list[Action]:
        """Retry, then give up, a fetch that got no chunk for stall_s seconds."""
        t = self._try
        if t is None or now - t.last_progress <= self.stall_s:
            return []
        why = f"no chunk of global version {t.manifest.version} for {self.stall_s:.0f}s"
        return self._failed(t, "timeout", why, now=now)

    # ------------------------------------------------------------ rules

    def _choose(self, m: Manifest) -> tuple[PayloadRef, str]:
        """The payload of m this device should fetch, and what it is."""
        if self.onnx and m.onnx:
            return m.onnx, "onnx"
        d = m.delta
        holds = (self.version, self.sha256) if self.weights is not None else None
        if d and (d.base_version, d.base_sha256) == holds and _parses(d.codec):
            return d.payload, "delta"
        return m.weights, m.codec

    def _check(
        self, m: Manifest, ref: PayloadRef, what: str
    ) -> tuple[bool, tuple[str, str] | None]:
        """(verified, (code, reason) when m must not be fetched, None when it may): the
        signature first, then what the manifest says, before anything is fetched."""
        v = f"global version {m.version}"
        verified, refusal = self.trust.judge(m.sig, self.topics.global_manifest(), v)
        if refusal is not None:
            return verified, (refusal.code, refusal.reason)
        if m.job != self.topics.job:
            return verified, (
                "wrong_job",
                f"{v} is for job {m.job!r}, this device is in {self.topics.job!r}",
            )
        if m.task != self.task:
            return verified, (
                "wrong_task",
                f"{v} is for task {m.task!r}, this device trains {self.task!r}",
            )
        order = self._order(m, verified)
        if order is not None:
            return verified, order
        if what != "onnx":
            if not _parses(m.codec):
                return verified, ("bad_manifest", f"{v}: unknown codec {m.codec!r}")
            if self.specs is not None and not same_specs(m.tensors, self.specs):
                return verified, ("wrong_specs", f"{v}: {_spec_diff(m.tensors, self.specs)}")
        if ref.size > self.max_payload_bytes or ref.chunks > MAX_CHUNKS:
            return verified, ("bad_manifest", (
                f"{v}: a {ref.size}-byte payload in {ref.chunks} chunks is over this "
                f"device's limit of {self.max_payload_bytes} bytes in {MAX_CHUNKS} chunks"
            ))  # fmt: skip
        most = max(1, -(-ref.size // MIN_CHUNK_DATA))
        if ref.chunks > most:
            return verified, ("bad_manifest", (
                f"{v}: {ref.chunks} chunks for a {ref.size}-byte payload; chunks of at least "
                f"{MIN_CHUNK_DATA} bytes make at most {most}"
            ))  # fmt: skip
        return verified, None

    def _order(self, m: Manifest, verified: bool) -> tuple[str, str] | None:
        """Why m's version may not follow the held one, or None. A verified manifest's epoch
        orders first (a newer one: the aggregator started over); an unverified one's epoch
        means nothing, and its version may not run more than max_version_jump ahead."""
        v = f"global version {m.version}"
        if self.version < 0:
            return None
        if verified and m.epoch != self.epoch:
            if m.epoch < self.epoch:
                return "stale_version", (f"{v} is of epoch {m.epoch}, older than the held "
                                         f"version's epoch {self.epoch}")  # fmt: skip
            return None
        if m.version < self.version:
            return "stale_version", f"{v} is older than the held version {self.version}"
        jump = m.version - self.version
        if not verified and self.max_version_jump and jump > self.max_version_jump:
            return "version_jump", (f"{v} is {jump} versions ahead of the held version "
                                    f"{self.version}; an unsigned manifest may be at most "
                                    f"{self.max_version_jump} ahead")  # fmt: skip
        return None

    def _start(
        self, m: Manifest, ref: PayloadRef, what: str, *, now: float, attempt: int, fetched: int,
        verified: bool,
    ) -> list[Action]:  # fmt: skip
        topics = tuple(
            self.topics.global_chunk(m.version, i)
            for i in range(ref.first_index, ref.first_index + ref.chunks)
        )
        self._try = _Try(m, ref, what, topics, attempt, now, fetched, verified)
        self._reassembler = self._new_reassembler()
        return [Subscribe(topics, m.version, what, attempt, verified)]

    def _failed(self, t: _Try, code: str, reason: str, *, now: float) -> list[Action]:
        """One try went wrong: subscribe once more (the chunks are retained) or give up."""
        actions: list[Action] = [Unsubscribe(t.topics)]
        if t.attempt < self.max_attempts:
            again = f"{reason}; fetching it again (try {t.attempt + 1} of {self.max_attempts})"
            actions.append(Reject(t.manifest.version, code, again, final=False))
            return actions + self._start(
                t.manifest, t.ref, t.what, now=now, attempt=t.attempt + 1,
                fetched=t.fetched_bytes, verified=t.verified,
            )  # fmt: skip
        self._try = None
        gave_up = f"{reason}; gave up after {self.max_attempts} tries"
        return [*actions, Reject(t.manifest.version, code, gave_up, final=True)]

    def _complete(self, t: _Try, payload: bytes, *, now: float) -> list[Action]:
        m, ref = t.manifest, t.ref
        if len(payload) != ref.size or hashlib.sha256(payload).hexdigest() != ref.sha256:
            why = f"global version {m.version}: the {t.what} payload does not match its manifest"
            return self._failed(t, "bad_payload", why, now=now)
        self._try = None
        done: list[Action] = [Unsubscribe(t.topics)]
        if t.what == "control":
            return done + self._control(t, payload)
        if t.what == "onnx":
            self.version, self.sha256, self.weights = m.version, ref.sha256, None
            self.epoch = m.epoch if t.verified else self.epoch
            return [*done, HoldOnnx(m, payload, t.fetched_bytes)]
        try:
            full = parse_pipeline(m.codec)
            if t.what == "delta" and m.delta is not None and self.weights is not None:
                weights = apply_model_delta(
                    self.weights, payload, full=full, delta=parse_pipeline(m.delta.codec),
                    version=m.version,
                )  # fmt: skip
            else:
                weights = decode_model(payload, full, m.tensors)
            blob = encode_weights(weights)
            why = "" if hashlib.sha256(blob).hexdigest() == m.model_sha256 else (
                "does not rebuild to its model_sha256"
            )  # fmt: skip
        except (ProtocolError, ValueError) as err:
            why = f"cannot be decoded ({err})"
        if why and t.what == "delta":  # take the version whole
            reason = f"global version {m.version}: the delta {why}; fetching the full model"
            done.append(Reject(m.version, "no_rebuild", reason, final=False))
            return done + self._start(
                m, m.weights, m.codec, now=now, attempt=1, fetched=t.fetched_bytes,
                verified=t.verified,
            )  # fmt: skip
        if why:  # the bytes are the ones the manifest names: fetching them again is futile
            reason = f"global version {m.version} {why}"
            return [*done, Reject(m.version, "no_rebuild", reason, final=True)]
        self.version, self.sha256, self.weights = m.version, m.model_sha256, weights
        self.epoch = m.epoch if t.verified else self.epoch
        done.append(Hold(m, weights, blob, t.what, t.fetched_bytes))
        if m.control is not None and self.specs is not None:  # SCAFFOLD's c comes next
            return done + self._start(m, m.control, "control", now=now, attempt=1,
                                      fetched=0, verified=t.verified)  # fmt: skip
        return done

    def _control(self, t: _Try, payload: bytes) -> list[Action]:
        """A control payload that matched its digest: held if it fits the model and is
        finite, else refused for good (the version stays held; SCAFFOLD rounds wait)."""
        v = f"global version {t.manifest.version}"
        try:
            control = decode_weights(payload, max_bytes=self.max_payload_bytes)
        except ProtocolError as err:
            return [Reject(t.manifest.version, "bad_payload", f"{v}: control {err.reason}",
                           final=True)]  # fmt: skip
        specs = self.specs or ()
        if not same_specs(specs_of(control), specs) or not all(
                np.isfinite(a).all() for a in control.values()):  # fmt: skip
            return [Reject(t.manifest.version, "bad_payload",
                           f"{v}: its control variate does not fit this model", final=True)]
        self.control_version = t.manifest.version
        return [HoldControl(t.manifest.version, control, payload, t.fetched_bytes)]

    def _new_reassembler(self) -> Reassembler:
        return Reassembler(max_payload_bytes=self.max_payload_bytes, max_open=1,
                           max_total_bytes=self.max_payload_bytes)  # fmt: skip


def _parses(codec: str) -> bool:
    try:
        parse_pipeline(codec)
    except ValueError:
        return False
    return True


def _spec_diff(got: Sequence[TensorSpec], want: Sequence[TensorSpec]) -> str:
    """The first difference between a manifest's tensors and this device's model."""
    have = {s.name: s for s in want}
    for s in got:
        if s.name not in have:
            return f"tensor {s.name!r} is not in this device's model"
        if have[s.name] != s:
            w = have[s.name]
            return (
                f"tensor {s.name!r} is {s.dtype}{list(s.shape)}, "
                f"this device's model has {w.dtype}{list(w.shape)}"
            )
    missing = sorted(set(have) - {s.name for s in got})
    return f"tensors {missing} of this device's model are missing"

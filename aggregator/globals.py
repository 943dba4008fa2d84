"""The global model: its weights and version, evaluation, storage, and what publishes it.

Each version is published as a full payload in the downlink codec (float32, fp16, int8,
optionally zstd) and, when a delta codec is configured, also as a delta from the version
before it. The weights a version *is* are what devices decode (fedmq.codecs.models), so
the aggregator evaluates and exports exactly what devices hold. With a sparse (top-k)
delta the aggregator also keeps its own weights, which the deltas chase: what one delta
leaves out is still in (own weights - published) and goes out with later deltas (server
side error feedback); rounds aggregate onto its own weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.evalset import central_test_set
from aggregator.store import Store
from fedmq.chunks import encode_chunks
from fedmq.codecs import Pipeline, encode_model, encode_model_delta
from fedmq.codecs.quantize import FLOAT16_MAX
from fedmq.config import ConfigError
from fedmq.errors import ProtocolError
from fedmq.tasks import Task
from fedmq.topics import Topics
from fedmq.wire import (
    DeltaRef,
    Manifest,
    PayloadRef,
    TensorSpec,
    check_tensors,
    decode_manifest,
    decode_weights,
    encode_manifest,
    encode_weights,
    specs_of,
)
from fedmq.wire.signed import SignFn

FLOAT32_MAX = float(np.finfo(np.float32).max)


class ModelRefused(Exception):
    """A model that must not become a version: not finite, or beyond the downlink's range."""


def check_model(weights: Mapping[str, np.ndarray], downlink: Pipeline) -> None:
    """ModelRefused unless every weight is finite and within what the downlink carries."""
    limit = FLOAT16_MAX if downlink.values == "fp16" else FLOAT32_MAX
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise ModelRefused(f"tensor {name!r} of the new model has non-finite values")
        peak = float(np.max(np.abs(w))) if w.size else 0.0
        if peak > limit:
            raise ModelRefused(
                f"tensor {name!r} of the new model reaches {peak:.3g}, beyond the "
                f"{downlink.name} downlink's {limit:.6g}"
            )


class StoredVersionError(Exception):
    """A stored version that is missing or does not load."""

    def __init__(self, version: int, reason: str) -> None:
        super().__init__(f"version {version}: {reason}")
        self.version = version


class GlobalModel:
    """Owns the current global weights; evaluates, stores and publishes each version."""

    def __init__(
        self,
        *,
        task: Task,
        store: Store,
        seed: int = 0,
        downlink: Pipeline | None = None,
        downlink_delta: Pipeline | None = None,
        eval_data: str = "",
    ) -> None:
        import torch

        from fedmq.tasks import weights as tw

        self.task = task
        self.store = store
        self.seed = seed
        self._tw = tw
        torch.manual_seed(seed)
        self._model = task.build_model()
        self.weights: dict[str, np.ndarray] = tw.get_weights(self._model)
        self.specs: tuple[TensorSpec, ...] = specs_of(self.weights)
        self.version = 0
        self.round_id = 0
        self.created = time.time()
        self.metrics: dict[str, float] = {}
        self.onnx: bytes | None = None
        self._published: tuple[int, int] | None = None  # (version, chunk count) on the broker
        # None: no central test set (aggregator.evalset); devices evaluate (aggregator.fedeval)
        self._test = central_test_set(task, eval_data)
        self.downlink = downlink or Pipeline()
        self.downlink_delta = downlink_delta
        self.full_body = b""  # this version's full payload in the downlink codec
        self.delta_body = b""  # this version as a delta from the previous one, or b""
        self.model_sha = ""  # sha256 of encode_weights(self.weights)
        # the aggregator's own weights when a sparse delta makes them differ from the
        # published ones (None: the same)
        self.server: dict[str, np.ndarray] | None = None
        self.base_sha = ""  # model_sha of the previous version (what the delta applies to)

    @property
    def num_params(self) -> int:
        return sum(s.size for s in self.specs)

    def load_or_init(self, version: int | None = None) -> None:
        """Take a stored version (the newest when None), or make version 0 from the seed.

        StoredVersionError when the version is missing or does not load (the caller moves
        it aside); ConfigError when the state directory holds another task's model."""
        versions = self.store.versions()
        if version is not None and version not in versions:
            raise StoredVersionError(version, f"state directory {self.store.root} lacks it")
        if versions:
            chosen = versions[-1] if version is None else version
            try:
                blob, manifest_blob, onnx = self.store.load_version(chosen)
                manifest = decode_manifest(manifest_blob)
                weights = decode_weights(blob)
            except (OSError, ProtocolError) as err:
                raise StoredVersionError(chosen, str(err)) from err
            if specs_of(weights) != self.specs:
                raise ConfigError(
                    f"state directory {self.store.root} holds a model that is not "
                    f"{self.task.name}; use another --state-dir"
                )
            try:
                check_model(weights, Pipeline())
                server = self.store.load_server_weights(chosen) if self._keeps_server else None
                if server is not None:
                    check_tensors(server, self.specs, what="stored server weights")
            except (OSError, ProtocolError, ModelRefused) as err:
                raise StoredVersionError(chosen, str(err)) from err
            self.weights, self.version, self.round_id = weights, manifest.version, manifest.round_id
            self.created, self.metrics, self.onnx = manifest.created, manifest.metrics, onnx
            try:
                self._load_payloads(manifest, blob)
            except (OSError, ProtocolError, ValueError) as err:
                raise StoredVersionError(chosen, str(err)) from err
            self.server = server
            # it was published: its chunks may still be retained on the broker
            extra = sum(ref.chunks for ref in (manifest.onnx, manifest.delta and
                                               manifest.delta.payload, manifest.control)
                        if ref)  # fmt: skip
            self._published = (manifest.version, manifest.weights.chunks + extra)
            return
        self.full_body, self.weights = encode_model(self.weights, self.downlink, version=0)
        self.delta_body, self.base_sha = b"", ""
        self.metrics, self.onnx = self._evaluate(self.weights)
        self._store()

    def _load_payloads(self, manifest: Manifest, blob: bytes) -> None:
        """The stored version's published payloads, exactly as first encoded."""
        self.model_sha = hashlib.sha256(blob).hexdigest()
        full, delta = self.store.load_payloads(self.version)
        if full is None or manifest.codec != self.downlink.name:
            # another downlink codec than this version was made with: encode it anew
            # (the weights become what that codec carries) and publish no delta
            self.full_body, self.weights = encode_model(
                self.weights, self.downlink, version=self.version
            )
            self.model_sha = hashlib.sha256(encode_weights(self.weights)).hexdigest()
            self.delta_body, self.base_sha = b"", ""
            return
        self.full_body = full
        usable = (
            delta is not None
            and manifest.delta is not None
            and self.downlink_delta is not None
            and manifest.delta.codec == self.downlink_delta.name
        )
        self.delta_body = delta if usable and delta is not None else b""
        self.base_sha = manifest.delta.base_sha256 if usable and manifest.delta else ""

    @property
    def _keeps_server(self) -> bool:
        return self.downlink_delta is not None and self.downlink_delta.sparse

    @property
    def base_weights(self) -> dict[str, np.ndarray]:
        """What the next round's mean delta is applied to: the aggregator's own weights."""
        return self.server if self.server is not None else self.weights

    def advance(self, weights: dict[str, np.ndarray], *, round_id: int) -> dict[str, float]:
        """Make weights the next version: encode for the downlink (the version is what
        devices decode), evaluate, export, store. Returns its metrics.

        ModelRefused, with nothing changed, when the weights or what devices would decode
        from them are not finite or do not fit the downlink codec: the version stays."""
        check_model(weights, self.downlink)
        version = self.version + 1
        try:
            if self.downlink_delta is not None:
                made = encode_model_delta(
                    weights, self.weights, full=self.downlink, delta=self.downlink_delta,
                    version=version,
                )  # fmt: skip
                full_body, delta_body, published = made.full_body, made.delta_body, made.weights
                base_sha = self.model_sha
            else:
                full_body, published = encode_model(weights, self.downlink, version=version)
                delta_body, base_sha = b"", ""
        except (ValueError, ProtocolError) as err:  # e.g. a delta beyond float16
            raise ModelRefused(f"version {version} cannot be encoded: {err}") from err
        check_model(published, self.downlink)
        metrics, onnx = self._evaluate(published)
        if not all(np.isfinite(v) for v in metrics.values()):
            raise ModelRefused(f"version {version} evaluates to non-finite metrics {metrics}")
        # nothing changed until here: a refused model leaves the current version whole
        self.server = weights if self._keeps_server else None
        self.full_body, self.delta_body, self.weights = full_body, delta_body, published
        self.base_sha = base_sha
        self.version = version
        self.round_id = round_id
        self.created = time.time()
        self.metrics, self.onnx = metrics, onnx
        self._store()
        return self.metrics

    def _evaluate(self, weights: dict[str, np.ndarray]) -> tuple[dict[str, float], bytes]:
        """(test metrics, ONNX export) of weights; changes nothing of the version. Without a
        central test set the metrics are empty, and ModelRefused when the outputs on a probe
        input are not finite (what the test set's loss would have caught)."""
        self._tw.set_weights(self._model, weights)
        onnx = self._tw.export_onnx(self._model, self.task.input_shape)
        if self._test is not None:
            x, y = self._test
            return self._tw.evaluate(self._model, x, y), onnx
        probe = np.random.default_rng(0).normal(size=(8, *self.task.input_shape))
        checked = self._tw.evaluate(self._model, probe.astype(np.float32), np.zeros(8, np.int64))
        if not all(np.isfinite(v) for v in checked.values()):
            raise ModelRefused("the new model's outputs on a probe input are not finite")
        return {}, onnx

    def _store(self) -> None:
        """Keep this version's payloads; its manifest follows once it is published."""
        blob = encode_weights(self.weights)
        self.model_sha = hashlib.sha256(blob).hexdigest()
        self.store.save_version(
            self.version, weights=blob, onnx=self.onnx, full=self.full_body,
            delta=self.delta_body or None,
            server=encode_weights(self.server) if self.server is not None else None,
        )  # fmt: skip

    def manifest(
        self, *, job: str, weight_chunks: int, onnx_chunks: int, delta_chunks: int, epoch: int = 0,
        control: bytes = b"", control_chunks: int = 0,
    ) -> Manifest:  # fmt: skip
        """The manifest for the current version, given how its payloads were chunked."""
        blob = self.full_body
        delta_ref = None
        if self.delta_body and delta_chunks:
            delta_ref = DeltaRef(
                base_version=self.version - 1,
                base_sha256=self.base_sha,
                codec=self.downlink_delta.name if self.downlink_delta else "",
                payload=PayloadRef(
                    payload_id=f"d{self.version}",
                    size=len(self.delta_body),
                    sha256=hashlib.sha256(self.delta_body).hexdigest(),
                    chunks=delta_chunks,
                    first_index=weight_chunks + onnx_chunks,
                ),
            )
        onnx_ref = None
        if self.onnx is not None and onnx_chunks:
            onnx_ref = PayloadRef(
                payload_id=f"o{self.version}",
                size=len(self.onnx),
                sha256=hashlib.sha256(self.onnx).hexdigest(),
                chunks=onnx_chunks,
                first_index=weight_chunks,
            )
        return Manifest(
            job=job,
            version=self.version,
            round_id=self.round_id,
            created=self.created,
            task=self.task.name,
            codec=self.downlink.name,
            tensors=self.specs,
            weights=PayloadRef(
                payload_id=f"w{self.version}",
                size=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
                chunks=weight_chunks,
                first_index=0,
            ),
            onnx=onnx_ref,
            metrics=dict(self.metrics),
            model_sha256=self.model_sha,
            delta=delta_ref,
            epoch=epoch,
            control=PayloadRef(
                payload_id=f"c{self.version}", size=len(control),
                sha256=hashlib.sha256(control).hexdigest(), chunks=control_chunks,
                first_index=weight_chunks + onnx_chunks + delta_chunks,
            ) if control and control_chunks else None,
        )  # fmt: skip

    def publication(
        self, topics: Topics, *, limit: int, publish_onnx: bool, sign: SignFn | None = None,
        epoch: int = 0, control: bytes = b"",
    ) -> Publication:  # fmt: skip
        """What to publish (retained) for this version: its chunks, then its manifest (signed
        with sign, over every field and payload digest), then empty payloads that clear what
        the broker still holds of the previous layout."""
        chunks = encode_chunks(self.full_body, f"w{self.version}", limit)
        onnx_chunks = (
            encode_chunks(self.onnx, f"o{self.version}", limit)
            if publish_onnx and self.onnx is not None
            else []
        )
        delta_chunks = (
            encode_chunks(self.delta_body, f"d{self.version}", limit) if self.delta_body else []
        )
        # SCAFFOLD's server control variate of this version, after the other payloads
        control_chunks = encode_chunks(control, f"c{self.version}", limit) if control else []
        every = chunks + onnx_chunks + delta_chunks + control_chunks
        messages = [(topics.global_chunk(self.version, i), p) for i, p in enumerate(every)]
        m = self.manifest(
            job=topics.job, weight_chunks=len(chunks), onnx_chunks=len(onnx_chunks),
            delta_chunks=len(delta_chunks), epoch=epoch, control=control,
            control_chunks=len(control_chunks),
        )  # fmt: skip
        manifest = encode_manifest(m, sign=sign)
        messages.append((topics.global_manifest(), manifest))
        if self._published:
            # an empty retained payload deletes what the broker keeps: the old version's
            # chunks, or extra chunks of this one from an earlier layout
            old_version, old_count = self._published
            first = len(every) if old_version == self.version else 0
            messages += [(topics.global_chunk(old_version, i), b"")
                         for i in range(first, old_count)]  # fmt: skip
        self._published = (self.version, len(every))
        return Publication(version=self.version, messages=messages, manifest=manifest,
                           chunks=(len(chunks), len(onnx_chunks), len(delta_chunks)))  # fmt: skip


@dataclass(frozen=True)
class Publication:
    """The retained messages that publish one version, in order."""

    version: int
    messages: list[tuple[str, bytes]]
    manifest: bytes
    chunks: tuple[int, int, int]  # weight, onnx and delta chunks

    @property
    def nbytes(self) -> int:
        return sum(len(p) for _, p in self.messages)

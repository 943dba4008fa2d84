"""The global model: its weights and version, evaluation, storage and retained publication."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from aggregator.store import Store
from fedmq.chunks import encode_chunks
from fedmq.tasks import Task
from fedmq.topics import Topics
from fedmq.wire import (
    Manifest,
    PayloadRef,
    TensorSpec,
    decode_manifest,
    decode_weights,
    encode_manifest,
    encode_weights,
    specs_of,
)

if TYPE_CHECKING:
    from fedmq.link import Link

log = logging.getLogger("fedmq.aggregator")


class GlobalModel:
    """Owns the current global weights; evaluates, stores and publishes each version."""

    def __init__(self, *, task: Task, store: Store, seed: int = 0) -> None:
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
        self._test = task.load_test()

    @property
    def num_params(self) -> int:
        return sum(s.size for s in self.specs)

    def load_or_init(self, version: int | None = None) -> None:
        """Take a stored version (the newest when None), or make version 0 from the seed."""
        versions = self.store.versions()
        if version is not None and version not in versions:
            raise ValueError(f"state directory {self.store.root} lacks version {version}")
        if versions:
            chosen = versions[-1] if version is None else version
            blob, manifest_blob, onnx = self.store.load_version(chosen)
            manifest = decode_manifest(manifest_blob)
            weights = decode_weights(blob)
            if specs_of(weights) != self.specs:
                raise ValueError(
                    f"state directory {self.store.root} holds a model that is not "
                    f"{self.task.name}; use another --state-dir"
                )
            self.weights, self.version, self.round_id = weights, manifest.version, manifest.round_id
            self.created, self.metrics, self.onnx = manifest.created, manifest.metrics, onnx
            if manifest.job:  # it was published: its chunks may still be retained on the broker
                onnx_chunks = manifest.onnx.chunks if manifest.onnx else 0
                self._published = (manifest.version, manifest.weights.chunks + onnx_chunks)
            return
        self.metrics = self._evaluate()
        self._store()

    def advance(self, weights: dict[str, np.ndarray], *, round_id: int) -> dict[str, float]:
        """Make weights the next version: evaluate, export, store. Returns its metrics."""
        self.weights = weights
        self.version += 1
        self.round_id = round_id
        self.created = time.time()
        self.metrics = self._evaluate()
        self._store()
        return self.metrics

    def _evaluate(self) -> dict[str, float]:
        self._tw.set_weights(self._model, self.weights)
        x, y = self._test
        self.onnx = self._tw.export_onnx(self._model, self.task.input_shape)
        return self._tw.evaluate(self._model, x, y)

    def _store(self) -> None:
        blob = encode_weights(self.weights)
        manifest = self.manifest(blob, job="", weight_chunks=1, onnx_chunks=0)
        self.store.save_version(
            self.version, weights=blob, manifest=encode_manifest(manifest), onnx=self.onnx
        )

    def manifest(self, blob: bytes, *, job: str, weight_chunks: int, onnx_chunks: int) -> Manifest:
        """The manifest for the current version, given how its payloads were chunked."""
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
            codec="float32",
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
        )

    def publish(self, link: Link, topics: Topics, *, publish_onnx: bool) -> int:
        """Publish this version retained (chunks, then manifest), clear the old one's chunks.

        Returns the bytes published.
        """
        limit = link.max_message_bytes
        blob = encode_weights(self.weights)
        chunks = encode_chunks(blob, f"w{self.version}", limit)
        onnx_chunks = (
            encode_chunks(self.onnx, f"o{self.version}", limit)
            if publish_onnx and self.onnx is not None
            else []
        )
        for i, payload in enumerate(chunks + onnx_chunks):
            link.publish(topics.global_chunk(self.version, i), payload, qos=1, retain=True)
        m = self.manifest(
            blob, job=topics.job, weight_chunks=len(chunks), onnx_chunks=len(onnx_chunks)
        )
        manifest = encode_manifest(m)
        link.publish(topics.global_manifest(), manifest, qos=1, retain=True)
        count = len(chunks) + len(onnx_chunks)
        if self._published:
            # clear what the broker still retains of the previous layout (an empty
            # retained payload deletes it): the old version, or extra chunks of this one
            old_version, old_count = self._published
            first = count if old_version == self.version else 0
            for i in range(first, old_count):
                link.publish(topics.global_chunk(old_version, i), b"", qos=1, retain=True)
        self._published = (self.version, count)
        self.store.save_manifest(self.version, manifest)
        total = sum(map(len, chunks + onnx_chunks)) + len(manifest)
        log.info(
            "published version %d: %d weight chunks, %d onnx chunks, %d bytes",
            self.version, len(chunks), len(onnx_chunks), total,
        )  # fmt: skip
        return total

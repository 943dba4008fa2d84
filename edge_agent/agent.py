"""The device agent: one loop over MQTT events that fetches, trains, publishes and resends.

It holds one global version at a time (fetched chunk by chunk, checked against the
manifest's sha256 and tensor specs), trains when a round selects it, keeps every update
in an on-disk outbox until the aggregator acknowledges it, and resends the outbox after
every reconnect. torch is imported only when the device trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
import zlib
from typing import Any

import numpy as np

from edge_agent.settings import AgentSettings
from edge_agent.state import DeviceStore
from fedmq import __version__
from fedmq.chunks import Reassembler, encode_chunks
from fedmq.codecs import (
    Compressed,
    Pipeline,
    apply_model_delta,
    compress_update,
    decode_model,
    parse_or_schema_error,
)
from fedmq.errors import DecodeError, ProtocolError, SchemaError
from fedmq.link import Connected, Disconnected, Link, Message
from fedmq.tasks import Task, get_task
from fedmq.tasks.partition import device_data
from fedmq.wire import (
    DeviceMetrics,
    DeviceState,
    Manifest,
    PayloadRef,
    RoundAnnouncement,
    Update,
    decode_ack,
    decode_chunk,
    decode_manifest,
    decode_round,
    decode_weights,
    encode_metrics,
    encode_state,
    encode_update,
    encode_weights,
    specs_of,
)
from firmware_profiles import Profile, load_profile

TICK_S = 0.2
# an update with no ack after this long is sent again (the ack, or the aggregator's copy,
# may have been lost in a crash); update ids make resends idempotent
ACK_TIMEOUT_S = 30.0


class Agent:
    """One device taking part in one job."""

    def __init__(self, *, settings: AgentSettings, task: Task | None = None) -> None:
        self.s = settings
        self.device = settings.device_id
        self.topics = settings.topics
        self.profile: Profile = load_profile(settings.profile)
        self.log = logging.LoggerAdapter(logging.getLogger("fedmq.agent"), {"device": self.device})
        self.infer_only = settings.infer_only or not self.profile.can_train
        self.task = task or get_task(settings.task)
        self.x, self.y = device_data(
            self.task,
            scheme=settings.partition,
            num_devices=settings.num_devices,
            device_index=settings.device_index,
            seed=settings.data_seed,
            alpha=settings.alpha,
        )
        self.store = DeviceStore(root=settings.state_dir / self.device)
        self.link = Link(
            client_id=f"fedmq-{settings.job}-{self.device}",
            address=settings.broker,
            subscriptions=[
                (self.topics.round(), 1),
                (self.topics.global_manifest(), 1),
                (self.topics.ack(self.device), 1),
            ],
            will=(self.topics.device_state(self.device), self._state_payload("offline")),
            max_message_bytes=settings.max_message_bytes or self.profile.max_message_bytes,
        )
        self.reassembler = Reassembler(max_payload_bytes=64 * 1024 * 1024, max_open=4)
        progress = self.store.load()
        self.version: int = int(progress.get("version", -1))
        self.last_round: int = int(progress.get("last_round", 0))
        # sha256 of the held model, and of the model the last round was trained from: a
        # round is "already trained" only if both its id and its base model match
        self.model_sha: str = str(progress.get("model_sha", ""))
        self.last_round_sha: str = str(progress.get("last_round_sha", ""))
        self.fetch_attempts = 0
        self.weights: dict[str, np.ndarray] | None = None
        blob = self.store.load_model()
        if blob is not None and self.version >= 0:
            self.weights = decode_weights(blob)
        self.fetched_bytes = int(progress.get("fetched_bytes", 0))
        self.wanted: Manifest | None = None
        self.wanted_ref: PayloadRef | None = None  # the payload of `wanted` being fetched
        self.wanted_topics: list[str] = []
        self.receiving_bytes = 0
        self.pending: RoundAnnouncement | None = None
        self._model: Any = None
        if not self.infer_only:
            self._model = self._build_model()  # at start, not inside the first round's timer
        self.rounds_trained = 0
        self._sent_at: dict[str, float] = {}
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------ the loop

    def run(self, *, stop: Any = None, max_rounds: int = 0) -> int:
        """Serve until stop is set (or max_rounds were trained); 0 on a clean stop."""
        self.log.info(
            "starting: %d local examples, profile %s, %s",
            len(self.x), self.profile.name, "inference only" if self.infer_only else "training",
        )  # fmt: skip
        self.link.start()
        try:
            while not (stop is not None and stop.is_set()):
                if max_rounds and self.rounds_trained >= max_rounds and not len(self.store.outbox):
                    break
                event = self.link.next_event(TICK_S)
                if isinstance(event, Connected):
                    self._on_connected(event)
                elif isinstance(event, Disconnected):
                    self.log.warning("broker connection lost (%s); reconnecting", event.reason)
                elif isinstance(event, Message):
                    try:
                        self._on_message(event)
                    except ProtocolError as err:
                        err.at(device=self.device, topic=event.topic)
                        self.counters[err.reason_code] = self.counters.get(err.reason_code, 0) + 1
                        self.log.warning("dropped message on %s: %s", event.topic, err.reason)
                    except Exception:  # a bug of ours must not end the agent: log it, go on
                        self.log.exception("failed to handle a message on %s", event.topic)
                now = time.time()
                self._maybe_train(now)
                self._resend_unacked(now)
        finally:
            self.link.stop(final=(self.topics.device_state(self.device),
                                  self._state_payload("offline")))  # fmt: skip
        return 0

    def _on_connected(self, event: Connected) -> None:
        self.log.info(
            "connected (session present: %s, broker max packet: %s)",
            event.session_present, event.max_packet_size,
        )  # fmt: skip
        self._publish_state("online")
        for update_id, payload in self.store.outbox.pending():
            self.log.info("resending unacknowledged update %s", update_id)
            self._send(update_id, payload)

    def _on_message(self, msg: Message) -> None:
        kind = self.topics.kind_of(msg.topic)
        if not msg.payload:
            return  # a cleared retained topic
        if kind == "global":
            self._on_manifest(decode_manifest(msg.payload))
        elif kind == "global_chunk":
            self._on_global_chunk(msg.payload)
        elif kind == "round":
            self._on_round(decode_round(msg.payload))
        elif kind == "ack":
            ack = decode_ack(msg.payload)
            self._sent_at.pop(ack.update_id, None)
            if self.store.outbox.remove(ack.update_id):
                level = logging.INFO if ack.status == "accepted" else logging.WARNING
                self.log.log(
                    level, "update %s for round %d: %s %s",
                    ack.update_id, ack.round_id, ack.status, ack.reason,
                )  # fmt: skip

    # ------------------------------------------------------------ global model

    def _on_manifest(self, m: Manifest) -> None:
        if self.infer_only and m.onnx:
            held, ref = m.onnx.sha256, m.onnx
        else:
            held, ref = m.model_sha256, m.weights
            d = m.delta
            holds = (self.version, self.model_sha) if self.weights is not None else None
            if d and (d.base_version, d.base_sha256) == holds:
                ref = d.payload  # this device holds the base: the delta is enough
        if (m.version, held) == (self.version, self.model_sha):
            return  # already held
        if (
            self.wanted
            and self.wanted_ref
            and (m.version, ref.sha256) == (self.wanted.version, self.wanted_ref.sha256)
        ):
            return  # already fetching
        self._fetch(m, ref)

    def _fetch(self, m: Manifest, ref: PayloadRef) -> None:
        """Subscribe to the retained chunks of one payload of version m."""
        for topic in self.wanted_topics:
            self.link.unsubscribe(topic)
        self.fetch_attempts = 0
        self.wanted, self.wanted_ref = m, ref
        self.receiving_bytes = 0
        self.wanted_topics = [
            self.topics.global_chunk(m.version, i)
            for i in range(ref.first_index, ref.first_index + ref.chunks)
        ]
        for topic in self.wanted_topics:
            self.link.subscribe(topic, 1)
        what = (
            "delta" if m.delta and ref is m.delta.payload else "onnx" if ref is m.onnx else m.codec
        )
        self.log.info("fetching global version %d (%s, %d chunks)", m.version, what, ref.chunks)

    def _on_global_chunk(self, payload: bytes) -> None:
        m, ref = self.wanted, self.wanted_ref
        if m is None or ref is None:
            return
        chunk = decode_chunk(payload, max_bytes=8 * 1024 * 1024)
        if chunk.payload_id != ref.payload_id:
            return  # a chunk of another version or of the payload this device does not use
        self.receiving_bytes += len(payload)
        done = self.reassembler.add(chunk, source="global", now=time.time())
        if done is None:
            return
        for topic in self.wanted_topics:
            self.link.unsubscribe(topic)
        if hashlib.sha256(done.payload).hexdigest() != ref.sha256 or len(done.payload) != ref.size:
            self.fetch_attempts += 1
            if self.fetch_attempts < 3:  # fetch the retained chunks once more
                for topic in self.wanted_topics:
                    self.link.subscribe(topic, 1)
            else:
                self.wanted, self.wanted_ref, self.wanted_topics = None, None, []
            raise SchemaError(f"global version {m.version} does not match its manifest")
        self.wanted, self.wanted_ref, self.wanted_topics = None, None, []
        if ref is m.onnx:
            self._evaluate_onnx(m, done.payload)
            self.version, self.model_sha = m.version, ref.sha256
            return
        full = parse_or_schema_error(m.codec)
        if m.delta and ref is m.delta.payload:
            assert self.weights is not None
            weights = apply_model_delta(
                self.weights, done.payload, full=full,
                delta=parse_or_schema_error(m.delta.codec), version=m.version,
            )  # fmt: skip
        else:
            weights = decode_model(done.payload, full, m.tensors)
        blob = encode_weights(weights)
        if hashlib.sha256(blob).hexdigest() != m.model_sha256:
            if ref is not m.weights:  # the delta did not rebuild the version: take it whole
                self.fetched_bytes += self.receiving_bytes
                self._fetch(m, m.weights)
            raise SchemaError(f"global version {m.version} does not rebuild to its model_sha256")
        self.weights, self.version, self.model_sha = weights, m.version, m.model_sha256
        self.fetched_bytes += self.receiving_bytes
        self.store.save_model(blob)
        self._save_progress()
        self.log.info(
            "holding global version %d (%d bytes fetched, %s)",
            m.version, self.receiving_bytes, "delta" if ref is not m.weights else m.codec,
        )  # fmt: skip

    def _evaluate_onnx(self, m: Manifest, onnx_bytes: bytes) -> None:
        from edge_agent.inference import OnnxModel, accuracy

        try:
            model = OnnxModel(onnx_bytes=onnx_bytes, threads=self.profile.torch_threads)
        except ValueError as err:
            raise DecodeError(f"global version {m.version}: {err}") from err
        acc = accuracy(model, self.x, self.y)
        self.log.info("global version %d: local accuracy %.4f (onnxruntime)", m.version, acc)
        self._publish_metrics(m.round_id, m.version, {"onnx_accuracy": acc})

    # ------------------------------------------------------------ rounds

    def _on_round(self, r: RoundAnnouncement) -> None:
        if r.state != "open" or self.device not in r.selected or self.infer_only:
            if self.pending and r.round_id >= self.pending.round_id and r.state != "open":
                self.pending = None  # the round we waited to train for has ended
            return
        parse_or_schema_error(r.codec)  # a round whose codec this agent cannot use is dropped
        self.pending = r
        self.log.info("selected for round %d (version %d)", r.round_id, r.model_version)

    def _maybe_train(self, now: float) -> None:
        r = self.pending
        if r is None or self.version != r.model_version or self.weights is None:
            return
        if self.wanted is not None and self.wanted.version == r.model_version:
            return  # the manifest names other bytes for this version: train once refetched
        self.pending = None
        if r.round_id <= self.last_round and self.model_sha == self.last_round_sha:
            return  # trained this round already (e.g. a retained redelivery after restart)
        if now > r.deadline:
            self.log.warning("round %d: deadline passed before the model arrived", r.round_id)
            return
        self._train(r)

    def _build_model(self) -> Any:
        import torch

        torch.set_num_threads(self.s.torch_threads or self.profile.torch_threads)
        return self.task.build_model()

    def _train(self, r: RoundAnnouncement) -> None:
        from edge_agent.training import Budget, train_local
        from fedmq.tasks.weights import get_weights, set_weights

        assert self.weights is not None and self._model is not None
        base = self.weights
        set_weights(self._model, base)
        self._publish_state("training")
        result = train_local(
            self._model,
            self.x,
            self.y,
            config=r.train,
            budget=Budget(
                max_seconds=self.profile.max_train_seconds,
                max_memory_mb=self.profile.max_memory_mb,
                max_batch_size=self.profile.max_batch_size,
            ),
            seed=r.round_id * 100_003 + self.s.device_index,
        )
        if self.s.extra_delay_s:
            time.sleep(self.s.extra_delay_s)
        trained = get_weights(self._model)
        delta = {name: trained[name] - base[name] for name in base}
        update = Update(
            update_id=uuid.uuid4().hex,
            device=self.device,
            round_id=r.round_id,
            base_version=r.model_version,
            # FedAvg weight n_k: the local dataset, or what a budget-stopped run got through
            num_examples=min(len(self.x), max(1, result.examples)),
            codec="",
            body=b"",
            metrics={"train_loss": result.mean_loss, "train_s": result.seconds},
            fetched_bytes=self.fetched_bytes,
        )
        compressed = self._compress(r, delta, header_bytes=len(encode_update(update)))
        if compressed is None:
            self._publish_state("online")
            return
        update = dataclasses.replace(update, codec=compressed.pipeline.name, body=compressed.body)
        payload = encode_update(update)
        self.store.outbox.put(update.update_id, payload)  # before sending: survives a crash
        # then the residual: a crash between the two renames adds the old residual once more
        self.store.save_residual(compressed.residual)
        self.last_round, self.last_round_sha = r.round_id, self.model_sha
        self.fetched_bytes = 0  # downlink is counted once, with the first update that used it
        self._save_progress()
        self._send(update.update_id, payload)
        self.rounds_trained += 1
        self._publish_state("online")
        self._publish_metrics(
            r.round_id, r.model_version,
            {"train_loss": result.mean_loss, "train_s": result.seconds,
             "epochs": result.epochs_done},
        )  # fmt: skip
        self.log.info(
            "round %d: trained %.1f epochs in %.2fs, loss %.4f%s; sent update %s "
            "(%s, %d bytes)",
            r.round_id, result.epochs_done, result.seconds, result.mean_loss,
            f", stopped by {result.stopped_by} budget" if result.stopped_by else "",
            update.update_id, update.codec, len(payload),
        )  # fmt: skip

    def _compress(
        self, r: RoundAnnouncement, delta: dict[str, np.ndarray], *, header_bytes: int
    ) -> Compressed | None:
        """Encode the delta with the round's pipeline, the residual added, within the byte
        budget (the round's or the profile's, whichever is smaller); None if it cannot fit."""
        budgets = [b for b in (r.max_update_bytes, self.profile.max_update_bytes) if b > 0]
        budget = min(budgets) if budgets else 0
        # the body's bin header (at most 5 bytes) is not in an update with an empty body
        max_body = max(1, budget - header_bytes - 5) if budget else 0
        pipeline: Pipeline = parse_or_schema_error(r.codec)
        rng = np.random.default_rng([r.round_id, zlib.crc32(self.device.encode())])
        residual = self.store.load_residual()
        if residual is not None and specs_of(residual) != specs_of(delta):
            self.log.warning("the saved residual does not fit this model; starting afresh")
            residual = None
        try:
            compressed = compress_update(
                delta, pipeline, rng=rng, residual=residual, max_body_bytes=max_body
            )
        except ValueError as err:
            self.log.error("round %d: no update sent: %s", r.round_id, err)
            return None
        if compressed.pipeline != pipeline:
            self.log.info(
                "round %d: %s to fit the %d-byte budget", r.round_id,
                compressed.pipeline.name, budget,
            )  # fmt: skip
        return compressed

    def _resend_unacked(self, now: float) -> None:
        overdue = [uid for uid, at in self._sent_at.items() if now - at > ACK_TIMEOUT_S]
        if not overdue or not self.link.connected:
            return
        pending = dict(self.store.outbox.pending())
        for update_id in overdue:
            if update_id in pending:
                self.log.warning("no ack for update %s after %.0fs; sending it again",
                                 update_id, ACK_TIMEOUT_S)  # fmt: skip
                self._send(update_id, pending[update_id])
            else:
                del self._sent_at[update_id]

    def _send(self, update_id: str, payload: bytes) -> None:
        self._sent_at[update_id] = time.time()
        topic = self.topics.update(self.device)
        for chunk in encode_chunks(payload, update_id, self.link.max_message_bytes):
            self.link.publish(topic, chunk, qos=1)

    # ------------------------------------------------------------ presence

    def _state_payload(self, status: str) -> bytes:
        return encode_state(
            DeviceState(
                device=self.device,
                status=status,
                job=self.s.job,
                profile=self.profile.name,
                agent_version=__version__,
                num_examples=len(self.x),
                model_version=getattr(self, "version", -1),
                ts=time.time(),
                trains=not self.infer_only,
            )
        )

    def _publish_state(self, status: str) -> None:
        self.link.publish(
            self.topics.device_state(self.device), self._state_payload(status), qos=1, retain=True
        )

    def _publish_metrics(self, round_id: int, version: int, metrics: dict[str, float]) -> None:
        msg = DeviceMetrics(device=self.device, round_id=round_id, model_version=version,
                            metrics=metrics)  # fmt: skip
        self.link.publish(self.topics.metrics(self.device), encode_metrics(msg), qos=0)

    def _save_progress(self) -> None:
        self.store.save(
            {"version": self.version, "model_sha": self.model_sha,
             "last_round": self.last_round, "last_round_sha": self.last_round_sha,
             "fetched_bytes": self.fetched_bytes}
        )  # fmt: skip

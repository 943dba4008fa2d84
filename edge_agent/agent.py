"""The device agent: one loop over MQTT events and timer ticks, around pure parts.

`ModelFetch` (fetch.py) decides what to fetch and whether a global version may be held;
`train_local` (training.py) is the one training loop; `build_update` (updates.py) makes
the update; `Uplink` (uplink.py) keeps it in the on-disk outbox until the aggregator
acknowledges it and sends it again after a reconnect. This shell decodes messages, feeds the parts,
and carries out what they return. Whatever goes wrong while handling one message or one
tick is logged with the device id, counted, and the loop goes on. torch is imported only
when the device trains.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from edge_agent.data import load_device_data
from edge_agent.device_serving import DeviceServing
from edge_agent.evaluation import DeviceEvaluation, describe
from edge_agent.fetch import Action, Hold, HoldOnnx, ModelFetch, Reject, Subscribe, Unsubscribe
from edge_agent.hold import UpdateHold
from edge_agent.personal import PersonalModels
from edge_agent.readiness import ReadinessWatch
from edge_agent.scaffold import DeviceControl
from edge_agent.settings import AgentSettings
from edge_agent.state import DeviceStore
from edge_agent.trust import DownlinkTrust, RoundGate
from edge_agent.updates import BuiltUpdate, build_update, update_rng
from edge_agent.uplink import Uplink
from fedmq import __version__
from fedmq.codecs import parse_or_schema_error
from fedmq.errors import ProtocolError
from fedmq.link import Connected, Link, Message
from fedmq.signing import load_public_key
from fedmq.startup import LinkWatch
from fedmq.tasks import Task, get_task
from fedmq.wire import (
    DeviceMetrics,
    DeviceState,
    RoundAnnouncement,
    TensorSpec,
    decode_ack,
    decode_chunk,
    decode_manifest,
    decode_round,
    encode_metrics,
    encode_state,
    specs_of,
)
from firmware_profiles import Profile, load_profile

TICK_S = 0.2
MAX_CHUNK_MESSAGE_BYTES = 8 * 1024 * 1024
SAVE_COUNTERS_EVERY_S = 1.0  # refusals are counted on disk at most this often

T = TypeVar("T")


class Agent:
    """One device taking part in one job."""

    def __init__(self, *, settings: AgentSettings, task: Task | None = None) -> None:
        self.s = settings
        self.device = settings.device_id
        self.topics = settings.topics
        self.profile: Profile = load_profile(settings.profile)
        self.log = logging.LoggerAdapter(logging.getLogger("fedmq.agent"), {"device": self.device})
        if settings.local_dp is not None:
            self.log.info("local DP: every delta clipped to L2 %g, noise std %g per coordinate",
                          settings.local_dp_clip, settings.local_dp_clip * settings.local_dp_noise)
        self.infer_only = settings.infer_only or not self.profile.can_train
        self.task = task or get_task(settings.task)
        self.data = load_device_data(settings, self.task, trains=not self.infer_only)
        self.x, self.y = self.data.x, self.data.y
        self.store = DeviceStore(root=settings.state_dir / self.device)
        self.personal = PersonalModels(store=self.store, x=self.x, y=self.y,
                                       held_x=self.data.eval_x,
                                       held_y=self.data.eval_y)  # fmt: skip
        self.evaluation = DeviceEvaluation.of(settings, self.profile, self.data, self.store.root)
        progress = self.store.load()
        # a round is "already trained" only if both its id and its base model match
        self.last_round: int = int(progress.get("last_round", 0))
        self.last_round_sha: str = str(progress.get("last_round_sha", ""))
        self.fetched_bytes = int(progress.get("fetched_bytes", 0))
        # the model is built at start, not inside the first round's timer
        self._model: Any = None
        specs: tuple[TensorSpec, ...] | None = None
        if not self.infer_only:
            self._model, specs = self._build_model()
        try:
            held = self.store.load_held(specs)
        except ValueError as err:  # e.g. saved by an agent of another task: not fatal
            self.log.warning("%s; fetching it anew", err)
            held = None
        key = load_public_key(settings.server_key) if settings.server_key else None
        self.trust = DownlinkTrust(server_key=key, insecure=settings.insecure)
        self.fetch = ModelFetch(
            topics=self.topics, task=self.task.name, specs=specs, onnx=self.infer_only,
            version=held.version if held else -1, sha256=held.sha256 if held else "",
            weights=held.weights if held else None, trust=self.trust,
            epoch=int(progress.get("epoch", 0)) if held else 0,
            max_version_jump=settings.max_version_jump,
        )  # fmt: skip
        self.scaffold = DeviceControl(store=self.store, specs=specs, progress=progress)
        self.fetch.control_version = self.scaffold.version
        last = progress.get("round_key")
        self.gate = RoundGate(
            topics=self.topics, task=self.task.name, trust=self.trust,
            max_epochs=self.profile.max_epochs, max_lr=self.profile.max_lr,
            max_prox_mu=self.profile.max_prox_mu,
            last=(int(last[0]), int(last[1]), int(last[2])) if last else None,
        )  # fmt: skip
        # why a global model or round was last refused ("<code>: <text>"), on the state topic
        self.reason = ""
        self.readiness = ReadinessWatch.of(settings, self.profile)  # thermal, battery gates
        subs = [(self.topics.round(), 1), (self.topics.global_manifest(), 1),
                (self.topics.ack(self.device), 1)]  # fmt: skip
        self.link = Link(
            client_id=f"fedmq-{settings.job}-{self.device}",
            address=settings.broker,
            subscriptions=subs,
            will=(self.topics.device_state(self.device), self._state_payload("offline")),
            max_message_bytes=settings.max_message_bytes or self.profile.max_message_bytes,
        )
        self.pending: RoundAnnouncement | None = None
        self.rounds_trained, self.done_round, self.done = 0, 0, False  # done: exit the loop
        hold = None  # the hold_dir hook: updates kept back until released (tests)
        if settings.hold_dir is not None:
            ids = [uid for uid, _ in self.store.outbox.pending()]
            hold = UpdateHold(hold_dir=settings.hold_dir, device=self.device, outbox_ids=ids)
        self.uplink = Uplink(link=self.link, topic=self.topics.update(self.device),
                             outbox=self.store.outbox, hold=hold, log=self.log)  # fmt: skip
        # refusals, unverified downlink and dropped messages by code since this start; also
        # in agent.json ("counters"), for tools and tests
        self.counters: dict[str, int] = {}
        self._counters_saved_at, self._counters_dirty = 0.0, False
        self.serving = DeviceServing(settings=settings, task=self.task, store=self.store,
                                     x=self.x if len(self.x) else self.data.eval_x, log=self.log,
                                     threads=self.profile.torch_threads, refuse=self._refuse)

    # ------------------------------------------------------------ the loop

    def run(self, *, stop: Any = None, max_rounds: int = 0) -> int:
        """Serve until stop, the job's end (on_done) or max_rounds; FatalError: see startup."""
        self.log.info("starting: %d local examples, %d to evaluate on (%s), profile %s, %s",
                      len(self.x), len(self.data.eval_x), self.data.source, self.profile.name,
                      "inference only" if self.infer_only else "training")  # fmt: skip
        self.log.log(*self.trust.describe(insecure=self.s.insecure))
        watch = LinkWatch(link=self.link, identity=f"device {self.device}",
                          connect_timeout_s=self.s.connect_timeout_s, log=self.log)  # fmt: skip
        self.serving.start(self.fetch, trains=not self.infer_only)  # the served model; the API
        self.link.start()
        try:
            ready = watch.wait_connected(stop)  # progress lines; gives up after the timeout
            while ready and not self.done and not (stop is not None and stop.is_set()):
                if max_rounds and self.rounds_trained >= max_rounds and not len(self.store.outbox):
                    break
                event = self.link.next_event(TICK_S)
                if isinstance(event, Message):
                    self._contain(f"message on {event.topic}", self._on_message, event)
                elif isinstance(event, Connected):
                    self._contain("a connection", self._on_connected, event)
                watch.on_event(event)  # lost, back, or another agent with this device id
                watch.tick()
                now = time.time()
                self._contain("the fetch timer", self._fetch_tick, now)
                if self.readiness.tick(now) and self.link.connected:  # gates flipped
                    self._publish_state("online")  # (the loop never ticks while training)
                self._contain("training", self._maybe_train, now)
                self._contain("resending", self.uplink.tick, now)
                if self._counters_dirty and now - self._counters_saved_at >= SAVE_COUNTERS_EVERY_S:
                    self._save_progress()
        finally:
            self.link.stop(final=(self.topics.device_state(self.device),
                                  self._state_payload("offline")))  # fmt: skip
            self.serving.stop()
        return 0

    def _contain(self, what: str, step: Callable[[T], None], arg: T) -> None:
        """Run one step; a bad message or a bug of ours is logged and counted, not fatal."""
        try:
            step(arg)
        except ProtocolError as err:
            err.at(device=self.device, topic=getattr(arg, "topic", None))
            self._count(err.reason_code)
            self.log.warning("device %s dropped %s: %s", self.device, what, err.reason)
        except Exception:
            self._count("agent_error")
            self.log.exception("device %s failed at %s; going on", self.device, what)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1
        self._counters_dirty = True

    def _refuse(self, code: str, reason: str) -> None:
        """A downlink message refused for good: the held model stays; count it and say why
        on the state topic (published again only when the reason changes)."""
        self._count(code)
        self.log.warning("refused %s", reason)
        text = f"{code}: {reason}"
        if text != self.reason:
            self.reason = text
            self._publish_state("online")

    def _on_connected(self, event: Connected) -> None:
        self.log.info(
            "connected (session present: %s, broker max packet: %s)",
            event.session_present, event.max_packet_size,
        )  # fmt: skip
        self._publish_state("online")
        self.fetch.on_connected(now=time.time())
        self.uplink.resend_all(now=time.time())

    def _on_message(self, msg: Message) -> None:
        kind = self.topics.kind_of(msg.topic)
        if not msg.payload:
            return  # a cleared retained topic
        now = time.time()
        if kind == "global":
            self._apply(self.fetch.on_manifest(decode_manifest(msg.payload), now=now))
        elif kind == "global_chunk":
            chunk = decode_chunk(msg.payload, max_bytes=MAX_CHUNK_MESSAGE_BYTES)
            self._apply(self.fetch.on_chunk(chunk, now=now, wire_bytes=len(msg.payload)))
        elif kind == "round":
            self._on_round(decode_round(msg.payload))
        elif kind == "ack":
            ack = decode_ack(msg.payload)
            if self.uplink.on_ack(ack):
                level = logging.INFO if ack.status == "accepted" else logging.WARNING
                self.log.log(level, "update %s for round %d: %s %s",
                             ack.update_id, ack.round_id, ack.status, ack.reason)  # fmt: skip

    # ------------------------------------------------------------ global model

    def _fetch_tick(self, now: float) -> None:
        if self.link.connected:  # while offline no chunk can come: that is no stall
            self._apply(self.fetch.tick(now=now))

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the fetch machine decided."""
        for a in actions:
            if isinstance(a, Subscribe):
                for topic in a.topics:
                    self.link.subscribe(topic, 1)
                if a.attempt == 1 and not a.verified and a.what != "control":
                    self._count("unverified_global")
                if a.attempt == 1:
                    self.log.debug("fetching global version %d (%s, %d chunks)",
                                  a.version, a.what, len(a.topics))  # fmt: skip
            elif isinstance(a, Unsubscribe):
                for topic in a.topics:
                    self.link.unsubscribe(topic)
            elif isinstance(a, Reject):
                if a.final:  # the held model stays; say why on the state topic
                    self._refuse(a.code, a.reason)
                else:
                    self._count(a.code)
                    self.log.warning("refused global version %d: %s", a.version, a.reason)
            elif isinstance(a, Hold):
                self.store.save_model(a.blob)
                self.fetched_bytes += a.fetched_bytes
                self.reason = ""
                self._save_progress()
                self.log.info("holding global version %d (%d bytes fetched, %s)",
                              a.manifest.version, a.fetched_bytes, a.via)  # fmt: skip
                self._contain("evaluation", self._evaluate, a)
                self._contain("serving", self.serving.on_held, a.manifest.version)
            elif self.scaffold.took(a):  # SCAFFOLD's c of the held version
                self.fetched_bytes += self.scaffold.fetched_bytes(a)
                self._save_progress()
            elif isinstance(a, HoldOnnx):
                self.reason = ""  # verified and served first; a refused model is not evaluated
                if self.serving.offer(a.onnx, version=a.manifest.version, source="global",
                                      epoch=self.fetch.epoch):
                    self._contain("evaluation", self._evaluate, a)

    def _evaluate(self, a: Hold | HoldOnnx) -> None:
        """Federated evaluation of a newly held version: one metrics message (evaluation.py)."""
        onnx = self.serving.model if isinstance(a, HoldOnnx) else None  # the served session
        msg = self.evaluation.run(a.manifest, model=self._model,
                                  weights=getattr(a, "weights", None), onnx=onnx)  # fmt: skip
        if msg is not None:
            self.link.publish(self.topics.metrics(self.device), encode_metrics(msg), qos=1)
            self.evaluation.reported(a.manifest)
            self.log.info("global version %d: %s", msg.model_version, describe(msg.metrics))

    # ------------------------------------------------------------ rounds

    def _on_round(self, r: RoundAnnouncement) -> None:
        before = self.gate.last
        verified, refusal = self.gate.check(r)
        if refusal is not None:
            self._refuse(refusal.code, refusal.reason)
            return
        if not verified:
            self._count("unverified_round")
        if self.gate.last != before:
            self._save_progress()
        if r.done and r.state != "open" and r.round_id != self.done_round:  # the job is done
            self.done_round, on_done = r.round_id, self.s.on_done
            self.done = on_done == "exit" or (on_done == "auto" and not self.infer_only)
            self.log.info("job %s is done after %d rounds, model version %d; %s", self.s.job,
                          r.round_id, self.fetch.version, "exiting" if self.done
                          else f"idling (on_done = {on_done})")  # fmt: skip
        if r.state != "open" or self.device not in r.selected or self.infer_only:
            if self.pending and r.round_id >= self.pending.round_id and r.state != "open":
                self.pending = None  # the round we waited to train for has ended
            return
        parse_or_schema_error(r.codec)  # a round whose codec this agent cannot use is dropped
        if self._declines(r, time.time()):
            return
        self.pending = r
        self.log.info("selected for round %d (version %d)", r.round_id, r.model_version)

    def _maybe_train(self, now: float) -> None:
        r, f = self.pending, self.fetch
        if r is None or f.version != r.model_version or f.weights is None:
            return
        if f.fetching is not None and f.fetching.version == r.model_version:
            return  # the manifest names other bytes for this version: train once refetched
        if not self.scaffold.ready(r):
            return  # a SCAFFOLD round: train once the version's control variate is held
        self.pending = None
        if r.round_id <= self.last_round and f.sha256 == self.last_round_sha:
            return  # trained this round already (e.g. a retained redelivery after restart)
        if now > r.deadline:
            self.log.warning("round %d: deadline passed before the model arrived", r.round_id)
            return
        if self._declines(r, now):
            return
        self._publish_state("training")
        try:
            self._train(r, f.weights)
        finally:
            self._publish_state("online")

    def _build_model(self) -> tuple[Any, tuple[TensorSpec, ...]]:
        import torch

        from fedmq.tasks.weights import get_weights

        torch.set_num_threads(self.s.torch_threads or self.profile.torch_threads)
        model = self.task.build_model()
        return model, specs_of(get_weights(model))

    def _train(self, r: RoundAnnouncement, base: dict[str, np.ndarray]) -> None:
        from edge_agent.training import Budget

        p = self.profile
        # the round's training, and its personal model if the round asks for one
        local = self.personal.train_round(
            self._model, base, r.train,
            budget=Budget(max_seconds=p.max_train_seconds, max_memory_mb=p.max_memory_mb,
                          max_batch_size=p.max_batch_size),
            seed=r.round_id * 100_003 + self.s.device_index, version=r.model_version,
            correction=self.scaffold.correction(r),
        )  # fmt: skip
        result = local.result
        if self.s.extra_delay_s:
            time.sleep(self.s.extra_delay_s)
        metrics = {"train_loss": result.mean_loss, "train_s": result.seconds,
                   **result.work(r.train.epochs), **local.metrics}  # FedNova's tau_i: local_steps
        base, trained, c_new = local.base, local.trained, None
        if self.scaffold.correction(r) is not None:  # the control delta travels with it
            base, trained, c_new = self.scaffold.attach(r, base, trained, result.steps)
        built = build_update(
            announcement=r, device=self.device, update_id=uuid.uuid4().hex, base=base,
            trained=trained, residual=self.store.load_residual(),
            profile_max_bytes=p.max_update_bytes,
            # FedAvg weight n_k: the local dataset, or what a budget-stopped run got through
            num_examples=min(local.examples, max(1, result.examples)), metrics=metrics,
            fetched_bytes=self.fetched_bytes, rng=update_rng(r.round_id, self.device),
            local_dp=self.s.local_dp,
        )  # fmt: skip
        if not isinstance(built, BuiltUpdate):
            self.log.error("round %d: no update sent: %s", r.round_id, built.reason)
            return
        if built.residual_reset:
            self.log.warning("the saved residual does not fit this model; starting afresh")
        if built.pipeline.name != r.codec:
            self.log.info("round %d: %s to fit the %d-byte budget",
                          r.round_id, built.pipeline.name, built.budget)  # fmt: skip
        self.uplink.keep(built.update_id, built.payload)
        self.personal.keep(local)  # on this device only: never in an update
        if c_new is not None:
            self.scaffold.commit(c_new)
        # then the residual: a crash between the two renames adds the old residual once more
        self.store.save_residual(built.residual)
        self.last_round, self.last_round_sha = r.round_id, self.fetch.sha256
        self.fetched_bytes = 0  # downlink is counted once, with the first update that used it
        self._save_progress()
        sent = self.uplink.send_new(built.update_id, r.round_id, built.payload, now=time.time())
        self.rounds_trained += 1
        metrics["epochs"] = result.epochs_done
        self._publish_metrics(r.round_id, r.model_version, metrics)
        self.log.info(
            "round %d: trained %.1f epochs in %.2fs, loss %.4f%s; %s update %s (%s, %d bytes)",
            r.round_id, result.epochs_done, result.seconds, result.mean_loss,
            f", stopped by {result.stopped_by} budget" if result.stopped_by else "",
            "sent" if sent else "held", built.update_id,
            built.update.codec, len(built.payload),
        )  # fmt: skip

    # ------------------------------------------------------------ presence

    def _state_payload(self, status: str) -> bytes:
        return encode_state(
            DeviceState(
                device=self.device, status=status, job=self.s.job, profile=self.profile.name,
                agent_version=__version__, num_examples=len(self.x),
                model_version=self.fetch.version, ts=time.time(), trains=not self.infer_only,
                reason=self.reason, **self.readiness.state_fields(time.time()),
            )
        )  # fmt: skip

    def _publish_state(self, status: str) -> None:
        self.link.publish(
            self.topics.device_state(self.device), self._state_payload(status), qos=1, retain=True
        )

    def _declines(self, r: RoundAnnouncement, now: float) -> bool:
        """Not ready (gates read again): decline the round, say why at once (readiness.py)."""
        if self.readiness.declines(r.round_id, now, self.log):  # newly declined
            self.pending = None
            self._publish_state("online")
        return self.readiness.declined == r.round_id

    def _publish_metrics(self, round_id: int, version: int, metrics: dict[str, float]) -> None:
        msg = DeviceMetrics(device=self.device, round_id=round_id, model_version=version,
                            metrics=metrics)  # fmt: skip
        self.link.publish(self.topics.metrics(self.device), encode_metrics(msg), qos=0)

    def _save_progress(self) -> None:
        self.store.save(
            {"version": self.fetch.version, "model_sha": self.fetch.sha256,
             "last_round": self.last_round, "last_round_sha": self.last_round_sha,
             "fetched_bytes": self.fetched_bytes, "epoch": self.fetch.epoch,
             "control_version": self.scaffold.version,
             "round_key": list(self.gate.last) if self.gate.last else None,
             "counters": dict(sorted(self.counters.items()))}
        )  # fmt: skip
        self._counters_saved_at, self._counters_dirty = time.time(), False

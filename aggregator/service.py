"""The aggregator service: one loop over MQTT events and timer ticks, over pure stages.

    admission (decode, authorise, validate)  -> aggregator.admission
    dedupe, verdicts, counters, round stats  -> aggregator.ledger (durable in the journal)
    the mode's rules (sync rounds / FedBuff) -> aggregator.modes
    the aggregation rule (running sum)       -> aggregator.fedavg.RunningSum
      or a robust rule, bounds, central DP   -> aggregator.robust, .bounds, .privacy
    the server optimiser on the mean delta   -> aggregator.server_opt (state per version)
    presence and dropouts                    -> aggregator.presence
    the status document (and the Will)       -> aggregator.status
    the readable per-device fleet mirror     -> aggregator.fleetview

The loop takes every message waiting, handles each, then commits the journal once (one
fsync for the whole batch) and only then sends the acks and acknowledges the messages to
the broker. Anything a peer gets wrong is a ProtocolError: logged with the device and
reason, counted, answered with a rejection where there is an update id, and dropped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from aggregator.admission import Admission, check_device_id
from aggregator.clientside import ClientSide
from aggregator.eligibility import decline, eligible
from aggregator.fedavg import AggregationRule, RunningSum
from aggregator.fedeval import FederatedEval, accuracy_of, headline
from aggregator.fleetview import FleetView
from aggregator.globals import GlobalModel, ModelRefused, StoredVersionError
from aggregator.guards import RoundGuards
from aggregator.intake import Intake
from aggregator.journal import Journal, Snapshot
from aggregator.ledger import Ledger, verdict_summary
from aggregator.metrics import metrics_for
from aggregator.modes import BufferedRounds, Mode, SyncRounds
from aggregator.personal import personal_stats, personal_train
from aggregator.presence import Presence
from aggregator.recovery import recover_round
from aggregator.robust import make_rule
from aggregator.rounds import OpenRound
from aggregator.server_opt import make_server_optimizer
from aggregator.settings import AggregatorSettings
from aggregator.status import RecentRounds, done_reason, offline_status, status_of
from aggregator.store import Store
from aggregator.watch import OwnTopics
from fedmq.atomicfile import move_aside
from fedmq.config import ConfigError
from fedmq.errors import ProtocolError, Unauthorized
from fedmq.fleetfile import FleetFile, read_fleet
from fedmq.link import Connected, Link, Message
from fedmq.signing import Signer, aggregator_key, verify
from fedmq.startup import LinkWatch
from fedmq.tasks import Task, get_task
from fedmq.wire import (
    DeviceState,
    RoundAnnouncement,
    decode_manifest,
    decode_metrics,
    decode_round,
    decode_state,
    encode_ack,
    encode_round,
    encode_weights,
)

log = logging.getLogger("fedmq.aggregator")

TICK_S = 0.2
STATUS_EVERY_S = 1.0
# after a (re)connection a round opens once no device has come online for SETTLE_S (the
# burst of retained states is over), or SETTLE_MAX_S after it whatever still arrives
SETTLE_S, SETTLE_MAX_S = 0.3, 5.0


class Aggregator:
    """Runs one job's rounds (synchronous FedAvg or FedBuff) against one broker."""

    last_selected: frozenset[str] = frozenset()  # the devices the last closed round selected

    def __init__(self, *, settings: AggregatorSettings, task: Task | None = None) -> None:
        s = self.s = settings
        self.topics = s.topics
        self.task = task or get_task(s.task)
        self.store = Store(root=s.state_dir, keep_versions=s.keep_versions)
        self.journal = Journal(root=s.state_dir)
        # the downlink's signing key: configured, or made once in the state directory
        key, self.public_key_file, self.key_created = aggregator_key(s.signing_key, s.state_dir)
        self.signer = Signer(key=key)
        self.epoch = 0  # this state directory's lineage, from state.json (see _resume)
        own = [self.topics.global_manifest(), self.topics.round(), self.topics.status()]
        self.own = OwnTopics(topics=own)  # its own retained topics, watched for forgeries
        will = offline_status(job=s.job, task=self.task.name)
        self.own.will(self.topics.status(), will)
        self.link = Link(
            client_id=f"fedmq-aggregator-{s.job}",
            address=s.broker,
            subscriptions=[(self.topics.updates_filter(), 1),
                           (self.topics.device_states_filter(), 1),
                           (self.topics.metrics_filter(), 1),  # evaluation reports: QoS 1
                           *((topic, 1) for topic in own)],  # fmt: skip
            max_message_bytes=s.max_message_bytes,
            will=(self.topics.status(), will),  # marks the job's status offline
            manual_ack=True,  # an update is acknowledged to the broker once it is durable
        )
        self.watch = LinkWatch(link=self.link, identity=f"the aggregator of job {s.job}",
                               connect_timeout_s=s.connect_timeout_s, log=log)  # fmt: skip
        self.model = GlobalModel(task=self.task, store=self.store, seed=s.seed,
                                 downlink=s.downlink_pipeline,
                                 downlink_delta=s.downlink_delta_pipeline,
                                 eval_data=s.eval_data)  # fmt: skip
        self.selector = s.selector  # the selection policy and its participation table
        self.mode: Mode = (
            BufferedRounds(policy=s.policy, buffer=s.buffer, selection=self.selector)
            if s.mode == "async" else SyncRounds(policy=s.policy, selection=self.selector))
        fleet = _fleet(s)
        # the devices the fleet file enrols (revoked ones left out); None: any valid id
        self.enrolled = (frozenset(d for d in fleet.devices if fleet.enrolled(d) is not None)
                         if fleet else None)  # fmt: skip
        caps = {d.id: d.max_examples for d in fleet.devices.values()
                if not d.revoked and d.max_examples is not None} if fleet else {}  # fmt: skip
        self.enrolled_count = len(self.enrolled) if self.enrolled is not None else 0
        self.metrics = metrics_for(s, fleet)  # Prometheus (docs/metrics.md); off by default
        # the round's train map; under fedper with its head, which updates leave out
        self.train = personal_train(s.train, head=s.personal_head_names,
                                    default_head=self.task.head, specs=self.model.specs)
        self.clientside = ClientSide(specs=self.model.specs, train=self.train, store=self.store,
                                     normalize_local_work=s.normalize_local_work)  # fmt: skip
        self.admission = Admission(specs=self.clientside.update_specs,
                                   max_update_bytes=s.max_update_bytes,
                                   budget_bytes=s.update_budget_bytes, enrolled=self.enrolled,
                                   max_examples=s.max_examples, example_caps=caps,
                                   head=frozenset(self.train.personal_head))  # fmt: skip
        # adaptive bounds and central DP, learnt round to round (kept in state.json)
        self.guards = RoundGuards(s, enrolled_count=self.enrolled_count)
        self.optimizer = make_server_optimizer(s, self.model.specs, self.store)
        self.presence = Presence(job=s.job, grace_s=s.drop_grace_s, enrolled=self.enrolled,
                                 max_devices=s.max_devices)  # fmt: skip
        self.ledger = Ledger(journal=self.journal)
        self.intake = Intake(admission=self.admission, mode=self.mode, ledger=self.ledger,
                             max_message_bytes=s.max_message_bytes,
                             max_partial_per_device=s.max_partial_updates_per_device,
                             weigh=self.clientside.weigh)  # fmt: skip
        self.device_metrics: dict[str, dict[str, float]] = {}
        self.fedeval = FederatedEval(max_devices=s.max_devices)  # the devices' evaluations
        self.fleet_view = FleetView(topics=self.topics)  # the JSON mirror of the device table
        self.recent = RecentRounds()  # the status's tail of closed rounds
        self._online = True  # False while stopping: the last status says offline
        self.next_round_id = 1
        self.waiting_since = 0.0
        self.done_reason = ""
        self._handled: list[Message] = []  # acknowledged to the broker after the commit
        self._status_at, self._status_dirty = 0.0, True
        self._connections, self._connected_at = 0, 0.0

    @property
    def round(self) -> OpenRound | None:
        """The round (or buffer) being filled, if one is open."""
        return self.intake.round

    @property
    def sum(self) -> AggregationRule | None:
        """The aggregation rule (FedAvg's running sum) of the open round, if one is open."""
        return self.intake.sum

    def _new_rule(self, bounds: dict[str, Any]) -> AggregationRule:
        """The round's aggregation rule with the bounds it opened with (kept in the journal
        so that a restart rebuilds the same rule)."""
        s = self.s
        return self.clientside.rule(make_rule(
                         specs=self.model.specs, rule=s.rule, bound=float(bounds.get("bound", 0)),
                         clip_norm=s.clip_norm, median_norm=float(bounds.get("median_norm", 0)),
                         noise_multiplier=self.guards.noise_multiplier, trim=s.trim_fraction,
                         krum_f=s.krum_f, krum_m=s.krum_m))  # fmt: skip

    # ------------------------------------------------------------ the loop

    def run(self, *, stop: Any = None) -> int:
        """Serve until the rounds or accuracy are reached (0) or stop is set (0); FatalError
        when no broker answers in connect_timeout_s or another aggregator takes over."""
        self._resume()
        where = f", its public key in {self.public_key_file}" if self.public_key_file else ""
        log.info("%s the downlink with Ed25519 key %s%s (agents pin it: server_key)",
                 "created a key and signing" if self.key_created else "signing",
                 self.signer.key_id, where)  # fmt: skip
        self.metrics.start(self)  # before the broker: a taken port is a ConfigError at once
        self.link.start()
        if not self.watch.wait_connected(stop, on_give_up=self.metrics.stop):
            return 0  # asked to stop; no broker within connect_timeout_s: FatalError (exit 4)
        log.info("connected to %s:%s (MQTT %s), job %s, task %s, %s mode, %d parameters",
                 self.s.host, self.s.port, self.s.mqtt_version, self.s.job, self.task.name,
                 self.mode.name, self.model.num_params)  # fmt: skip
        if not (self.s.rounds and self.next_round_id > self.s.rounds):
            self._publish_own(self.topics.round(), b"")  # no stale round from before
        # (a job already done keeps its last round message: it tells agents so, done=True)
        self._publish_model()
        if self.round is not None:
            self._announce("open")  # the resumed round, exactly as first announced
        self.waiting_since = time.time()
        try:
            while not self.done_reason and not (stop is not None and stop.is_set()):
                for event in self.link.next_events(TICK_S):
                    now = time.time()
                    if isinstance(event, Message):
                        self._on_message(event, now)
                        self._handled.append(event)
                        self._close_if_due(now)
                    elif isinstance(event, Connected):
                        self._on_reconnected(event)
                    self.watch.on_event(event)  # lost, back, taken over by another aggregator
                self._flush()
                self._tick(time.time())
                self.watch.tick()
        finally:
            self._flush()
            self._online = False
            self._publish_status(time.time(), force=True)
            self.link.stop()
            self.journal.close()
            self.intake.close()
            self.metrics.stop()
        log.info("stopped: %s", self.done_reason or "asked to stop")
        return 0

    def _flush(self) -> None:
        """Group commit: fold in what was decoded meanwhile, make every staged verdict
        durable with one commit, then send the acks and the PUBACKs it covers."""
        self.intake.drain()
        self.journal.commit()
        acks, self.intake.acks = self.intake.acks, []
        for device, ack in acks:
            try:
                topic = self.topics.ack(device)
            except ValueError:
                continue  # not a device id we could answer on
            self.link.publish(topic, encode_ack(ack), qos=1)
            self.fleet_view.verdict(device, ack, time.time())
        self.metrics.acks_sent(self.intake.ack_delays(acks, time.time()))
        for msg in self._handled:
            self.link.ack(msg)
        self._handled = []
        r, acc = self.round, self.sum
        if (r is not None and isinstance(acc, RunningSum)  # a kept-updates rule replays all
                and self.intake.folded >= self.s.snapshot_every):  # fmt: skip
            self.journal.save_snapshot(r.round_id, Snapshot(
                seq=self.journal.last_seq(), count=acc.count, total_weight=acc.total_weight,
                sums=encode_weights(acc.sums)))  # fmt: skip
            self.intake.folded = 0

    def _on_reconnected(self, event: Connected) -> None:
        log.info("broker connection up (session present: %s)", event.session_present)
        self._connections += 1
        self._connected_at = time.time()
        if self._connections == 1:  # the first: run() publishes everything
            return
        # a broker killed between autosaves restores an old session and old retained
        # messages, so session_present says nothing: publish the model and round again
        self._publish_model()
        if self.round is not None:
            self._announce("open")
        self._publish_status(time.time(), force=True)
        self.fleet_view.republish()

    def _tick(self, now: float) -> None:
        if self.round is None:
            self.presence.pending_drops.clear()
        else:
            for device in self.presence.due_drops(now, connected_at=self._connected_at):
                self.round.drop(device)
        self.ledger.counters["expired_partial_updates"] += self.intake.expire(now)
        self._restore_own(now)
        self._close_if_due(now)
        # the next round opens in the same tick: no gap in which updates find none open
        if self.round is None and not self.done_reason:
            if self.s.rounds and self.next_round_id > self.s.rounds:
                self.done_reason = f"ran {self.next_round_id - 1} rounds"
            else:
                online = eligible(self.presence, self.train, idle=self.last_selected)
                waited = self.next_round_id > 1 or now - self.waiting_since >= self.s.start_wait_s
                # the retained states come as a burst after each (re)connection: a round
                # opened inside it would choose among the first few devices only
                since = now - self._connected_at
                settled = since >= SETTLE_MAX_S or min(
                    since, now - self.presence.arrived_at) >= SETTLE_S
                if settled and self.mode.policy.should_open(len(online), waited=waited):
                    self._open_round(online, now)
        self._publish_status(now)
        for topic, payload in self.fleet_view.due(now):  # the mirror, on change only
            self.link.publish(topic, payload, qos=1, retain=True)
        self.metrics.observe(self, now)

    # ------------------------------------------------------------ messages

    def _on_message(self, msg: Message, now: float) -> None:
        kind = self.topics.kind_of(msg.topic)
        device = self.topics.device_of(msg.topic) or "?"
        try:
            if kind == "update":
                self.fleet_view.sent(device, len(msg.payload), now)
                self.intake.on_chunk(device, msg.payload, now=now, version=self.model.version,
                                     next_round=self.next_round_id,
                                     trains=self.presence.trains)  # fmt: skip
                self._status_dirty = True
            elif kind == "state" and msg.payload:
                # the id before any other use; enrolment once the state says it is of this
                # job (the state topic is shared by every job under the prefix)
                device = check_device_id(device)
                state = decode_state(msg.payload)
                if self.presence.observe(device, state, now):
                    level = logging.INFO if state.status == "offline" else logging.DEBUG
                    log.log(level, "device %s is %s", device, state.status)
                    self._status_dirty = True
                self.fleet_view.observe(device, state, self.presence.devices, now)
                if self.round is not None and state.status != "offline":
                    self.round.rejoin(device)
                if self.round is not None and state.declined == self.round.round_id:
                    self._declined(device, state)
            elif kind in ("global", "round", "status"):
                self._on_own_topic(msg, now)
            elif kind == "metrics":
                device = self.admission.sender(device)
                m = decode_metrics(msg.payload)
                if m.device != device:
                    raise Unauthorized(f"metrics for {m.device!r} on another device's topic")
                if device not in self.presence.devices:  # bounded by the device table
                    raise Unauthorized("metrics from a device without a state")
                if self.fedeval.observe(device, m.model_version, m.metrics,
                                        current=self.model.version):  # fmt: skip
                    self._status_dirty = True
                self.device_metrics[device] = m.metrics
                if len(self.device_metrics) > 2 * len(self.presence.devices):
                    self.device_metrics = {d: v for d, v in self.device_metrics.items()
                                           if d in self.presence.devices}  # fmt: skip
        except ProtocolError as err:
            err.at(device=device, topic=msg.topic)
            self.ledger.counters[f"rejected_{err.reason_code}"] += 1
            self.fleet_view.refused(device, f"{err.reason_code}: {err.reason}", now)
            log.warning("rejected message from %s on %s: %s", _shown(device), _shown(msg.topic),
                        err.reason)  # fmt: skip
            self._status_dirty = True
        except Exception:  # a bug of ours must not take the service down: log it, go on
            self.ledger.counters["internal_errors"] += 1
            log.exception("failed to handle a message from %s on %s", _shown(device),
                          _shown(msg.topic))  # fmt: skip

    def _on_own_topic(self, msg: Message, now: float) -> None:
        """A message on the aggregator's own retained topics: its echo, or an intrusion
        that is counted, logged and overwritten with its own (see aggregator.watch)."""
        signed: bool | None = None
        if msg.topic != self.topics.status():
            try:
                kind = self.topics.kind_of(msg.topic)
                decoded = decode_manifest(msg.payload) if kind == "global" else (
                    decode_round(msg.payload))  # fmt: skip
                sig = decoded.sig
                public = self.signer.key.public_key()
                signed = sig is not None and verify(public, msg.topic, sig) is None
            except ProtocolError:
                signed = False  # an empty payload (a deletion) or not a message at all
        seen = self.own.observe(msg.topic, msg.payload, retained=msg.retain,
                                signed_by_us=signed, now=now)  # fmt: skip
        if seen is not None and seen.counter:
            self.ledger.counters[seen.counter] += 1
            self._status_dirty = True
            log.warning("ALERT: %s on %s (%d bytes); publishing its own again",
                        seen.why, msg.topic, len(msg.payload))  # fmt: skip

    def _restore_own(self, now: float) -> None:
        for topic, payload in self.own.due(now):
            if topic == self.topics.status():
                self._publish_status(now, force=True)
            else:
                self._publish_own(topic, payload)

    def _publish_own(self, topic: str, payload: bytes) -> None:
        """Publish on one of the watched topics (retained), remembering it as its own."""
        self.own.published(topic, payload)
        self.link.publish(topic, payload, qos=1, retain=True)

    # ------------------------------------------------------------ rounds

    def _open_round(self, online: list[str], now: float) -> None:
        r = self.mode.open(round_id=self.next_round_id, version=self.model.version,
                           online=online, seed=self.s.seed, now=now)  # fmt: skip
        r.example_cap = self.guards.example_cap()
        bounds = self.guards.bounds(self.model.base_weights)
        self.intake.begin(r, self._new_rule(bounds))
        self.ledger.begin_round()
        self.intake.folded = 0
        self.journal.open_round(r.round_id, {**r.meta(), "rule": bounds})
        self._flush()  # durable before devices hear of it
        self._announce("open")
        log.info("round %d open (%s): version %d, %d selected of %d online, target %d, "
                 "deadline in %.0fs", r.round_id, self.mode.name, self.model.version,
                 len(r.selected), len(online), r.target, r.deadline - now)  # fmt: skip
        self._status_dirty = True

    def _declined(self, device: str, state: DeviceState) -> None:
        """A selected device is not ready: maybe select another (aggregator.eligibility)."""
        r = self.round
        assert r is not None
        changed, pick = decline(r, device, state.not_ready, seed=self.s.seed,
                                candidates=eligible(self.presence, self.train),
                                replace=self.mode.name == "sync",
                                max_selected=self.mode.policy.max_selected)  # fmt: skip
        if changed:
            self.ledger.counters["declined"] += 1
            log.info("round %d: %s declined (%s)%s", r.round_id, _shown(device),
                     _shown(state.not_ready), f"; selected {pick} instead" if pick else "")
            self.journal.open_round(r.round_id, {**(self.journal.round_meta(r.round_id) or {}),
                                                 **r.meta()})  # fmt: skip
            self._flush()  # durable before devices hear of the replacement
            if pick:
                self._announce("open")
            self._status_dirty = True

    def _announce(self, state: str, r: OpenRound | None = None) -> None:
        r = r or self.round
        assert r is not None
        msg = RoundAnnouncement(
            job=self.s.job, round_id=r.round_id, model_version=r.model_version, state=state,
            opened_at=r.opened_at, deadline=r.deadline, selected=tuple(sorted(r.selected)),
            target=r.target, min_devices=r.min_devices, train=self.train,
            codec=self.s.update_pipeline.name, max_update_bytes=self.s.update_budget_bytes,
            task=self.task.name, epoch=self.epoch, done=bool(self.done_reason),
        )  # fmt: skip
        topic = self.topics.round()
        self._publish_own(topic, encode_round(msg, sign=self.signer.for_topic(topic)))

    def _close_if_due(self, now: float) -> None:
        if self.round is None or self.mode.outcome(self.round, now) is None:
            return
        self._flush()  # updates still being decoded count only once folded in
        outcome = self.mode.outcome(self.round, now)
        if outcome is not None:
            self._close_round(outcome, now)

    def _close_round(self, outcome: str, now: float) -> None:
        self._flush()  # every update of the round durable and acknowledged first
        r, acc = self.intake.end()
        record = {**r.history_record(outcome, now), **self.ledger.round_stats()}
        record.update(personal_stats(record["participants"]))  # {} without personal models
        federated = self.fedeval.result(r.model_version)  # of the version the round began at
        record.update({"federated": federated} if federated else {})
        counters = self.ledger.counters
        if outcome != "abandoned":
            refused = self._advance(r, acc)
            if refused:  # the version stays; the round's updates are not folded in again
                outcome = "abandoned"
                record.update(outcome=outcome, reason=refused)
            else:
                record.update(version=self.model.version, **self.model.metrics,
                              **self.guards.account(self.ledger.participants,
                                                    example_cap=r.example_cap,
                                                    selected=len(r.selected)))  # fmt: skip
                counters["rounds_closed"] += 1
                log.info("round %d %s with %d updates%s: version %d, %s", r.round_id, outcome,
                         len(r.accepted), verdict_summary(record), self.model.version,
                         headline(self.model.metrics, federated))  # fmt: skip
        else:
            record["reason"] = (f"quorum_missed: {len(r.accepted)} of {r.min_devices} needed "
                                "updates arrived")  # fmt: skip
            log.warning("round %d abandoned: %d of %d needed updates arrived%s; keeping "
                        "version %d", r.round_id, len(r.accepted), r.min_devices,
                        verdict_summary(record), self.model.version)  # fmt: skip
        if outcome == "abandoned":
            counters["rounds_abandoned"] += 1
        # a last round says so: its devices learn that the job is done (done in the message)
        self.done_reason = done_reason(self.s, r.round_id, counters["rounds_closed"],
                                       accuracy_of(self.model.metrics, self.fedeval.latest()))
        self._announce("closed" if outcome != "abandoned" else "abandoned", r)
        self.store.append_round(record)
        self.recent.add(record)
        self.selector.observe(record, self.store.history)
        self.next_round_id = r.round_id + 1
        self.metrics.round_ended(self, record)
        self._save_state()  # the commit point: a restart now starts the next round
        self.journal.close_round(r.round_id)
        self.waiting_since = now
        self.last_selected = frozenset(r.selected)  # idle once this round is over
        self._publish_status(now, force=True)

    def _advance(self, r: OpenRound, acc: AggregationRule) -> str:
        """Make the round's mean the next version and publish it; "" when done, else the
        reason it was refused (the version stays: no input may stop the service)."""
        try:
            self.clientside.population = self.enrolled_count or len(self.presence.devices)
            mean = self.clientside.mean(acc, self.ledger.participants)
            weights = self.optimizer.step(self.model.base_weights, mean)
            self.model.advance(weights, round_id=r.round_id)
            self.optimizer.commit(self.model.version)  # its state, before state.json names it
            self.clientside.commit(self.model.version)
        except ModelRefused as err:
            self.ledger.counters["models_refused"] += 1
            log.warning("round %d abandoned: %s; keeping version %d",
                        r.round_id, err, self.model.version)  # fmt: skip
            return f"model_refused: {err}"
        except Exception as err:  # a bug of ours must not take the service down either
            self.ledger.counters["internal_errors"] += 1
            log.exception("round %d abandoned: making its version failed", r.round_id)
            return f"internal_error: {err.__class__.__name__}: {err}"
        self._publish_model()
        return ""

    def _publish_model(self) -> None:
        pub = self.model.publication(
            self.topics, limit=self.link.max_message_bytes, publish_onnx=self.s.publish_onnx,
            control=self.clientside.control_body(),
            sign=self.signer.for_topic(self.topics.global_manifest()), epoch=self.epoch,
        )  # fmt: skip
        for topic, payload in pub.messages:
            if topic == self.topics.global_manifest():
                self.own.published(topic, payload)
            self.link.publish(topic, payload, qos=1, retain=True)
        self.store.save_manifest(pub.version, pub.manifest)
        self.metrics.model_published(pub.nbytes)
        log.info("published version %d (%s): %d weight, %d onnx, %d delta chunks, %d bytes",
                 pub.version, self.model.downlink.name, *pub.chunks, pub.nbytes)  # fmt: skip

    # ------------------------------------------------------------ state and status

    def _resume(self) -> None:
        """Continue from the state directory: the committed version and round, and the
        open round from the journal if the service stopped in the middle of one. A state
        file that cannot be trusted is moved aside (counted, logged), never fatal."""
        state = self._load_state()
        version = state.get("version")
        self._load_model(None if version is None else int(version))
        self.next_round_id = int(state.get("next_round", 1))
        history = self.store.history()
        self.recent.extend(history)
        self.selector.rebuild(history)  # what selection learnt: from the history, no file
        # the lineage of this state directory: set once, so a fresh directory (round ids and
        # versions start over) announces a newer epoch that signed-downlink agents follow
        self.epoch = int(state.get("epoch") or time.time() * 1000)
        self.ledger.counters.update(state.get("counters", {}))
        self.guards.load_state(state)
        self.ledger.counters["quarantined_files"] += self.optimizer.resume(
            self.model.version, self.quarantine_dir) + self.clientside.resume(
            self.model.version, self.quarantine_dir)  # fmt: skip
        if state:
            log.info("resumed from %s: version %d, next round %d",
                     self.s.state_dir, self.model.version, self.next_round_id)  # fmt: skip
        self.journal.close_round(self.next_round_id - 1)  # what a crash left of closed rounds
        try:
            found = recover_round(journal=self.journal, ledger=self.ledger,
                                  round_id=self.next_round_id, version=self.model.version,
                                  specs=self.admission.specs, new_rule=self._new_rule,
                                  head=self.admission.head)  # fmt: skip
        except Exception as err:  # a poisoned snapshot or body: the round is lost, not us
            found = None
            self._quarantine_round(self.next_round_id, err)
        self._save_state()
        if found is not None:
            r, acc = found
            self.intake.begin(r, acc)
            # accepted since state.json was saved (not saved again: a second crash in this
            # round would count them twice)
            self.ledger.counters["accepted"] += len(r.accepted)
            log.info("resumed open round %d: %d of %d updates already counted",
                     r.round_id, len(r.accepted), r.target)  # fmt: skip

    @property
    def quarantine_dir(self) -> Path:
        """Where state files that cannot be trusted are moved on a restart."""
        return self.s.state_dir / "quarantine"

    def _load_state(self) -> dict[str, Any]:
        """state.json, checked; an unreadable one is moved aside and the next round id is
        taken from the history."""
        path = self.s.state_dir / "state.json"
        try:
            state = self.store.load_state() or {}
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            if state.get("version") is not None:
                int(state["version"])
            if int(state.get("next_round", 1)) < 1:
                raise ValueError("next_round below 1")
            counters = state.get("counters", {})
            if not isinstance(counters, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in counters.items()
            ):
                raise ValueError("counters must map names to integers")
            return state
        except (ValueError, TypeError, OSError) as err:
            moved = move_aside(path, self.quarantine_dir)
            self.ledger.counters["quarantined_files"] += 1
            rounds = [int(r["round"]) for r in self.store.history() if "round" in r]
            log.warning("state file %s cannot be trusted (%s): moved to %s; continuing from "
                        "the newest stored version", path, err, moved)  # fmt: skip
            return {"next_round": max(rounds, default=0) + 1}

    def _load_model(self, version: int | None) -> None:
        """The committed version; a stored version that does not load is moved aside and
        the newest one before it is taken (a state directory of another task is a
        configuration error and stays one)."""
        while True:
            try:
                self.model.load_or_init(version)
                return
            except StoredVersionError as err:
                moved = self.store.quarantine_version(err.version, self.quarantine_dir)
                self.ledger.counters["quarantined_files"] += len(moved)
                log.warning("stored version %d cannot be loaded (%s): moved %d files to %s",
                            err.version, err, len(moved), self.quarantine_dir)  # fmt: skip
                version = None

    def _quarantine_round(self, round_id: int, err: Exception) -> None:
        """Move a journalled round that cannot be recovered aside; it ends abandoned."""
        moved = self.journal.quarantine_round(round_id, self.quarantine_dir)
        self.ledger.begin_round()
        counters = self.ledger.counters
        counters["quarantined_files"] += len(moved)
        counters["rounds_abandoned"] += 1
        reason = f"quarantined: {err.__class__.__name__}: {err}"
        log.warning("round %d cannot be recovered from the journal (%s): moved %d files to "
                    "%s; the round is abandoned", round_id, err, len(moved),
                    self.quarantine_dir)  # fmt: skip
        now = time.time()
        self.store.append_round({
            "round": round_id, "outcome": "abandoned", "reason": reason,
            "base_version": self.model.version, "selected": [], "dropped": [], "accepted": 0,
            "opened_at": now, "closed_at": now, "wall_s": 0.0, "bytes_up": 0, "bytes_down": 0,
            "participants": [], "quarantined": [str(p) for p in moved],
        })  # fmt: skip
        self.next_round_id = round_id + 1

    def _save_state(self) -> None:
        self.store.save_state({"job": self.s.job, "task": self.task.name,
                               "version": self.model.version, "next_round": self.next_round_id,
                               "epoch": self.epoch,
                               "counters": dict(self.ledger.counters),
                               **self.guards.to_state()})  # fmt: skip

    def status(self, now: float) -> dict[str, Any]:
        """What the retained status topic says: readable by people and monitoring tools."""
        return status_of(settings=self.s, task=self.task.name, done_reason=self.done_reason,
                         version=self.model.version, metrics=self.model.metrics,
                         round_=self.round, presence=self.presence,
                         counters=self.ledger.counters, now=now,
                         signing_key=self.signer.key_id, online=self._online,
                         recent=self.recent.as_list(),
                         aggregation=self.aggregation_status(),
                         federated=self.fedeval.latest())  # fmt: skip

    def aggregation_status(self) -> dict[str, Any]:
        """The rule, the next norm bound, and the privacy spent so far (central DP)."""
        s = self.s
        return {"rule": s.rule, "norm_bound": self.guards.bounds(self.model.base_weights)["bound"],
                "max_examples": s.max_examples, "privacy": self.guards.privacy_status(),
                "selection": self.selector.status()}  # fmt: skip

    def _publish_status(self, now: float, *, force: bool = False) -> None:
        if not force and (not self._status_dirty or now - self._status_at < STATUS_EVERY_S):
            return
        body = json.dumps(self.status(now), indent=1).encode()
        self._publish_own(self.topics.status(), body)
        self._status_at, self._status_dirty = now, False


def _shown(text: str, limit: int = 96) -> str:
    """A peer's string as it goes into a log line: printable, and not too long."""
    short = text if len(text) <= limit else text[:limit] + "..."
    return short if short.isprintable() else ascii(short)


def _fleet(s: AggregatorSettings) -> FleetFile | None:
    """The fleet file's enrolment (ConfigError when it is another job's); None without one."""
    if s.fleet_file is None:
        return None
    fleet = read_fleet(s.fleet_file)
    if fleet.job != s.job:
        raise ConfigError(f"{s.fleet_file} is the fleet of job {fleet.job!r}, not {s.job!r}")
    return fleet

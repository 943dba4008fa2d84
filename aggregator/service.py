"""The aggregator service: one loop over MQTT events and timer ticks, over pure stages.

    admission (decode, authorise, validate)  -> aggregator.admission
    dedupe, verdicts, counters, round stats  -> aggregator.ledger (durable in the journal)
    the mode's rules (sync rounds / FedBuff) -> aggregator.modes
    the aggregation rule (running sum)       -> aggregator.fedavg.RunningSum
      or a robust rule, bounds, central DP   -> aggregator.robust, .bounds, .privacy
    the server optimiser on the mean delta   -> aggregator.fedavg.ServerSGD
    presence and dropouts                    -> aggregator.presence
    the status document                      -> aggregator.status

The loop takes every message waiting, handles each, then commits the journal once (one
fsync for the whole batch) and only then sends the acks and acknowledges the messages to
the broker. Anything a peer gets wrong is a ProtocolError: logged with the device and
reason, counted, answered with a rejection where there is an update id, and dropped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aggregator.admission import Admission
from aggregator.bounds import adaptive_bound
from aggregator.fedavg import AggregationRule, RunningSum, ServerSGD
from aggregator.globals import GlobalModel
from aggregator.intake import Intake
from aggregator.journal import Journal, Snapshot
from aggregator.ledger import Ledger
from aggregator.modes import BufferedRounds, Mode, SyncRounds
from aggregator.presence import Presence
from aggregator.privacy import PrivacySpent, noise_for_epsilon
from aggregator.recovery import recover_round
from aggregator.robust import make_rule, round_bound
from aggregator.rounds import OpenRound
from aggregator.settings import AggregatorSettings
from aggregator.status import status_of
from aggregator.store import Store
from fedmq.errors import ProtocolError, Unauthorized
from fedmq.fleetfile import read_fleet
from fedmq.link import Connected, Disconnected, Link, Message
from fedmq.tasks import Task, get_task
from fedmq.wire import (
    RoundAnnouncement,
    decode_metrics,
    decode_state,
    encode_ack,
    encode_round,
    encode_weights,
)

log = logging.getLogger("fedmq.aggregator")

TICK_S = 0.2
STATUS_EVERY_S = 1.0


class Aggregator:
    """Runs one job's rounds (synchronous FedAvg or FedBuff) against one broker."""

    def __init__(self, *, settings: AggregatorSettings, task: Task | None = None) -> None:
        s = self.s = settings
        self.topics = s.topics
        self.task = task or get_task(s.task)
        self.store = Store(root=s.state_dir, keep_versions=s.keep_versions)
        self.journal = Journal(root=s.state_dir)
        self.link = Link(
            client_id=f"fedmq-aggregator-{s.job}",
            address=s.broker,
            subscriptions=[(self.topics.updates_filter(), 1),
                           (self.topics.device_states_filter(), 1),
                           (self.topics.metrics_filter(), 0)],  # fmt: skip
            max_message_bytes=s.max_message_bytes,
            manual_ack=True,  # an update is acknowledged to the broker once it is durable
        )
        self.model = GlobalModel(task=self.task, store=self.store, seed=s.seed,
                                 downlink=s.downlink_pipeline,
                                 downlink_delta=s.downlink_delta_pipeline)  # fmt: skip
        self.mode: Mode = (BufferedRounds(policy=s.policy, buffer=s.buffer)
                           if s.mode == "async" else SyncRounds(policy=s.policy))  # fmt: skip
        fleet = read_fleet(s.fleet_file) if s.fleet_file is not None else None
        enrolled = {d.id: d.max_examples for d in fleet.devices.values()
                    if not d.revoked and d.max_examples is not None} if fleet else {}  # fmt: skip
        # devices a round could have sampled (q = selected / enrolled); 0: unknown
        self.enrolled_count = (sum(not d.revoked for d in fleet.devices.values())
                               if fleet else 0)  # fmt: skip
        self.admission = Admission(specs=self.model.specs, max_update_bytes=s.max_update_bytes,
                                   budget_bytes=s.update_budget_bytes,
                                   max_examples=s.max_examples, enrolled=enrolled)  # fmt: skip
        self.median_norm = 0.0  # the median L2 norm of the last closed round's updates
        self.privacy = PrivacySpent(delta=s.dp_delta)
        self.noise_multiplier = s.dp_noise_multiplier or (noise_for_epsilon(
            epsilon=s.dp_epsilon, delta=s.dp_delta, rounds=s.rounds,
            q=self._sample_rate(self._expected_selected())) if s.dp_epsilon else 0.0)  # fmt: skip
        self.optimizer = ServerSGD(lr=s.server_lr)
        self.presence = Presence(job=s.job, grace_s=s.drop_grace_s)
        self.ledger = Ledger(journal=self.journal)
        self.intake = Intake(admission=self.admission, mode=self.mode, ledger=self.ledger,
                             max_message_bytes=s.max_message_bytes)  # fmt: skip
        self.device_metrics: dict[str, dict[str, float]] = {}
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
        return make_rule(specs=self.model.specs, rule=s.rule, bound=float(bounds.get("bound", 0)),
                         clip_norm=s.clip_norm, median_norm=float(bounds.get("median_norm", 0)),
                         noise_multiplier=self.noise_multiplier, trim=s.trim_fraction,
                         krum_f=s.krum_f, krum_m=s.krum_m)  # fmt: skip

    def _bounds(self) -> dict[str, float]:
        """The next round's norm bound: fixed, or k x the last round's median norm."""
        bound = round_bound(fixed=self.s.norm_bound, factor=self.s.norm_bound_factor,
                            median_norm=self.median_norm)  # fmt: skip
        return {"bound": bound, "median_norm": self.median_norm}

    def _expected_selected(self) -> int:
        p = self.s.policy
        n = self.enrolled_count or p.target
        return min(n, int(p.target * (1 + p.over_select) + 0.999999)) if p.target else n

    def _sample_rate(self, selected: int) -> float:
        """q = selected / enrolled; 1 without a fleet file (no amplification is claimed)."""
        if not self.enrolled_count or selected <= 0:
            return 1.0
        return min(1.0, selected / self.enrolled_count)

    # ------------------------------------------------------------ the loop

    def run(self, *, stop: Any = None, connect_timeout: float = 30.0) -> int:
        """Serve until the configured rounds or accuracy are reached (0) or stop is set (0)."""
        self._resume()
        self.link.start()
        if not self.link.wait_connected(connect_timeout):
            log.error("no broker at %s:%s after %.0fs", self.s.host, self.s.port, connect_timeout)
            self.link.stop()
            return 2
        log.info("connected to %s:%s (MQTT %s), job %s, task %s, %s mode, %d parameters",
                 self.s.host, self.s.port, self.s.mqtt_version, self.s.job, self.task.name,
                 self.mode.name, self.model.num_params)  # fmt: skip
        self.link.publish(self.topics.round(), b"", retain=True)  # no stale round from before
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
                    elif isinstance(event, Disconnected):
                        log.warning("broker connection lost (%s); reconnecting", event.reason)
                self._flush()
                self._tick(time.time())
        finally:
            self._flush()
            self._publish_status(time.time(), force=True)
            self.link.stop()
            self.journal.close()
            self.intake.close()
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

    def _tick(self, now: float) -> None:
        if self.round is None:
            self.presence.pending_drops.clear()
        else:
            for device in self.presence.due_drops(now, connected_at=self._connected_at):
                self.round.drop(device)
        self.ledger.counters["expired_partial_updates"] += self.intake.expire(now)
        self._close_if_due(now)
        # the next round opens in the same tick: no gap in which updates find none open
        if self.round is None and not self.done_reason:
            if self.s.rounds and self.next_round_id > self.s.rounds:
                self.done_reason = f"ran {self.next_round_id - 1} rounds"
            else:
                online = self.presence.trainers_online()
                waited = self.next_round_id > 1 or now - self.waiting_since >= self.s.start_wait_s
                if self.mode.policy.should_open(len(online), waited=waited):
                    self._open_round(online, now)
        self._publish_status(now)

    # ------------------------------------------------------------ messages

    def _on_message(self, msg: Message, now: float) -> None:
        kind = self.topics.kind_of(msg.topic)
        device = self.topics.device_of(msg.topic) or "?"
        try:
            if kind == "update":
                self.intake.on_chunk(device, msg.payload, now=now, version=self.model.version,
                                     next_round=self.next_round_id,
                                     trains=self.presence.trains)  # fmt: skip
                self._status_dirty = True
            elif kind == "state" and msg.payload:
                state = decode_state(msg.payload)
                if self.presence.observe(device, state, now):
                    level = logging.INFO if state.status == "offline" else logging.DEBUG
                    log.log(level, "device %s is %s", device, state.status)
                    self._status_dirty = True
                if self.round is not None and state.status != "offline":
                    self.round.rejoin(device)
            elif kind == "metrics":
                m = decode_metrics(msg.payload)
                if m.device != device:
                    raise Unauthorized(f"metrics for {m.device!r} on another device's topic")
                self.device_metrics[device] = m.metrics
        except ProtocolError as err:
            err.at(device=device, topic=msg.topic)
            self.ledger.counters[f"rejected_{err.reason_code}"] += 1
            log.warning("rejected message from %s on %s: %s", device, msg.topic, err.reason)
            self._status_dirty = True
        except Exception:  # a bug of ours must not take the service down: log it, go on
            self.ledger.counters["internal_errors"] += 1
            log.exception("failed to handle a message from %s on %s", device, msg.topic)

    # ------------------------------------------------------------ rounds

    def _open_round(self, online: list[str], now: float) -> None:
        r = self.mode.open(round_id=self.next_round_id, version=self.model.version,
                           online=online, seed=self.s.seed, now=now)  # fmt: skip
        bounds = self._bounds()
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

    def _announce(self, state: str, r: OpenRound | None = None) -> None:
        r = r or self.round
        assert r is not None
        msg = RoundAnnouncement(
            job=self.s.job, round_id=r.round_id, model_version=r.model_version, state=state,
            opened_at=r.opened_at, deadline=r.deadline, selected=tuple(sorted(r.selected)),
            target=r.target, min_devices=r.min_devices, train=self.s.train,
            codec=self.s.update_pipeline.name, max_update_bytes=self.s.update_budget_bytes,
        )  # fmt: skip
        self.link.publish(self.topics.round(), encode_round(msg), qos=1, retain=True)

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
        counters = self.ledger.counters
        if outcome == "abandoned":
            log.warning("round %d abandoned: %d of %d needed updates arrived; keeping version %d",
                        r.round_id, len(r.accepted), r.min_devices, self.model.version)  # fmt: skip
            counters["rounds_abandoned"] += 1
        else:
            weights = self.optimizer.step(self.model.base_weights, acc.mean())
            metrics = self.model.advance(weights, round_id=r.round_id)
            self._publish_model()
            record.update(version=self.model.version, **metrics, **self._account(r))
            counters["rounds_closed"] += 1
            log.info("round %d %s with %d updates: version %d, accuracy %.4f, loss %.4f",
                     r.round_id, outcome, len(r.accepted), self.model.version,
                     metrics["accuracy"], metrics["loss"])  # fmt: skip
        self._announce("closed" if outcome != "abandoned" else "abandoned", r)
        self.store.append_round(record)
        self.next_round_id = r.round_id + 1
        self._save_state()  # the commit point: a restart now starts the next round
        self.journal.close_round(r.round_id)
        self.waiting_since = now
        if self.s.rounds and r.round_id >= self.s.rounds:
            self.done_reason = f"ran {r.round_id} rounds"
        elif (self.s.target_accuracy and counters["rounds_closed"]
              and self.model.metrics.get("accuracy", 0.0) >= self.s.target_accuracy):  # fmt: skip
            self.done_reason = f"reached accuracy {self.model.metrics['accuracy']:.4f}"
        self._publish_status(now, force=True)

    def _account(self, r: OpenRound) -> dict[str, Any]:
        """After a round closed: the next adaptive bound and, with central DP, the privacy
        it spent; what the round's history line says of both."""
        norms = [float(p["l2"]) for p in self.ledger.participants if "l2" in p]
        self.median_norm = adaptive_bound(norms, 1.0) or self.median_norm
        out: dict[str, Any] = {"rule": self.s.rule, "median_l2": round(self.median_norm, 6)}
        if self.noise_multiplier:
            q = self._sample_rate(len(r.selected))
            eps = self.privacy.record(noise_multiplier=self.noise_multiplier, q=q)
            out.update(dp_epsilon=eps, dp_delta=self.s.dp_delta,
                       dp_noise_multiplier=self.noise_multiplier, dp_sample_rate=q)  # fmt: skip
        return out

    def _publish_model(self) -> None:
        pub = self.model.publication(self.topics, limit=self.link.max_message_bytes,
                                     publish_onnx=self.s.publish_onnx)  # fmt: skip
        for topic, payload in pub.messages:
            self.link.publish(topic, payload, qos=1, retain=True)
        self.store.save_manifest(pub.version, pub.manifest)
        log.info("published version %d (%s): %d weight, %d onnx, %d delta chunks, %d bytes",
                 pub.version, self.model.downlink.name, *pub.chunks, pub.nbytes)  # fmt: skip

    # ------------------------------------------------------------ state and status

    def _resume(self) -> None:
        """Continue from the state directory: the committed version and round, and the
        open round from the journal if the service stopped in the middle of one."""
        state = self.store.load_state() or {}
        version = state.get("version")
        self.model.load_or_init(None if version is None else int(version))
        self.next_round_id = int(state.get("next_round", 1))
        self.ledger.counters.update(state.get("counters", {}))
        self.median_norm = float(state.get("median_norm", 0.0))
        self.privacy = PrivacySpent.from_json(state.get("privacy"), delta=self.s.dp_delta)
        if state:
            log.info("resumed from %s: version %d, next round %d",
                     self.s.state_dir, self.model.version, self.next_round_id)  # fmt: skip
        self.journal.close_round(self.next_round_id - 1)  # what a crash left of closed rounds
        found = recover_round(journal=self.journal, ledger=self.ledger,
                              round_id=self.next_round_id, version=self.model.version,
                              specs=self.model.specs, new_rule=self._new_rule)  # fmt: skip
        self._save_state()
        if found is not None:
            r, acc = found
            self.intake.begin(r, acc)
            # accepted since state.json was saved (not saved again: a second crash in this
            # round would count them twice)
            self.ledger.counters["accepted"] += len(r.accepted)
            log.info("resumed open round %d: %d of %d updates already counted",
                     r.round_id, len(r.accepted), r.target)  # fmt: skip

    def _save_state(self) -> None:
        self.store.save_state({"job": self.s.job, "task": self.task.name,
                               "version": self.model.version, "next_round": self.next_round_id,
                               "counters": dict(self.ledger.counters),
                               "median_norm": self.median_norm,
                               "privacy": self.privacy.to_json()})  # fmt: skip

    def status(self, now: float) -> dict[str, Any]:
        """What the retained status topic says: readable by people and monitoring tools."""
        return status_of(settings=self.s, task=self.task.name, done_reason=self.done_reason,
                         version=self.model.version, metrics=self.model.metrics,
                         round_=self.round, presence=self.presence,
                         counters=self.ledger.counters, now=now,
                         aggregation=self.aggregation_status())  # fmt: skip

    def aggregation_status(self) -> dict[str, Any]:
        """The rule, the next norm bound, and the privacy spent so far (central DP)."""
        s = self.s
        out: dict[str, Any] = {"rule": s.rule, "norm_bound": self._bounds()["bound"],
                               "max_examples": s.max_examples, "privacy": None}  # fmt: skip
        if self.noise_multiplier:
            out["privacy"] = {"epsilon": self.privacy.epsilon, "delta": s.dp_delta,
                              "noise_multiplier": self.noise_multiplier,
                              "clip_norm": s.clip_norm, "rounds": self.privacy.rounds}  # fmt: skip
        return out

    def _publish_status(self, now: float, *, force: bool = False) -> None:
        if not force and (not self._status_dirty or now - self._status_at < STATUS_EVERY_S):
            return
        body = json.dumps(self.status(now), indent=1).encode()
        self.link.publish(self.topics.status(), body, qos=1, retain=True)
        self._status_at, self._status_dirty = now, False

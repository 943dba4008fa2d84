"""The aggregator service: one loop over MQTT events and timer ticks, over pure stages.

    admission (decode, authorise, validate)  -> aggregator.admission
    dedupe, verdicts, counters, round stats  -> aggregator.ledger (durable in the journal)
    the mode's rules (sync rounds / FedBuff) -> aggregator.modes
    the aggregation rule (running sum)       -> aggregator.fedavg.RunningSum
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
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from aggregator.admission import Admission
from aggregator.fedavg import RunningSum, ServerSGD
from aggregator.globals import GlobalModel
from aggregator.journal import Accepted, Journal, Snapshot
from aggregator.ledger import Ledger
from aggregator.modes import BufferedRounds, Contribution, Mode, SyncRounds
from aggregator.presence import Presence
from aggregator.recovery import recover_round
from aggregator.rounds import OpenRound
from aggregator.settings import AggregatorSettings
from aggregator.status import status_of
from aggregator.store import Store
from fedmq.chunks import Reassembler
from fedmq.codecs import Decoded
from fedmq.errors import ProtocolError, SchemaError, Unauthorized
from fedmq.link import Connected, Disconnected, Link, Message
from fedmq.tasks import Task, get_task
from fedmq.wire import (
    Ack,
    RoundAnnouncement,
    Update,
    decode_chunk,
    decode_metrics,
    decode_state,
    encode_ack,
    encode_round,
    encode_weights,
)

log = logging.getLogger("fedmq.aggregator")

TICK_S = 0.2
STATUS_EVERY_S = 1.0
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
MAX_PENDING = 4 * DECODE_THREADS  # decoded updates held before they are folded in

# an admitted update waiting for its tensors: (decoding, update, contribution, wire bytes)
Pending = tuple["Future[dict[str, Decoded]]", Update, Contribution, int]


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
        self.admission = Admission(specs=self.model.specs, max_update_bytes=s.max_update_bytes,
                                   budget_bytes=s.update_budget_bytes)  # fmt: skip
        self.optimizer = ServerSGD(lr=s.server_lr)
        self.reassembler = Reassembler(max_payload_bytes=s.max_update_bytes)
        self.presence = Presence(job=s.job)
        self.ledger = Ledger(journal=self.journal)
        self.device_metrics: dict[str, dict[str, float]] = {}
        self.round: OpenRound | None = None
        self.sum: RunningSum | None = None
        self.next_round_id = 1
        self.waiting_since = 0.0
        self.done_reason = ""
        # updates being decoded on worker threads (zstd and numpy let go of the GIL)
        self._pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
        self._pending: list[Pending] = []
        self._acks: list[tuple[str, Ack]] = []  # sent once the journal commits
        self._handled: list[Message] = []  # acknowledged to the broker after that
        self._since_snapshot = 0
        self._status_at, self._status_dirty = 0.0, True
        self._connections, self._connected_at = 0, 0.0

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
            self._pool.shutdown()
        log.info("stopped: %s", self.done_reason or "asked to stop")
        return 0

    def _flush(self) -> None:
        """Fold in what was decoded meanwhile, then group commit: make every staged verdict
        durable, then ack what it covers."""
        while self._pending:
            self._fold_next()
        self.journal.commit()
        for device, ack in self._acks:
            self.link.publish(self.topics.ack(device), encode_ack(ack), qos=1)
        for msg in self._handled:
            self.link.ack(msg)
        self._acks, self._handled = [], []
        acc = self.sum
        if self._since_snapshot >= self.s.snapshot_every and self.round and acc:
            snap = Snapshot(seq=self.journal.last_seq(), count=acc.count,
                            total_weight=acc.total_weight,
                            sums=encode_weights(acc.sums))  # fmt: skip
            self.journal.save_snapshot(self.round.round_id, snap)
            self._since_snapshot = 0

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
        self.reassembler.expire(now)
        if self.reassembler.expired:  # here or inside add()
            self.ledger.counters["expired_partial_updates"] += self.reassembler.expired
            self.reassembler.expired = 0
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
                self._on_update_chunk(device, msg.payload, now)
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

    def _on_update_chunk(self, device: str, payload: bytes, now: float) -> None:
        chunk = decode_chunk(payload, max_bytes=self.s.max_message_bytes + 4096)
        u: Update | None = None
        try:
            done = self.reassembler.add(chunk, source=device, now=now, wire_bytes=len(payload))
            if done is None:
                return
            u = self.admission.decode(done.payload, device=device, payload_id=chunk.payload_id)
            self._take_update(u, done.wire_bytes, now)
        except ProtocolError as err:
            self._refuse(device, chunk.payload_id, u.round_id if u is not None else -1, err)
        self._status_dirty = True

    def _refuse(self, device: str, update_id: str, round_id: int, err: ProtocolError) -> None:
        err.at(device=device, topic=self.topics.update(device))
        reason = f"{err.reason_code}: {err.reason}"
        self.ledger.verdict(update_id=update_id, device=device, round_id=round_id,
                            verdict="rejected", reason=reason,
                            counter=f"rejected_{err.reason_code}")  # fmt: skip
        log.warning("rejected update %s from %s: %s", update_id, device, err.reason)
        self._ack(device, Ack(update_id, round_id, "rejected", reason))

    def _take_update(self, u: Update, wire_bytes: int, now: float) -> None:
        counted = self.ledger.counted_in(u.update_id)
        if counted is None and self.round is not None and u.update_id in self.round.accepted:
            counted = self.round.round_id  # a copy of one still being folded in
        if counted is not None:
            # a redelivery, or a resend after a restart: counted once, acknowledged again so
            # the device can forget it
            self.ledger.verdict(update_id=u.update_id, device=u.device, round_id=u.round_id,
                                verdict="duplicate", reason=f"counted in round {counted}",
                                counter="duplicates")  # fmt: skip
            log.info("update %s from %s was already counted; acknowledged again",
                     u.update_id, u.device)  # fmt: skip
            reason = f"duplicate: already counted in round {counted}"
            self._ack(u.device, Ack(u.update_id, u.round_id, "accepted", reason))
            return
        r, acc = self.round, self.sum
        if r is None or acc is None:
            if u.round_id >= self.next_round_id:
                raise SchemaError(f"no round is open (update for round {u.round_id})")
            given = None
        else:
            given = self.mode.judge(r, u, version=self.model.version,
                                    trains=self.presence.trains(u.device), now=now)  # fmt: skip
        if r is None or acc is None or given is None:
            self.ledger.verdict(update_id=u.update_id, device=u.device, round_id=u.round_id,
                                verdict="late", reason="round already closed")  # fmt: skip
            log.info("late update %s from %s for round %d", u.update_id, u.device, u.round_id)
            self._ack(u.device, Ack(u.update_id, u.round_id, "late", "round already closed"))
            return
        # counted now, so the mode's rules see it; its tensors are decoded on a worker thread
        # meanwhile and it is folded in, in arrival order, by the next _flush
        r.record(u.update_id, u.device)
        self._pending.append((self._pool.submit(self.admission.validate, u), u, given,
                              wire_bytes))  # fmt: skip
        while len(self._pending) > MAX_PENDING:  # memory: a few decoded updates at a time
            self._fold_next()

    def _fold_next(self) -> None:
        job = self._pending.pop(0)
        try:
            self._fold(job)
        except Exception:  # a bug of ours must not take the service down: log it, go on
            self.ledger.counters["internal_errors"] += 1
            log.exception("failed to fold in update %s from %s", job[1].update_id, job[1].device)

    def _fold(self, job: Pending) -> None:
        """Fold in an update whose tensors were decoded, or refuse it; stage its verdict."""
        future, u, given, wire_bytes = job
        r, acc = self.round, self.sum
        assert r is not None and acc is not None
        try:
            tensors = future.result()
        except Exception as err:
            r.forget(u.update_id)
            if not isinstance(err, ProtocolError):
                raise
            self._refuse(u.device, u.update_id, u.round_id, err)
            return
        acc.add(tensors, given.weight, norm=given.norm)
        record = {"device": u.device, "examples": u.num_examples, **given.record, **u.metrics}
        self.ledger.accept(Accepted(
            update_id=u.update_id, round_id=r.round_id, device=u.device, codec=u.codec,
            body=u.body, weight=given.weight, norm=given.norm, wire_bytes=wire_bytes,
            fetched_bytes=u.fetched_bytes, record=record))  # fmt: skip
        self._since_snapshot += 1
        log.info("accepted update %s from %s for round %d (%d examples, %d bytes) [%d/%d]",
                 u.update_id, u.device, r.round_id, u.num_examples, wire_bytes,
                 len(r.accepted), r.target)  # fmt: skip
        self._ack(u.device, Ack(u.update_id, u.round_id, "accepted"))

    def _ack(self, device: str, ack: Ack) -> None:
        try:
            self.topics.ack(device)
        except ValueError:
            return  # not a device id we could answer on
        self._acks.append((device, ack))

    # ------------------------------------------------------------ rounds

    def _open_round(self, online: list[str], now: float) -> None:
        self.round = r = self.mode.open(round_id=self.next_round_id, version=self.model.version,
                                        online=online, seed=self.s.seed, now=now)  # fmt: skip
        self.sum = RunningSum(specs=self.model.specs)
        self.ledger.begin_round()
        self._since_snapshot = 0
        self.journal.open_round(r.round_id, r.meta())
        self._flush()  # durable before devices hear of it
        self._announce("open")
        log.info("round %d open (%s): version %d, %d selected of %d online, target %d, "
                 "deadline in %.0fs", r.round_id, self.mode.name, self.model.version,
                 len(r.selected), len(online), r.target, r.deadline - now)  # fmt: skip
        self._status_dirty = True

    def _announce(self, state: str) -> None:
        r = self.round
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
        r, acc = self.round, self.sum
        assert r is not None and acc is not None
        self._flush()  # every update of the round durable and acknowledged first
        record: dict[str, Any] = {
            "round": r.round_id, "outcome": outcome, "base_version": r.model_version,
            "selected": sorted(r.selected), "dropped": sorted(r.dropped),
            "accepted": len(r.accepted), "opened_at": r.opened_at, "closed_at": now,
            "wall_s": round(now - r.opened_at, 3), **self.ledger.round_stats(),
        }  # fmt: skip
        counters = self.ledger.counters
        if outcome == "abandoned":
            log.warning("round %d abandoned: %d of %d needed updates arrived; keeping version %d",
                        r.round_id, len(r.accepted), r.min_devices, self.model.version)  # fmt: skip
            counters["rounds_abandoned"] += 1
        else:
            weights = self.optimizer.step(self.model.base_weights, acc.mean())
            metrics = self.model.advance(weights, round_id=r.round_id)
            self._publish_model()
            record.update(version=self.model.version, **metrics)
            counters["rounds_closed"] += 1
            log.info("round %d %s with %d updates: version %d, accuracy %.4f, loss %.4f",
                     r.round_id, outcome, len(r.accepted), self.model.version,
                     metrics["accuracy"], metrics["loss"])  # fmt: skip
        self._announce("closed" if outcome != "abandoned" else "abandoned")
        self.store.append_round(record)
        self.next_round_id = r.round_id + 1
        self.round, self.sum = None, None
        self._save_state()  # the commit point: a restart now starts the next round
        self.journal.close_round(r.round_id)
        self.waiting_since = now
        if self.s.rounds and r.round_id >= self.s.rounds:
            self.done_reason = f"ran {r.round_id} rounds"
        elif (self.s.target_accuracy and counters["rounds_closed"]
              and self.model.metrics.get("accuracy", 0.0) >= self.s.target_accuracy):  # fmt: skip
            self.done_reason = f"reached accuracy {self.model.metrics['accuracy']:.4f}"
        self._publish_status(now, force=True)

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
        if state:
            log.info("resumed from %s: version %d, next round %d",
                     self.s.state_dir, self.model.version, self.next_round_id)  # fmt: skip
        self.journal.close_round(self.next_round_id - 1)  # what a crash left of closed rounds
        found = recover_round(journal=self.journal, ledger=self.ledger,
                              round_id=self.next_round_id, version=self.model.version,
                              specs=self.model.specs)  # fmt: skip
        self._save_state()
        if found is not None:
            self.round, self.sum = found
            # accepted since state.json was saved (not saved again: a second crash in this
            # round would count them twice)
            self.ledger.counters["accepted"] += len(self.round.accepted)
            log.info("resumed open round %d: %d of %d updates already counted",
                     self.round.round_id, len(self.round.accepted), self.round.target)  # fmt: skip

    def _save_state(self) -> None:
        self.store.save_state({"job": self.s.job, "task": self.task.name,
                               "version": self.model.version, "next_round": self.next_round_id,
                               "counters": dict(self.ledger.counters)})  # fmt: skip

    def status(self, now: float) -> dict[str, Any]:
        """What the retained status topic says: readable by people and monitoring tools."""
        downlink_delta = self.model.downlink_delta
        codec = {"updates": self.s.update_pipeline.name,
                 "update_budget_bytes": self.s.update_budget_bytes,
                 "downlink": self.model.downlink.name,
                 "downlink_delta": downlink_delta.name if downlink_delta else ""}  # fmt: skip
        return status_of(job=self.s.job, task=self.task.name, mode=self.mode.name,
                         done_reason=self.done_reason, version=self.model.version,
                         metrics=self.model.metrics, round_=self.round, presence=self.presence,
                         counters=self.ledger.counters, codec=codec, now=now)  # fmt: skip

    def _publish_status(self, now: float, *, force: bool = False) -> None:
        if not force and (not self._status_dirty or now - self._status_at < STATUS_EVERY_S):
            return
        body = json.dumps(self.status(now), indent=1).encode()
        self.link.publish(self.topics.status(), body, qos=1, retain=True)
        self._status_at, self._status_dirty = now, False

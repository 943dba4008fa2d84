"""The aggregator service: one loop over MQTT events and timer ticks.

The shell decodes, calls the pure core (rounds, fedavg, chunks), encodes and publishes.
Anything a peer gets wrong is a ProtocolError: logged with the device and reason,
counted, answered with a rejection when there is an update id to answer, and dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from aggregator.checkpoint import decode_open_round, encode_open_round
from aggregator.fedavg import RunningSum, apply_delta
from aggregator.globals import GlobalModel
from aggregator.rounds import OpenRound, select_devices
from aggregator.settings import AggregatorSettings
from aggregator.store import Store
from fedmq import __version__
from fedmq.chunks import Reassembler
from fedmq.codecs import Decoded, decode_tensors
from fedmq.errors import ProtocolError, SchemaError, Unauthorized
from fedmq.link import Connected, Disconnected, Link, Message
from fedmq.tasks import Task, get_task
from fedmq.wire import (
    Ack,
    DeviceState,
    RoundAnnouncement,
    Update,
    decode_chunk,
    decode_metrics,
    decode_state,
    decode_update,
    encode_ack,
    encode_round,
)

log = logging.getLogger("fedmq.aggregator")

TICK_S = 0.2
STATUS_EVERY_S = 1.0
MAX_EXAMPLES_PER_UPDATE = 10_000_000
KEEP_COUNTED_IDS = 100_000
# an offline state counts as a dropout only after this long (and this long after our own
# reconnect): longer than a device's first reconnect after a broker restart
DROP_GRACE_S = 8.0


class Aggregator:
    """Runs synchronous FedAvg rounds for one job against one broker."""

    def __init__(self, *, settings: AggregatorSettings, task: Task | None = None) -> None:
        self.s = settings
        self.topics = settings.topics
        self.task = task or get_task(settings.task)
        self.store = Store(root=settings.state_dir)
        self.link = Link(
            client_id=f"fedmq-aggregator-{settings.job}",
            address=settings.broker,
            subscriptions=[
                (self.topics.updates_filter(), 1),
                (self.topics.device_states_filter(), 1),
                (self.topics.metrics_filter(), 0),
            ],
            max_message_bytes=settings.max_message_bytes,
            manual_ack=True,  # an update is acknowledged to the broker once it is handled
        )
        self.model = GlobalModel(
            task=self.task,
            store=self.store,
            seed=settings.seed,
            downlink=settings.downlink_pipeline,
            downlink_delta=settings.downlink_delta_pipeline,
        )
        self.buffer = settings.buffer
        self.reassembler = Reassembler(max_payload_bytes=settings.max_update_bytes)
        self.counters: Counter[str] = Counter()
        self.devices: dict[str, DeviceState] = {}
        self.device_metrics: dict[str, dict[str, float]] = {}
        self.round: OpenRound | None = None
        self.sum: RunningSum | None = None
        self.round_stats: dict[str, Any] = {}
        self.payload_bytes: dict[tuple[str, str], int] = {}
        self.counted_ids: dict[str, int] = {}  # update id -> round, insertion ordered
        self.next_round_id = 1
        self.waiting_since = 0.0
        self.done_reason = ""
        self._status_at = 0.0
        self._connections = 0
        self._connected_at = 0.0
        self.pending_drops: dict[str, float] = {}  # device -> when its Will arrived
        self._status_dirty = True

    # ------------------------------------------------------------ the loop

    def run(self, *, stop: Any = None, connect_timeout: float = 30.0) -> int:
        """Serve until the configured rounds or accuracy are reached (0) or stop is set (0)."""
        self._resume()
        self.link.start()
        if not self.link.wait_connected(connect_timeout):
            log.error("no broker at %s:%s after %.0fs", self.s.host, self.s.port, connect_timeout)
            self.link.stop()
            return 2
        log.info(
            "connected to %s:%s (MQTT %s), job %s, task %s, %d parameters",
            self.s.host, self.s.port, self.s.mqtt_version, self.s.job, self.task.name,
            self.model.num_params,
        )  # fmt: skip
        self.link.publish(self.topics.round(), b"", retain=True)  # no stale round from before
        self.model.publish(self.link, self.topics, publish_onnx=self.s.publish_onnx)
        if self.round is not None:
            self._announce("open")  # the resumed round, exactly as first announced
        self.waiting_since = time.time()
        try:
            while not self.done_reason and not (stop is not None and stop.is_set()):
                event = self.link.next_event(TICK_S)
                now = time.time()
                if isinstance(event, Message):
                    self._on_message(event, now)
                    self.link.ack(event)
                elif isinstance(event, Connected):
                    self._on_reconnected(event)
                elif isinstance(event, Disconnected):
                    log.warning("broker connection lost (%s); reconnecting", event.reason)
                self._tick(now)
        finally:
            self._publish_status(time.time(), force=True)
            self.link.stop()
        log.info("stopped: %s", self.done_reason or "asked to stop")
        return 0

    def _buffer_outcome(self, now: float) -> str | None:
        """Async: flush when the buffer holds its target, or at its age limit if it holds
        anything; an empty buffer at its age limit is abandoned and announced afresh."""
        assert self.round is not None
        got = len(self.round.accepted)
        if got >= self.round.target:
            return "buffered"
        if now >= self.round.deadline:
            return "buffered" if got else "abandoned"
        return None

    def _on_reconnected(self, event: Connected) -> None:
        log.info("broker connection up (session present: %s)", event.session_present)
        self._connections += 1
        self._connected_at = time.time()
        if self._connections == 1:  # the first: run() published everything
            return
        # a broker killed between autosaves restores an old session and old retained
        # messages, so session_present says nothing: publish the model and round again
        self.model.publish(self.link, self.topics, publish_onnx=self.s.publish_onnx)
        if self.round is not None:
            self._announce("open")
        self._publish_status(time.time(), force=True)

    def _tick(self, now: float) -> None:
        for device, since in list(self.pending_drops.items()):
            if self.round is None:
                self.pending_drops.clear()
            elif now - max(since, self._connected_at) >= DROP_GRACE_S:
                del self.pending_drops[device]
                self.round.drop(device)
        for key in self.reassembler.expire(now):
            self.counters["expired_partial_updates"] += 1
            self.payload_bytes.pop(key, None)
        if self.round is not None:
            if self.s.mode == "async":
                outcome = self._buffer_outcome(now)
            else:
                outcome = self.round.outcome(now)
            if outcome is not None:
                self._close_round(outcome, now)
        # the next round opens in the same tick: no gap in which updates find none open
        if self.round is None and not self.done_reason:
            if self.s.rounds and self.next_round_id > self.s.rounds:
                self.done_reason = f"ran {self.next_round_id - 1} rounds"
            else:
                self._maybe_open(now)
        self._publish_status(now)

    def _maybe_open(self, now: float) -> None:
        online = self._online()
        policy = self.s.policy
        # the first round waits up to start_wait_s for the fleet to come online; with
        # devices_per_round = 0 ("all online") that wait is the only way to know it has
        waited = self.next_round_id > 1 or now - self.waiting_since >= self.s.start_wait_s
        full = policy.ready(len(online)) and (policy.target > 0 or waited)
        if full or (waited and len(online) >= policy.min_devices):
            self._open_round(online, now)

    # ------------------------------------------------------------ messages

    def _on_message(self, msg: Message, now: float) -> None:
        kind = self.topics.kind_of(msg.topic)
        device = self.topics.device_of(msg.topic) or "?"
        try:
            if kind == "update":
                self._on_update_chunk(device, msg.payload, now)
            elif kind == "state" and msg.payload:
                self._on_state(device, msg.payload, now)
            elif kind == "metrics":
                m = decode_metrics(msg.payload)
                if m.device != device:
                    raise Unauthorized(f"metrics for {m.device!r} on another device's topic")
                self.device_metrics[device] = m.metrics
        except ProtocolError as err:
            err.at(device=device, topic=msg.topic)
            self.counters[f"rejected_{err.reason_code}"] += 1
            log.warning("rejected message from %s on %s: %s", device, msg.topic, err.reason)
            self._status_dirty = True
        except Exception:  # a bug of ours must not take the service down: log it, go on
            self.counters["internal_errors"] += 1
            log.exception("failed to handle a message from %s on %s", device, msg.topic)

    def _on_state(self, device: str, payload: bytes, now: float) -> None:
        state = decode_state(payload)
        if state.device != device:
            raise Unauthorized(f"state for {state.device!r} published on another device's topic")
        if state.job != self.s.job:
            self.devices.pop(device, None)  # a device of another job (or one that moved on)
            return
        before = self.devices.get(device)
        self.devices[device] = state
        if before is None or before.status != state.status:
            log.info("device %s is %s", device, state.status)
            self._status_dirty = True
        if self.round is not None:
            if state.status == "offline":
                # a Will may be a broker restart, not a dead device (Mosquitto publishes every
                # client's Will when it shuts down): count it as a dropout after a grace
                self.pending_drops.setdefault(device, now)
            else:
                self.pending_drops.pop(device, None)
                self.round.rejoin(device)

    def _on_update_chunk(self, device: str, payload: bytes, now: float) -> None:
        chunk = decode_chunk(payload, max_bytes=self.s.max_message_bytes + 4096)
        key = (device, chunk.payload_id)
        self.payload_bytes[key] = self.payload_bytes.get(key, 0) + len(payload)
        try:
            done = self.reassembler.add(chunk, source=device, now=now)
        except ProtocolError as err:
            self.payload_bytes.pop(key, None)
            self._reject(device, chunk.payload_id, -1, err)
            return
        if done is None:
            return
        nbytes = self.payload_bytes.pop(key, len(payload))
        try:
            update = decode_update(done.payload, max_bytes=self.s.max_update_bytes)
        except ProtocolError as err:
            self._reject(device, chunk.payload_id, -1, err)
            return
        if update.device != device or update.update_id != chunk.payload_id:
            claim = f"update claims device {update.device!r} / id {update.update_id}"
            self._reject(device, chunk.payload_id, update.round_id, Unauthorized(claim))
            return
        budget = self.s.update_budget_bytes
        if budget and len(done.payload) > budget:
            size = len(done.payload)
            over = SchemaError(f"update of {size} bytes is over the round's {budget}-byte budget")
            self._reject(device, update.update_id, update.round_id, over)
            return
        try:
            self._take_update(update, nbytes, now)
        except ProtocolError as err:
            self._reject(device, update.update_id, update.round_id, err)

    def _reject(self, device: str, update_id: str, round_id: int, err: ProtocolError) -> None:
        err.at(device=device, topic=self.topics.update(device))
        self.counters[f"rejected_{err.reason_code}"] += 1
        log.warning("rejected update %s from %s: %s", update_id, device, err.reason)
        self._ack(device, Ack(update_id, round_id, "rejected", f"{err.reason_code}: {err.reason}"))

    def _take_update(self, u: Update, nbytes: int, now: float) -> None:
        if u.update_id in self.counted_ids:
            # a redelivery, or a resend after a restart: counted once, acknowledged again so
            # the device can forget it
            self.counters["duplicates"] += 1
            log.info("update %s from %s was already counted; acknowledged again",
                     u.update_id, u.device)  # fmt: skip
            reason = f"duplicate: already counted in round {self.counted_ids[u.update_id]}"
            self._ack(u.device, Ack(u.update_id, u.round_id, "accepted", reason))
            return
        if self.s.mode == "async" and self.round is not None and self.sum is not None:
            self._take_async(u, nbytes)
            return
        if self.round is None or self.sum is None:
            if u.round_id < self.next_round_id:
                self._late(u)
                return
            raise SchemaError(f"no round is open (update for round {u.round_id})")
        verdict = self.round.judge(
            update_id=u.update_id,
            device=u.device,
            round_id=u.round_id,
            base_version=u.base_version,
            now=now,
            counted_ids=self.counted_ids,
        )
        if verdict == "late":
            self._late(u)
            return
        tensors = self._validate(u)
        self.sum.add(tensors, float(u.num_examples))
        self.round.record(u.device, u.update_id)
        self._count(u, nbytes)

    def _take_async(self, u: Update, nbytes: int) -> None:
        """FedBuff: any training device of this job, any recent base version."""
        assert self.round is not None and self.sum is not None
        state = self.devices.get(u.device)
        if state is not None and not state.trains:  # unknown is fine: its state may follow
            raise Unauthorized("an inference-only device sent an update")
        s = self.buffer.staleness(
            current_version=self.model.version, base_version=u.base_version, device=u.device
        )
        tensors = self._validate(u)
        n = float(u.num_examples)
        self.sum.add(tensors, n * self.buffer.weight(s), norm=n)
        # one entry per update: in async mode a device may be in the buffer more than once
        self.round.record(u.update_id, u.update_id)
        self._count(u, nbytes, staleness=s)

    def _validate(self, u: Update) -> dict[str, Decoded]:
        """The update's tensors, decoded against the model; ProtocolError if anything is off.

        Any pipeline fedmq can decode is accepted (a device's budget may have made it
        sparser than announced); a sparse tensor stays sparse and is scattered into the sum.
        """
        if u.num_examples > MAX_EXAMPLES_PER_UPDATE:
            raise SchemaError(f"num_examples {u.num_examples} is implausible")
        return decode_tensors(u.body, u.codec, self.model.specs)

    def _count(self, u: Update, nbytes: int, **extra: Any) -> None:
        """Book an update folded into the sum: ids, stats, checkpoint, then the ack."""
        assert self.round is not None
        self.counted_ids[u.update_id] = u.round_id
        while len(self.counted_ids) > KEEP_COUNTED_IDS:
            self.counted_ids.pop(next(iter(self.counted_ids)))
        stats = self.round_stats
        stats["bytes_up"] += nbytes
        stats["bytes_down"] += u.fetched_bytes
        stats["participants"].append(
            {"device": u.device, "examples": u.num_examples, **extra, **u.metrics}
        )
        self.counters["accepted"] += 1
        self._checkpoint()  # before the ack: what a device saw accepted survives a crash
        self._status_dirty = True
        log.info(
            "accepted update %s from %s for round %d (%d examples, %d bytes) [%d/%d]",
            u.update_id, u.device, u.round_id, u.num_examples, nbytes,
            len(self.round.accepted), self.round.target,
        )  # fmt: skip
        self._ack(u.device, Ack(u.update_id, u.round_id, "accepted"))

    def _late(self, u: Update) -> None:
        self.counters["late"] += 1
        log.info("late update %s from %s for round %d", u.update_id, u.device, u.round_id)
        self._ack(u.device, Ack(u.update_id, u.round_id, "late", "round already closed"))

    def _ack(self, device: str, ack: Ack) -> None:
        try:
            topic = self.topics.ack(device)
        except ValueError:
            return  # not a device id we could answer on
        self.link.publish(topic, encode_ack(ack), qos=1)

    # ------------------------------------------------------------ rounds

    def _online(self) -> list[str]:
        """Devices that are online and train (inference-only devices are never selected)."""
        return sorted(d for d, s in self.devices.items() if s.status != "offline" and s.trains)

    def _open_round(self, online: list[str], now: float) -> None:
        policy = self.s.policy
        if self.s.mode == "async":
            # every free device trains on the newest version; K updates make a version (fewer
            # when fewer devices are online, or when the buffer reaches round_timeout_s)
            selected = tuple(online)
            target = min(self.s.buffer_size, len(online))
            deadline = now + policy.timeout_s
        else:
            target = policy.round_target(len(online))
            # seeded by (seed, round): the same selection whether or not the service restarted
            rng = np.random.default_rng([self.s.seed, self.next_round_id])
            selected = select_devices(
                online, target=target, over_select=policy.over_select, rng=rng
            )
            target = min(target, len(selected))
            deadline = now + policy.timeout_s
        self.round = OpenRound(
            round_id=self.next_round_id,
            model_version=self.model.version,
            selected=frozenset(selected),
            opened_at=now,
            deadline=deadline,
            target=target,
            min_devices=min(policy.min_devices, target),
        )
        self.sum = RunningSum(specs=self.model.specs)
        self.round_stats = {"bytes_up": 0, "bytes_down": 0, "participants": []}
        self._checkpoint()
        self._announce("open")
        log.info(
            "round %d open (%s): version %d, %d selected of %d online, target %d, "
            "deadline in %.0fs",
            self.round.round_id, self.s.mode, self.model.version, len(selected), len(online),
            target, deadline - now,
        )  # fmt: skip
        self._status_dirty = True

    def _announce(self, state: str) -> None:
        r = self.round
        assert r is not None
        msg = RoundAnnouncement(
            job=self.s.job,
            round_id=r.round_id,
            model_version=r.model_version,
            state=state,
            opened_at=r.opened_at,
            deadline=r.deadline,
            selected=tuple(sorted(r.selected)),
            target=r.target,
            min_devices=r.min_devices,
            train=self.s.train,
            codec=self.s.update_pipeline.name,
            max_update_bytes=self.s.update_budget_bytes,
        )
        self.link.publish(self.topics.round(), encode_round(msg), qos=1, retain=True)

    def _close_round(self, outcome: str, now: float) -> None:
        r, acc = self.round, self.sum
        assert r is not None and acc is not None
        record: dict[str, Any] = {
            "round": r.round_id,
            "outcome": outcome,
            "base_version": r.model_version,
            "selected": sorted(r.selected),
            "dropped": sorted(r.dropped),
            "accepted": len(r.accepted),
            "opened_at": r.opened_at,
            "closed_at": now,
            "wall_s": round(now - r.opened_at, 3),
            **self.round_stats,
        }
        if outcome == "abandoned":
            log.warning(
                "round %d abandoned: %d of %d needed updates arrived; keeping version %d",
                r.round_id, len(r.accepted), r.min_devices, self.model.version,
            )  # fmt: skip
            self.counters["rounds_abandoned"] += 1
        else:
            base = self.model.base_weights
            weights = apply_delta(base, acc.mean(), server_lr=self.s.server_lr)
            metrics = self.model.advance(weights, round_id=r.round_id)
            self.model.publish(self.link, self.topics, publish_onnx=self.s.publish_onnx)
            record.update(version=self.model.version, **metrics)
            self.counters["rounds_closed"] += 1
            log.info(
                "round %d %s with %d updates: version %d, accuracy %.4f, loss %.4f",
                r.round_id, outcome, len(r.accepted), self.model.version,
                metrics["accuracy"], metrics["loss"],
            )  # fmt: skip
        self._announce("closed" if outcome != "abandoned" else "abandoned")
        self.store.append_round(record)
        self.next_round_id = r.round_id + 1
        self.round, self.sum = None, None
        self._save_state()  # the commit point: a restart now starts the next round
        self.store.clear_open_round()
        self.waiting_since = now
        closed = self.counters["rounds_closed"]
        if self.s.rounds and r.round_id >= self.s.rounds:
            self.done_reason = f"ran {r.round_id} rounds"
        elif (
            self.s.target_accuracy
            and closed
            and self.model.metrics.get("accuracy", 0.0) >= self.s.target_accuracy
        ):
            self.done_reason = f"reached accuracy {self.model.metrics['accuracy']:.4f}"
        self._publish_status(now, force=True)

    # ------------------------------------------------------------ state and status

    def _resume(self) -> None:
        """Continue from the state directory: the committed version and round, and the
        open round with its running sum if the service stopped in the middle of one."""
        state = self.store.load_state() or {}
        version = state.get("version")
        self.model.load_or_init(None if version is None else int(version))
        self.next_round_id = int(state.get("next_round", 1))
        self.counted_ids = {str(k): int(v) for k, v in state.get("counted_ids", {}).items()}
        self.counters.update(state.get("counters", {}))
        if state:
            log.info(
                "resumed from %s: version %d, next round %d",
                self.s.state_dir, self.model.version, self.next_round_id,
            )  # fmt: skip
        blob = self.store.load_open_round()
        if blob is not None:
            r, acc, stats = decode_open_round(blob, specs=self.model.specs)
            if (r.round_id, r.model_version) == (self.next_round_id, self.model.version):
                self.round, self.sum, self.round_stats = r, acc, stats
                for update_id in r.accepted.values():
                    self.counted_ids[update_id] = r.round_id
                log.info(
                    "resumed open round %d: %d of %d updates already counted",
                    r.round_id, len(r.accepted), r.target,
                )  # fmt: skip
            else:  # a round whose close was already committed
                self.store.clear_open_round()
        self._save_state()

    def _checkpoint(self) -> None:
        assert self.round is not None and self.sum is not None
        self.store.save_open_round(encode_open_round(self.round, self.sum, self.round_stats))

    def _save_state(self) -> None:
        self.store.save_state(
            {
                "job": self.s.job,
                "task": self.task.name,
                "version": self.model.version,
                "next_round": self.next_round_id,
                "counted_ids": self.counted_ids,
                "counters": dict(self.counters),
            }
        )

    def status(self, now: float) -> dict[str, Any]:
        """What the retained status topic says: readable by people and monitoring tools."""
        r = self.round
        if self.done_reason:
            phase = "done"
        elif r is not None:
            phase = "training"
        else:
            phase = "waiting for devices"
        trainers = self._online()
        online = [d for d, s in self.devices.items() if s.status != "offline"]
        return {
            "job": self.s.job,
            "task": self.task.name,
            "phase": phase,
            "done_reason": self.done_reason,
            "model_version": self.model.version,
            "accuracy": self.model.metrics.get("accuracy"),
            "loss": self.model.metrics.get("loss"),
            "rounds_closed": self.counters["rounds_closed"],
            "codec": {
                "updates": self.s.update_pipeline.name,
                "update_budget_bytes": self.s.update_budget_bytes,
                "downlink": self.model.downlink.name,
                "downlink_delta": self.model.downlink_delta.name
                if self.model.downlink_delta
                else "",
            },
            "round": None
            if r is None
            else {
                "id": r.round_id,
                "selected": len(r.selected),
                "received": len(r.accepted),
                "target": r.target,
                "dropped": sorted(r.dropped),
                "deadline_in_s": round(max(0.0, r.deadline - now), 1),
            },
            "devices": {
                "online": len(online),
                "trainers_online": len(trainers),
                "known": len(self.devices),
            },
            "counters": dict(sorted(self.counters.items())),
            "aggregator_version": __version__,
            "updated_at": round(now, 3),
        }

    def _publish_status(self, now: float, *, force: bool = False) -> None:
        if not force and (not self._status_dirty or now - self._status_at < STATUS_EVERY_S):
            return
        body = json.dumps(self.status(now), indent=1).encode()
        self.link.publish(self.topics.status(), body, qos=1, retain=True)
        self._status_at, self._status_dirty = now, False

"""Intake: update chunks in, verdicts out, for the round (or buffer) being filled.

    chunk -> Reassembler -> Admission.decode -> dedupe (Ledger) -> Mode.judge
          -> Admission.validate on a worker thread -> fold into the sum, in arrival order
          -> a verdict in the ledger and an ack waiting for the next commit

No sockets and no clock: the service passes `now` and sends the acks once the journal
has committed what they answer. Tensors are decoded on worker threads (zstd and numpy
let go of the GIL) while the caller goes on; they are folded in, in the order the
updates arrived, by `drain()`, or as soon as more than `max_pending` wait, so at most
that many decoded updates are held in memory (the ledger records every verdict; the log
says only what went wrong, so it does not grow by a line per update).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from aggregator.admission import Admission
from aggregator.fedavg import AggregationRule, Prepared
from aggregator.journal import Accepted
from aggregator.ledger import Ledger
from aggregator.modes import Contribution, Mode
from aggregator.rounds import OpenRound
from fedmq.chunks import Reassembler
from fedmq.errors import ProtocolError, SchemaError
from fedmq.wire import Ack, Update, decode_chunk

log = logging.getLogger("fedmq.aggregator")

DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
MAX_UNACKED_TIMES = 10_000  # receive times kept for acks still to go out (ack_delays)

# an admitted update waiting for its tensors: (decoding, update, contribution, wire bytes)
Pending = tuple["Future[Prepared]", Update, Contribution, int]


class Intake:
    """Turns update chunks into verdicts for the open round (or buffer), if any."""

    def __init__(self, *, admission: Admission, mode: Mode, ledger: Ledger,
                 max_message_bytes: int, threads: int = DECODE_THREADS,
                 max_partial_per_device: int = 4,
                 weigh: Callable[[Contribution, Update], Contribution] | None = None,
                 ) -> None:  # fmt: skip
        self.admission = admission
        self.mode = mode
        self.ledger = ledger
        self.weigh = weigh  # e.g. FedNova's weight / tau_i (aggregator.clientside)
        self.max_chunk_bytes = max_message_bytes + 4096
        self.reassembler = Reassembler(max_payload_bytes=admission.max_update_bytes,
                                       max_open_per_source=max_partial_per_device)  # fmt: skip
        self.round: OpenRound | None = None
        self.sum: AggregationRule | None = None
        self.acks: list[tuple[str, Ack]] = []  # answers waiting for the journal commit
        self.folded = 0  # updates folded into the sum since the counter was last reset
        self.max_pending = 2 * threads
        self.bytes_received = 0  # every update chunk's bytes, refused ones too (metrics)
        # when each update's last chunk was taken, until its ack goes out (ack_delays)
        self.received_at: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._pending: list[Pending] = []

    def begin(self, r: OpenRound, acc: AggregationRule) -> None:
        """Fill this round (or buffer) from now on."""
        self.round, self.sum = r, acc

    def end(self) -> tuple[OpenRound, AggregationRule]:
        """Stop filling the round; every update it counted is folded in."""
        self.drain()
        r, acc = self.round, self.sum
        assert r is not None and acc is not None
        self.round, self.sum = None, None
        return r, acc

    def on_chunk(self, device: str, payload: bytes, *, now: float, version: int,
                 next_round: int, trains: Callable[[str], bool | None]) -> None:  # fmt: skip
        """Take one chunk of an update from device's topic; ProtocolError for a chunk that
        cannot be read at all (there is no update id to answer) or whose topic names a
        device that may not send (an invalid id; one the fleet file does not enrol)."""
        self.bytes_received += len(payload)
        device = self.admission.sender(device)
        chunk = decode_chunk(payload, max_bytes=self.max_chunk_bytes)
        u: Update | None = None
        try:
            evicted = self.reassembler.evicted
            done = self.reassembler.add(chunk, source=device, now=now, wire_bytes=len(payload))
            if self.reassembler.evicted > evicted:
                n = self.reassembler.evicted - evicted
                self.ledger.counters["evicted_partial_updates"] += n
                log.warning("%d partial update(s) dropped to make room for %s's payload %s "
                            "(reassembly quotas)", n, device, chunk.payload_id)  # fmt: skip
            if done is None:
                return
            self._received(chunk.payload_id, now)
            u = self.admission.decode(done.payload, device=device, payload_id=chunk.payload_id)
            self._take(u, done.wire_bytes, now=now, version=version, next_round=next_round,
                       trains=trains(u.device))  # fmt: skip
        except ProtocolError as err:
            self._received(chunk.payload_id, now)
            self._refuse(device, chunk.payload_id, u.round_id if u is not None else -1, err)

    def drain(self) -> None:
        """Fold in every update decoded meanwhile, in the order they arrived."""
        while self._pending:
            self._fold_next()

    def expire(self, now: float) -> int:
        """Drop partial payloads past their age; how many were dropped since last asked."""
        self.reassembler.expire(now)
        n, self.reassembler.expired = self.reassembler.expired, 0
        return n

    def ack_delays(self, acks: list[tuple[str, Ack]], now: float) -> list[float]:
        """Seconds from each acked update's last chunk to now, when its ack goes out."""
        return [now - t for _, a in acks
                if (t := self.received_at.pop(a.update_id, None)) is not None]  # fmt: skip

    def _received(self, update_id: str, now: float) -> None:
        self.received_at.setdefault(update_id, now)
        if len(self.received_at) > MAX_UNACKED_TIMES:  # an update a bug of ours never acked
            self.received_at.pop(next(iter(self.received_at)))

    def close(self) -> None:
        """Stop the decoding threads."""
        self._pool.shutdown()

    # ------------------------------------------------------------ the verdicts

    def _take(self, u: Update, wire_bytes: int, *, now: float, version: int, next_round: int,
              trains: bool | None) -> None:  # fmt: skip
        r = self.round
        counted = self.ledger.counted_in(u.update_id)
        if counted is None and r is not None and u.update_id in r.accepted:
            counted = r.round_id  # a copy of one still being folded in
        if counted is not None:
            # a redelivery, or a resend after a restart: counted once, acknowledged again so
            # the device can forget it
            self.ledger.verdict(update_id=u.update_id, device=u.device, round_id=u.round_id,
                                verdict="duplicate", reason=f"counted in round {counted}",
                                counter="duplicates")  # fmt: skip
            log.debug("update %s from %s was already counted; acknowledged again",
                     u.update_id, u.device)  # fmt: skip
            self._ack(u.device, Ack(u.update_id, u.round_id, "accepted",
                                    f"duplicate: already counted in round {counted}"))  # fmt: skip
            return
        if r is None and u.round_id >= next_round:
            raise SchemaError(f"no round is open (update for round {u.round_id})")
        claimed = u.num_examples
        u = self.admission.cap_examples(u, round_cap=r.example_cap if r is not None else 0)
        given = None if r is None else self.mode.judge(r, u, version=version, trains=trains,
                                                       now=now)  # fmt: skip
        if given is not None and u.num_examples < claimed:
            self.ledger.counters["examples_capped"] += 1
            given = dataclasses.replace(given, record={**given.record,
                                                       "examples_claimed": claimed})  # fmt: skip
        if r is not None and given is not None:  # its round-trip time (selection policies)
            given = dataclasses.replace(given, record={
                **given.record, "arrived_s": round(max(0.0, now - r.opened_at), 3)})  # fmt: skip
        if given is not None and self.weigh is not None:
            given = self.weigh(given, u)  # a ProtocolError here refuses the update
        if r is None or given is None:
            self.ledger.verdict(update_id=u.update_id, device=u.device, round_id=u.round_id,
                                verdict="late", reason="round already closed")  # fmt: skip
            log.debug("late update %s from %s for round %d", u.update_id, u.device, u.round_id)
            self._ack(u.device, Ack(u.update_id, u.round_id, "late", "round already closed"))
            return
        # counted now, so the mode's rules see it; folded in once its tensors are decoded
        r.record(u.update_id, u.device)
        assert self.sum is not None
        future = self._pool.submit(self._decode, self.sum, u, given)
        self._pending.append((future, u, given, wire_bytes))
        while len(self._pending) > self.max_pending:
            self._fold_next()

    def _decode(self, acc: AggregationRule, u: Update, given: Contribution) -> Prepared:
        """On a worker thread: the update's tensors, checked and weighted (prepare reads no
        state of the sum, so the loop may go on adding to it meanwhile)."""
        return acc.prepare(self.admission.validate(u), given.weight, norm=given.norm)

    def _fold_next(self) -> None:
        job = self._pending.pop(0)
        try:
            self._fold(job)
        except Exception:  # a bug of ours must not take the service down: log it, go on
            self.ledger.counters["internal_errors"] += 1
            log.exception("failed to fold in update %s from %s", job[1].update_id, job[1].device)

    def _fold(self, job: Pending) -> None:
        future, u, given, wire_bytes = job
        r, acc = self.round, self.sum
        assert r is not None and acc is not None
        try:
            prepared = future.result()
        except Exception as err:
            r.forget(u.update_id)
            if not isinstance(err, ProtocolError):
                raise
            self._refuse(u.device, u.update_id, u.round_id, err)
            return
        acc.add_prepared(prepared)
        # the device's own metrics under their own key: they cannot overwrite bookkeeping
        record = {**given.record, "device": u.device, "examples": u.num_examples,
                  "metrics": dict(u.metrics)}  # fmt: skip
        # the norm as sent (the next adaptive bound is k x the round's median of these)
        record["l2"] = prepared.l2
        if prepared.clipped:
            record["clipped"] = True
            self.ledger.counters["clipped"] += 1
        self.ledger.accept(Accepted(
            update_id=u.update_id, round_id=r.round_id, device=u.device, codec=u.codec,
            body=u.body, weight=given.weight, norm=given.norm, wire_bytes=wire_bytes,
            fetched_bytes=u.fetched_bytes, record=record))  # fmt: skip
        self.folded += 1
        log.debug("accepted update %s from %s for round %d (%d examples, %d bytes) [%d/%d]",
                  u.update_id, u.device, r.round_id, u.num_examples, wire_bytes,
                  len(r.accepted), r.target)  # fmt: skip
        self._ack(u.device, Ack(u.update_id, u.round_id, "accepted"))

    def _refuse(self, device: str, update_id: str, round_id: int, err: ProtocolError) -> None:
        err.at(device=device)
        reason = f"{err.reason_code}: {err.reason}"
        self.ledger.verdict(update_id=update_id, device=device, round_id=round_id,
                            verdict="rejected", reason=reason,
                            counter=f"rejected_{err.reason_code}")  # fmt: skip
        log.warning("rejected update %s from %s: %s", update_id, device, err.reason)
        self._ack(device, Ack(update_id, round_id, "rejected", reason))

    def _ack(self, device: str, ack: Ack) -> None:
        self.acks.append((device, ack))

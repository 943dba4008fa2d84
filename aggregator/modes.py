"""The two ways an aggregator runs rounds, each owning its rules: when to open one, how to
judge an update, how much it weighs, when the round ends.

Pure code: the service passes `now`, the devices online and what it knows of a device.
Failures are data: dropouts and late arrivals come in as inputs and the mode decides
(complete, quorum at the deadline, abandon; or flush a buffer).

    SyncRounds      FedAvg rounds: over-selected devices, a target, a quorum, a deadline
    BufferedRounds  FedBuff: every free device trains on the newest version; each update
                    is weighted by its staleness; K updates make a version
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregator.fedbuff import BufferPolicy
from aggregator.rounds import OpenRound, RoundPolicy
from aggregator.selection import Candidates, Selector
from fedmq.errors import DuplicateUpdate, StaleUpdate, Unauthorized
from fedmq.wire import Update


@dataclass(frozen=True)
class Contribution:
    """How an admitted update enters the sum: weight, divisor share, and what to record."""

    weight: float
    norm: float
    record: dict[str, Any] = field(default_factory=dict)  # e.g. its staleness


class Mode(Protocol):
    """What the service asks of a mode."""

    @property
    def name(self) -> str:
        """'sync' or 'async'."""

    @property
    def policy(self) -> RoundPolicy:
        """Sizes, quorum and deadline (an async buffer's age limit)."""

    def open(self, *, round_id: int, version: int, online: Sequence[str], seed: int,
             now: float) -> OpenRound:  # fmt: skip
        """A new round (or buffer) among the online training devices."""

    def judge(self, r: OpenRound, u: Update, *, version: int, trains: bool | None,
              now: float) -> Contribution | None:  # fmt: skip
        """The update's contribution, None when it is late; ProtocolError when refused."""

    def outcome(self, r: OpenRound, now: float) -> str | None:
        """How the round ends ('complete', 'quorum', 'buffered', 'abandoned'), or None."""


@dataclass(frozen=True)
class SyncRounds:
    """Synchronous FedAvg rounds."""

    policy: RoundPolicy
    name: str = "sync"
    selection: Selector = field(default_factory=Selector)  # random unless configured

    def open(self, *, round_id: int, version: int, online: Sequence[str], seed: int,
             now: float) -> OpenRound:  # fmt: skip
        p = self.policy
        target = p.round_target(len(online))
        # seeded by (seed, round) and learnt from the history: the same selection whether
        # or not the service restarted
        selected = self.selection.select(Candidates(
            online=online, round_id=round_id, seed=seed, target=target,
            over_select=p.over_select, max_selected=p.max_selected))  # fmt: skip
        target = min(target, len(selected))
        return OpenRound(round_id=round_id, model_version=version, selected=frozenset(selected),
                         opened_at=now, deadline=now + p.timeout_s, target=target,
                         min_devices=min(p.min_devices, target))  # fmt: skip

    def judge(self, r: OpenRound, u: Update, *, version: int, trains: bool | None,
              now: float) -> Contribution | None:  # fmt: skip
        if u.round_id < r.round_id:
            return None
        if u.round_id > r.round_id:
            raise StaleUpdate(f"update is for round {u.round_id}, but round {r.round_id} is open")
        if u.device not in r.selected:
            raise Unauthorized(f"device was not selected for round {u.round_id}")
        if u.device in r.contributors:
            raise DuplicateUpdate(f"device already contributed to round {u.round_id}")
        if u.base_version != r.model_version:
            raise StaleUpdate(
                f"update trained on version {u.base_version}, round {u.round_id} uses "
                f"version {r.model_version}"
            )
        if now > r.deadline:
            return None
        n = float(u.num_examples)
        return Contribution(weight=n, norm=n)

    def outcome(self, r: OpenRound, now: float) -> str | None:
        got = len(r.accepted)
        if got >= r.target:
            return "complete"
        if now >= r.deadline or not r.waiting_for:
            return "quorum" if got >= r.min_devices else "abandoned"
        return None


@dataclass(frozen=True)
class BufferedRounds:
    """Asynchronous FedBuff: a buffer of K updates makes each version."""

    policy: RoundPolicy  # its timeout is the buffer's age limit
    buffer: BufferPolicy
    name: str = "async"
    selection: Selector = field(default_factory=Selector)

    def open(self, *, round_id: int, version: int, online: Sequence[str], seed: int,
             now: float) -> OpenRound:  # fmt: skip
        # every free device trains on the newest version; K updates make a version (fewer
        # when fewer devices are online, or when the buffer reaches its age limit); at most
        # max_selected of them, by the selection policy (seeded by (seed, round)), so the
        # message fits
        if len(online) > self.policy.max_selected:
            online = self.selection.select(Candidates(
                online=online, round_id=round_id, seed=seed,
                target=self.policy.max_selected))  # fmt: skip
        target = max(1, min(self.buffer.buffer_size, len(online)))
        return OpenRound(round_id=round_id, model_version=version, selected=frozenset(online),
                         opened_at=now, deadline=now + self.policy.timeout_s, target=target,
                         min_devices=1)  # fmt: skip

    def judge(self, r: OpenRound, u: Update, *, version: int, trains: bool | None,
              now: float) -> Contribution | None:  # fmt: skip
        # any training device of this job (unknown is fine: its state may follow; enrolment,
        # when a fleet file is set, was checked first), any recent base version; at most one
        # update per device per buffer, so no one id can fill a buffer
        if trains is False:
            raise Unauthorized("an inference-only device sent an update")
        if u.device in r.contributors:
            raise DuplicateUpdate(f"device already contributed to buffer {r.round_id}")
        s = self.buffer.staleness(current_version=version, base_version=u.base_version,
                                  device=u.device)  # fmt: skip
        n = float(u.num_examples)
        return Contribution(weight=n * self.buffer.weight(s), norm=n, record={"staleness": s})

    def outcome(self, r: OpenRound, now: float) -> str | None:
        # flush when the buffer holds its target, or at its age limit if it holds anything;
        # an empty buffer at its age limit is abandoned and announced afresh
        got = len(r.accepted)
        if got >= r.target:
            return "buffered"
        if now >= r.deadline:
            return "buffered" if got else "abandoned"
        return None

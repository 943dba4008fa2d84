"""Device selection: which online devices a round (or a capped async buffer) asks to train.

Pure code. A policy sees one `Candidates` (the online trainer devices, the round's target
and over-selection, the seed and round id) and a `Participation` table (per device: how
often it was selected and took part, the last round it was selected, its last reported
training loss and example count, its round-trip time from round open to update arrival);
it returns the selected ids, sorted.

    random   today's rule: ceil(target x (1 + over_select)) devices uniformly at random,
             seeded by (seed, round): bit for bit the selections fedmq always made
    utility  Oort-style (Lai et al., OSDI 2021): statistical utility |B| x loss, a staleness
             bonus, a penalty (T / t)^alpha for devices slower than the preferred round
             duration T, an exploration fraction among never-tried devices, and a fairness
             guard: a device skipped max_skip_rounds rounds is selected next

The table is rebuilt from the history (`Participation.from_history`): the same history
and the same online devices give the same selection, whether or not the aggregator
restarted in between, and there is no state file of its own. Every number in it came
from a device at some point, so it is clipped to a sane range before it weighs anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aggregator.rounds import select_devices

POLICIES = ("random", "utility")
MAX_LOSS = 100.0  # a reported training loss above this counts as this (cross-entropy ~2.3)
MAX_EXAMPLES = 1_000_000  # an example count above this counts as this
MAX_DURATION_S = 7 * 24 * 3600.0  # a round-trip time above this counts as this
UTILITY_PERCENTILE = 95.0  # statistical utilities are clipped at this percentile (Oort)
CUTOFF = 0.95  # exploitation samples among devices scoring >= CUTOFF x the k-th best score
MIN_DURATION_S = 1e-3
MAX_TRACKED = 100_000  # devices the table keeps; the longest unselected give way
MAX_STATUS_DEVICES = 1000  # devices whose counts the status document lists


@dataclass
class DeviceRecord:
    """What the aggregator learnt of one device from the rounds it was selected for."""

    selected: int = 0  # rounds it was selected for
    took_part: int = 0  # of those, rounds its update was accepted in
    last_selected: int = 0  # the last round it was selected for (0: never)
    loss: float | None = None  # its last reported training loss (clipped)
    examples: float = 0.0  # its last example count (clipped)
    duration_s: float | None = None  # its last round-trip time (a lower bound if it missed)

    @property
    def tried(self) -> bool:
        return self.selected > 0


def _stat_utility(d: DeviceRecord) -> float:
    """|B| x loss (Oort's |B| sqrt(mean loss^2), from the mean loss devices report); NaN
    for a device that never reported."""
    return d.examples * d.loss if d.loss is not None else math.nan


def _number(value: Any, lo: float, hi: float) -> float | None:
    """A finite number clipped to [lo, hi]; None for anything else (NaN, text, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return min(hi, max(lo, v)) if math.isfinite(v) else None


@dataclass
class Participation:
    """Per-device selection and participation, learnt from the rounds' history records.

    censor: a selected device that did not take part is known to need at least the
    round's wall time (sync rounds); async buffers select every free device, so missing
    one says nothing of a device's speed."""

    censor: bool = True
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    rounds: int = 0  # history records observed
    last_round: int = 0  # the newest round observed
    max_tracked: int = MAX_TRACKED

    @classmethod
    def from_history(cls, records: Iterable[Mapping[str, Any]], *, censor: bool = True,
                     max_tracked: int = MAX_TRACKED) -> Participation:  # fmt: skip
        """The table after these round records, oldest first (aggregator.store's history)."""
        table = cls(censor=censor, max_tracked=max_tracked)
        for record in records:
            table.observe(record)
        return table

    def observe(self, record: Mapping[str, Any]) -> None:
        """Take one closed round's history record; anything malformed in it is skipped."""
        try:
            round_id = int(record["round"])
            selected = [d for d in record.get("selected") or [] if isinstance(d, str)]
            parts = [p for p in record.get("participants") or [] if isinstance(p, Mapping)]
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        self.rounds += 1
        self.last_round = max(self.last_round, round_id)
        for device in selected:
            d = self._get(device)
            d.selected += 1
            d.last_selected = max(d.last_selected, round_id)
        took: set[str] = set()
        for p in parts:
            who = p.get("device")
            if not isinstance(who, str) or who in took:
                continue
            took.add(who)
            d = self._get(who)
            d.took_part += 1
            metrics = p.get("metrics")
            loss = _number(metrics.get("train_loss"), 0.0, MAX_LOSS) if isinstance(
                metrics, Mapping) else None  # fmt: skip
            if loss is not None:
                d.loss = loss
            examples = _number(p.get("examples"), 1.0, MAX_EXAMPLES)
            if examples is not None:
                d.examples = examples
            duration = _number(p.get("arrived_s"), MIN_DURATION_S, MAX_DURATION_S)
            if duration is not None:
                d.duration_s = duration
        wall = _number(record.get("wall_s"), MIN_DURATION_S, MAX_DURATION_S)
        if self.censor and wall is not None:
            for device in set(selected) - took:
                d = self.devices[device]
                d.duration_s = max(d.duration_s or 0.0, wall)
        if len(self.devices) > self.max_tracked:
            keep = sorted(self.devices, key=lambda k: (-self.devices[k].last_selected, k))
            self.devices = {k: self.devices[k] for k in keep[: self.max_tracked]}

    def _get(self, device: str) -> DeviceRecord:
        d = self.devices.get(device)
        if d is None:
            d = self.devices[device] = DeviceRecord()
        return d

    def status(self, *, limit: int = MAX_STATUS_DEVICES) -> dict[str, Any]:
        """Per-device counts for the status document: {device: {selected, took_part}}."""
        shown = sorted(self.devices)[:limit]
        return {"devices_tracked": len(self.devices),
                "participation": {k: {"selected": self.devices[k].selected,
                                      "took_part": self.devices[k].took_part}
                                  for k in shown}}  # fmt: skip


@dataclass(frozen=True)
class Candidates:
    """What a policy sees of one round: who is online, how many to pick, the seed."""

    online: Sequence[str]
    round_id: int
    seed: int
    target: int
    over_select: float = 0.0
    max_selected: int = 0  # 0: no cap

    @property
    def want(self) -> int:
        """ceil(target x (1 + over_select)) devices, at most the online ones and the cap."""
        n = min(len(self.online), math.ceil(self.target * (1.0 + self.over_select)))
        return min(n, self.max_selected) if self.max_selected else n


class SelectionPolicy(Protocol):
    """Chooses a round's devices."""

    @property
    def name(self) -> str:
        """'random' or 'utility'."""

    def select(self, c: Candidates, table: Participation) -> tuple[str, ...]:
        """The selected ids, sorted."""


@dataclass(frozen=True)
class RandomSelection:
    """Uniformly at random, seeded by (seed, round): fedmq's selection before policies."""

    name: str = "random"

    def select(self, c: Candidates, table: Participation) -> tuple[str, ...]:
        rng = np.random.default_rng([c.seed, c.round_id])
        return select_devices(c.online, target=c.target, over_select=c.over_select, rng=rng,
                              max_selected=c.max_selected)  # fmt: skip


@dataclass(frozen=True)
class UtilitySelection:
    """Oort-style utility-aware selection with exploration and a fairness guard."""

    exploration: float = 0.1  # fraction of the picks among never-tried devices
    round_s: float = 0.0  # preferred round duration T; 0: the median observed duration
    speed_alpha: float = 2.0  # slower devices weigh (T / t)^alpha
    max_skip_rounds: int = 0  # 0: 4 x ceil(online / picks)
    name: str = "utility"

    def __post_init__(self) -> None:
        if not 0 <= self.exploration <= 1:
            raise ValueError(f"selection_exploration must be in [0, 1], got {self.exploration}")
        if not 0 <= self.round_s <= MAX_DURATION_S:
            raise ValueError(f"selection_round_s must be 0 (the median observed duration) or "
                             f"positive seconds, got {self.round_s}")  # fmt: skip
        if not 0 <= self.speed_alpha <= 10:
            raise ValueError(f"selection_speed_alpha must be in [0, 10], got {self.speed_alpha}")
        if self.max_skip_rounds < 0:
            raise ValueError(f"selection_max_skip_rounds must be >= 0 (0 = automatic), got "
                             f"{self.max_skip_rounds}")  # fmt: skip

    def skip_limit(self, online: int, picks: int) -> int:
        """Rounds a device may go unselected before the guard selects it."""
        return self.max_skip_rounds or 4 * math.ceil(online / max(1, picks))

    def select(self, c: Candidates, table: Participation) -> tuple[str, ...]:
        k = c.want
        online = sorted(set(c.online))
        if k >= len(online):
            return tuple(online)
        rng = np.random.default_rng([c.seed, c.round_id])
        rec = {d: table.devices.get(d) or DeviceRecord() for d in online}
        chosen = self._guard(online, rec, k, c.round_id, rng)
        taken = set(chosen)
        rest = [d for d in online if d not in taken]
        left = k - len(chosen)
        untried = [d for d in rest if not rec[d].tried]
        tried = [d for d in rest if rec[d].tried]
        # exploration: a fraction of the picks (rounded at random, so a small round still
        # explores now and then) among never-tried devices, more when too few are tried
        share = self.exploration * left
        explore = int(share) + int(rng.random() < share - int(share))
        explore = min(len(untried), max(explore, left - len(tried)))
        if explore:
            chosen += [untried[i] for i in rng.choice(len(untried), size=explore, replace=False)]
        left -= explore
        if left:
            # the round waits for the slowest device the guard took into it: devices no
            # slower than that cost it no time, so they are not penalised in this round
            # (slow devices then take their turns together rather than one a round)
            wait = max((rec[d].duration_s or 0.0 for d in chosen), default=0.0)
            chosen += self._exploit(tried, rec, left, c.round_id, rng, wait_s=wait)
        return tuple(sorted(chosen))

    def _guard(self, online: list[str], rec: Mapping[str, DeviceRecord], k: int,
               round_id: int, rng: np.random.Generator) -> list[str]:  # fmt: skip
        """The fairness guard. Each device must be selected by its deadline, the round after
        it was skipped limit rounds in a row; earliest deadline first, and as many now as
        keep every later deadline reachable with k picks a round (more devices due by round
        r + j than k x j must be started now), so the guard does not bunch them up."""
        limit = self.skip_limit(len(online), k)
        order = rng.permutation(len(online))
        deadline = [rec[d].last_selected + limit + 1 for d in online]
        edf = sorted(range(len(online)), key=lambda i: (deadline[i], order[i]))
        must = 0
        for n, i in enumerate(edf, start=1):
            must = max(must, n - k * max(0, deadline[i] - round_id))
        return [online[i] for i in edf[: min(k, must)]]

    def scores(self, devices: Sequence[str], rec: Mapping[str, DeviceRecord],
               round_id: int, *, wait_s: float = 0.0) -> np.ndarray:  # fmt: skip
        """Each tried device's utility: statistical utility (clipped, scaled to [0, 1]) plus
        a staleness bonus, times the speed penalty (T / t)^alpha when t > T, T being at
        least wait_s (what the round waits for anyway)."""
        stat = np.array([_stat_utility(rec[d]) for d in devices], dtype=np.float64)
        known = stat[np.isfinite(stat)]
        # a device that never reported (selected, never took part) counts as the median one
        stat[~np.isfinite(stat)] = float(np.median(known)) if known.size else 0.0
        hi = float(np.percentile(stat, UTILITY_PERCENTILE))
        lo = float(stat.min())
        stat = (np.minimum(stat, hi) - lo) / (hi - lo) if hi > lo else np.ones_like(stat)
        last = np.array([max(1, rec[d].last_selected) for d in devices], dtype=np.float64)
        bonus = np.sqrt(0.1 * math.log(max(round_id, 2)) / last)
        score = stat + bonus
        durations = np.array([rec[d].duration_s or np.nan for d in devices], dtype=np.float64)
        seen = durations[np.isfinite(durations)]
        pref = max(wait_s, self.round_s or (float(np.median(seen)) if seen.size else 0.0))
        if pref > 0 and self.speed_alpha:
            t = np.where(np.isfinite(durations), durations, pref)
            slow = t > pref
            score[slow] *= (pref / t[slow]) ** self.speed_alpha
        return score

    def _exploit(self, tried: list[str], rec: Mapping[str, DeviceRecord], k: int,
                 round_id: int, rng: np.random.Generator, *,
                 wait_s: float = 0.0) -> list[str]:  # fmt: skip
        """k of the tried devices: sampled in proportion to their scores among those scoring
        at least CUTOFF x the k-th best (Oort's cut-off), so near-ties share turns."""
        score = self.scores(tried, rec, round_id, wait_s=wait_s)
        kth = float(np.sort(score)[::-1][k - 1])
        pool = np.flatnonzero(score >= CUTOFF * kth)
        w = score[pool]
        # uniform when the weights cannot make k distinct picks (penalties that underflow)
        p = w / w.sum() if np.count_nonzero(w > 0) >= k and np.isfinite(w).all() else None
        picked = rng.choice(pool, size=k, replace=False, p=p)
        return [tried[i] for i in picked]


def make_selection(
    *, policy: str, exploration: float = 0.1, round_s: float = 0.0, speed_alpha: float = 2.0,
    max_skip_rounds: int = 0,
) -> SelectionPolicy:  # fmt: skip
    """The policy a setting names; ValueError for an unknown one or a bad setting (the
    utility policy's settings are checked even when random is chosen)."""
    utility = UtilitySelection(exploration=exploration, round_s=round_s, speed_alpha=speed_alpha,
                               max_skip_rounds=max_skip_rounds)  # fmt: skip
    if policy == "random":
        return RandomSelection()
    if policy == "utility":
        return utility
    raise ValueError(f"selection must be one of {', '.join(POLICIES)}, got {policy!r}")


@dataclass
class Selector:
    """A policy and the participation table it reads: what the modes call to select."""

    policy: SelectionPolicy = field(default_factory=RandomSelection)
    table: Participation = field(default_factory=Participation)

    def select(self, c: Candidates) -> tuple[str, ...]:
        """The round's selected ids, sorted."""
        return self.policy.select(c, self.table)

    def observe(self, record: Mapping[str, Any],
                history: Callable[[], Iterable[Mapping[str, Any]]]) -> None:  # fmt: skip
        """Take the record of the round that just closed. A round closed again (after a
        crash between its record and the commit point) replaces its earlier record, as in
        the history: the table is then rebuilt from history()."""
        try:
            again = int(record["round"]) <= self.table.last_round
        except (KeyError, TypeError, ValueError):
            return
        if again:
            self.rebuild(history())
        else:
            self.table.observe(record)

    def rebuild(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Learn the table afresh from the history (on start and after a restart)."""
        self.table = Participation.from_history(records, censor=self.table.censor,
                                                max_tracked=self.table.max_tracked)  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The status document's selection section."""
        return {"policy": self.policy.name, **self.table.status()}

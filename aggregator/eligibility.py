"""Which devices a round may select, and what happens when a selected one declines.

Pure code over the device table (aggregator.presence) and the round's training config.
A device is eligible when it

    is online and idle      status "online" (not "training": busy with an earlier round,
                            unless the round that just closed selected it)
    can train               trains = true (an inference-only device never trains)
    is ready                its state's `ready` (absent in older agents: ready); a device
                            over its profile's thermal limit or under its battery gate
                            says ready = false with the reason in `not_ready`
    is within its budget    the round's epochs, lr and FedProx mu are within its bundled
                            profile's max_epochs, max_lr and max_prox_mu (a profile name
                            fedmq does not bundle is the device's to check: it refuses
                            such a round itself)

A selected device that is not ready when the round reaches it (the race: it got hot
between its last state and the round) declines: its state names the round (`declined`)
and why (`not_ready`). The round stops waiting for it and, when the rest can no longer
make the round's target, selects one more eligible device in its place (sync rounds; an
async buffer selects every free device already). See docs/devices.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from aggregator.presence import Presence
from aggregator.rounds import OpenRound
from fedmq.wire import DeviceState, TrainConfig
from firmware_profiles import bundled

MAX_CLASSES = 32  # classes the status lists (the rest are counted under "other")
MAX_REASON_CHARS = 200  # of a decline's reason kept in the round and the history


def why_not(state: DeviceState, train: TrainConfig | None = None, *, idle: bool = False) -> str:
    """ "" when the device may be selected, else why not (its first failed condition).
    idle: known to be done training whatever its last state says (see eligible)."""
    if state.status == "training" and not idle:
        return "busy: training"
    if state.status == "offline":
        return "offline"
    if not state.trains:
        return "inference only"
    if not state.ready:
        return f"not ready: {state.not_ready or 'no reason given'}"
    p = bundled(state.profile)
    if p is None or train is None:
        return ""
    if not p.can_train:
        return f"inference only (profile {p.name})"
    if train.epochs > p.max_epochs or train.lr > p.max_lr or train.prox_mu > p.max_prox_mu:
        return (f"budget: the round asks {train.epochs} epochs at lr {train.lr:g} (mu "
                f"{train.prox_mu:g}); profile {p.name} allows {p.max_epochs} epochs, lr "
                f"{p.max_lr:g}, mu {p.max_prox_mu:g}")  # fmt: skip
    return ""


def eligible(presence: Presence, train: TrainConfig | None = None, *,
             idle: frozenset[str] = frozenset()) -> list[str]:  # fmt: skip
    """The devices a round may select, sorted. idle: the devices the round that just
    closed selected, whatever their last state says: the round they trained for is over,
    so they are (about to be) free. Their `online` state follows their update and may
    not have arrived when the next round opens in the same tick, and a straggler that was
    slow once is not shut out of the next round; a device still `training` for an older
    round is busy."""
    return sorted(d for d, s in presence.devices.items()
                  if not why_not(s, train, idle=d in idle))  # fmt: skip


def decline(r: OpenRound, device: str, reason: str, *, candidates: Sequence[str], seed: int,
            replace: bool, max_selected: int = 0) -> tuple[bool, str | None]:  # fmt: skip
    """A selected device declined round r: stop waiting for it and, when replace is set
    and the devices still expected cannot make the target, select one eligible device not
    selected yet (seeded by (seed, round, declines so far): the same choice after a
    restart), at most max_selected in all (0: no cap). (changed, the replacement or
    None); unchanged when the device was not selected, has already contributed, or
    already declined."""
    if device not in r.selected or device in r.contributors or device in r.declined:
        return False, None
    r.declined[device] = reason[:MAX_REASON_CHARS] or "declined"
    if not replace or len(r.accepted) + len(r.waiting_for) >= r.target:
        return True, None
    pool = sorted(set(candidates) - r.selected)
    if not pool or max_selected and len(r.selected) >= max_selected:  # the message must fit
        return True, None
    rng = np.random.default_rng([seed, r.round_id, len(r.declined)])
    pick = pool[int(rng.integers(len(pool)))]
    r.selected = r.selected | {pick}
    return True, pick


def by_class(presence: Presence) -> dict[str, dict[str, Any]]:
    """The fleet by device class (profile) for the status: per class the devices online,
    ready (online, can train, ready), training, and not ready by reason kind (the text
    before its first ':', e.g. "thermal")."""
    out: dict[str, dict[str, Any]] = {}
    for state in presence.devices.values():
        if state.status == "offline":
            continue
        name = state.profile or "unknown"
        if name not in out and len(out) >= MAX_CLASSES:
            name = "other"
        c = out.setdefault(name, {"online": 0, "ready": 0, "training": 0,
                                  "not_ready": Counter()})  # fmt: skip
        c["online"] += 1
        c["training"] += state.status == "training"
        if state.trains and state.ready:
            c["ready"] += 1
        elif state.trains:
            c["not_ready"][state.not_ready.split(":", 1)[0][:32] or "unknown"] += 1
    return {k: {**v, "not_ready": dict(sorted(v["not_ready"].items()))}
            for k, v in sorted(out.items())}  # fmt: skip

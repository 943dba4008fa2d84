"""Recovery: the open round as it was before a stop or a crash, from the journal.

The round comes back as it was announced; its accepted updates are folded in again, in
the order they were first folded, onto the newest snapshot of its sum: the same float64
sum bit for bit, and the same ids and stats in the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from aggregator.fedavg import AggregationRule, RunningSum
from aggregator.journal import Journal
from aggregator.ledger import Ledger
from aggregator.personal import shared_body
from aggregator.rounds import OpenRound
from fedmq.codecs import decode_tensors
from fedmq.wire import TensorSpec, check_tensors, decode_weights


def recover_round(
    *, journal: Journal, ledger: Ledger, round_id: int, version: int,
    specs: tuple[TensorSpec, ...],
    new_rule: Callable[[dict[str, Any]], AggregationRule] | None = None,
    head: frozenset[str] = frozenset(),
) -> tuple[OpenRound, AggregationRule] | None:  # fmt: skip
    """The open round `round_id` on `version` and its sum, or None if there is none.

    new_rule rebuilds the round's aggregation rule from what the journal kept of it (its
    bounds); a rule that keeps every update (not streaming) gets every body replayed, a
    streaming one only those after its snapshot; head: fedper's, whose deltas a journalled
    update left out or had discarded (aggregator.personal). A journalled round opened on another
    version (one never committed) is dropped. Raises (ValueError, KeyError, a ProtocolError,
    ...) when the journal cannot be trusted: a snapshot or body that does not decode, or a
    sum that is not finite; the caller moves the round aside."""
    meta = journal.round_meta(round_id)
    if meta is None:
        return None
    if int(meta["model_version"]) != version:
        journal.close_round(round_id)
        return None
    r = OpenRound.from_meta(meta)
    acc = new_rule(meta.get("rule") or {}) if new_rule is not None else RunningSum(specs=specs)
    snap = journal.snapshot(round_id) if isinstance(acc, RunningSum) else None
    if snap is not None and isinstance(acc, RunningSum):
        sums = decode_weights(snap.sums)
        check_tensors(sums, tuple(TensorSpec(s.name, "float64", s.shape) for s in specs),
                      what="snapshot")  # fmt: skip
        acc.sums = {k: v.copy() for k, v in sums.items()}
        acc.total_weight, acc.count = snap.total_weight, snap.count
    for a in journal.accepted_in(round_id):
        r.record(a.update_id, a.device)
        ledger.accept(a, replayed=True)
    for _seq, a in journal.replay(round_id, after_seq=snap.seq if snap else 0):
        tensors = decode_tensors(a.body, a.codec, specs, optional=head)
        acc.add(shared_body(tensors, specs, head) if head else tensors, a.weight, norm=a.norm)
    if isinstance(acc, RunningSum) and (not all(np.isfinite(v).all() for v in acc.sums.values())
                                        or not (np.isfinite(acc.total_weight)
                                                and acc.total_weight >= 0)):  # fmt: skip
        raise ValueError(f"the journalled sum of round {round_id} is not finite")
    return r, acc

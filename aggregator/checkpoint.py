"""The open round as bytes on disk: its devices, accepted ids and running sum.

Written after every accepted update and before its ack, so an update that was
acknowledged is in the checkpoint, and one that was not will be resent by its device.
"""

from __future__ import annotations

from typing import Any

import msgpack

from aggregator.fedavg import RunningSum
from aggregator.rounds import OpenRound
from fedmq.wire import TensorSpec, check_tensors, decode_weights, encode_weights

CHECKPOINT_VERSION = 1


def encode_open_round(r: OpenRound, acc: RunningSum, stats: dict[str, Any]) -> bytes:
    """Serialise an open round with its running sum (float64) and byte/participant stats."""
    return msgpack.packb(
        {
            "v": CHECKPOINT_VERSION,
            "round": r.round_id,
            "model_version": r.model_version,
            "selected": sorted(r.selected),
            "opened_at": r.opened_at,
            "deadline": r.deadline,
            "target": r.target,
            "min_devices": r.min_devices,
            "accepted": dict(r.accepted),
            "dropped": sorted(r.dropped),
            "sum": encode_weights(acc.sums),
            "total_weight": acc.total_weight,
            "count": acc.count,
            "stats": stats,
        },
        use_bin_type=True,
    )


def decode_open_round(
    blob: bytes, *, specs: tuple[TensorSpec, ...]
) -> tuple[OpenRound, RunningSum, dict[str, Any]]:
    """Inverse of encode_open_round; ValueError if the checkpoint does not fit the model."""
    obj = msgpack.unpackb(blob, raw=False)
    if obj.get("v") != CHECKPOINT_VERSION:
        raise ValueError(f"open round checkpoint has unknown version {obj.get('v')!r}")
    r = OpenRound(
        round_id=obj["round"],
        model_version=obj["model_version"],
        selected=frozenset(obj["selected"]),
        opened_at=obj["opened_at"],
        deadline=obj["deadline"],
        target=obj["target"],
        min_devices=obj["min_devices"],
        accepted=dict(obj["accepted"]),
        dropped=set(obj["dropped"]),
    )
    acc = RunningSum(specs=specs)
    sums = decode_weights(obj["sum"])
    check_tensors(sums, tuple(TensorSpec(s.name, "float64", s.shape) for s in specs),
                  what="open round checkpoint")  # fmt: skip
    acc.sums = {name: sums[name].copy() for name in acc.sums}
    acc.total_weight = float(obj["total_weight"])
    acc.count = int(obj["count"])
    return r, acc, dict(obj["stats"])

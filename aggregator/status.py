"""The retained status: one JSON document a person or an MQTT monitoring tool can read."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from aggregator.presence import Presence
from aggregator.rounds import OpenRound
from aggregator.settings import AggregatorSettings
from fedmq import __version__


def done_reason(s: AggregatorSettings, round_id: int, rounds_closed: int,
                metrics: Mapping[str, float]) -> str:  # fmt: skip
    """Why the job is done once round round_id has ended ("" while it goes on)."""
    if s.rounds and round_id >= s.rounds:
        return f"ran {round_id} rounds"
    accuracy = metrics.get("accuracy", 0.0)
    if s.target_accuracy and rounds_closed and accuracy >= s.target_accuracy:
        return f"reached accuracy {accuracy:.4f}"
    return ""


def status_of(
    *,
    settings: AggregatorSettings,
    task: str,
    done_reason: str,
    version: int,
    metrics: Mapping[str, float],
    round_: OpenRound | None,
    presence: Presence,
    counters: Mapping[str, int],
    now: float,
    signing_key: str = "",
    aggregation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status document for this moment."""
    s = settings
    delta = s.downlink_delta_pipeline
    if done_reason:
        phase = "done"
    elif round_ is not None:
        phase = "training"
    else:
        phase = "waiting for devices"
    r = round_
    return {
        "job": s.job,
        "task": task,
        "mode": s.mode,
        "phase": phase,
        "done_reason": done_reason,
        "model_version": version,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "rounds_closed": counters.get("rounds_closed", 0),
        "codec": {
            "updates": s.update_pipeline.name,
            "update_budget_bytes": s.update_budget_bytes,
            "downlink": s.downlink_pipeline.name,
            "downlink_delta": delta.name if delta else "",
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
            "online": len(presence.online()),
            "trainers_online": len(presence.trainers_online()),
            "known": len(presence.devices),
        },
        "counters": dict(sorted(counters.items())),
        "signing_key": signing_key,
        # rule, norm bound, example cap, privacy spent (epsilon, delta) under central DP
        "aggregation": dict(aggregation) if aggregation is not None else None,
        "aggregator_version": __version__,
        "updated_at": round(now, 3),
        "updated": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
    }

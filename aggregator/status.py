"""The retained status: one JSON document a person or an MQTT monitoring tool can read,
and the aggregator's Last Will on the same topic, which marks it offline."""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from aggregator.eligibility import by_class
from aggregator.presence import Presence
from aggregator.rounds import OpenRound
from aggregator.settings import AggregatorSettings
from fedmq import __version__

RECENT_ROUNDS = 30  # rounds in the status's tail (a freshly started monitor's sparkline)


class RecentRounds:
    """The last few closed rounds' {round, version, outcome, accuracy, loss}, oldest first;
    with personal models also their `personal` and `global_local` {mean, p10, n}."""

    def __init__(self, *, keep: int = RECENT_ROUNDS) -> None:
        self._rounds: deque[dict[str, Any]] = deque(maxlen=keep)

    def add(self, record: Mapping[str, Any]) -> None:
        """Take one history record (aggregator.store's round record)."""
        try:
            point = {"round": int(record["round"]), "version": record.get("version"),
                     "outcome": str(record.get("outcome", "")),
                     "accuracy": _finite(record.get("accuracy")),
                     "loss": _finite(record.get("loss"))}  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return  # a record without a round number tells a sparkline nothing
        fed = record.get("federated")
        if isinstance(fed, Mapping):  # the devices' evaluation of the round's base version
            point["federated"] = {"version": fed.get("version"),
                                  "accuracy": _finite(fed.get("accuracy")),
                                  "loss": _finite(fed.get("loss"))}  # fmt: skip
        for key in ("personal", "global_local"):  # personal models' {mean, p10, n}
            if isinstance(record.get(key), Mapping):
                point[key] = {k: _finite(record[key].get(k)) for k in ("mean", "p10", "n")}
        if self._rounds and self._rounds[-1]["round"] == point["round"]:
            self._rounds.pop()  # a later record of a round wins, as in the history
        self._rounds.append(point)

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Take records oldest first (the history, on a restart)."""
        for record in records:
            self.add(record)

    def as_list(self) -> list[dict[str, Any]]:
        return list(self._rounds)


def _federated(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A federated result as the status shows it: its numbers rounded, None without one."""
    if not result:
        return None
    return {k: (v if isinstance(v, int) and not isinstance(v, bool) else _finite(v))
            for k, v in result.items()}  # fmt: skip


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return round(float(value), 6)
    return None


def offline_status(*, job: str, task: str) -> bytes:
    """The aggregator's Last Will: what its status topic says once the broker noticed it
    gone without a clean stop. The same bytes for every run of the job, so that a restarted
    aggregator knows the Will of an earlier run as its own (aggregator.watch); it cannot
    say when it died (the broker publishes it as it was set at connect time)."""
    return json.dumps({
        "job": job,
        "task": task,
        "phase": "offline",
        "aggregator": "offline",
        "offline_reason": "connection lost (its Last Will)",
        "updated_at": None,
    }, indent=1).encode()  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def done_reason(s: AggregatorSettings, round_id: int, rounds_closed: int,
                accuracy: float | None) -> str:  # fmt: skip
    """Why the job is done once round round_id has ended ("" while it goes on); accuracy is
    the deciding one (aggregator.fedeval.accuracy_of: central, else federated)."""
    if s.rounds and round_id >= s.rounds:
        return f"ran {round_id} rounds"
    if (s.target_accuracy and rounds_closed and accuracy is not None
            and accuracy >= s.target_accuracy):  # fmt: skip
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
    online: bool = True,
    recent: list[dict[str, Any]] | None = None,
    federated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status document for this moment; online=False: the service is stopping."""
    s = settings
    delta = s.downlink_delta_pipeline
    if done_reason:
        phase = "done"
    elif not online:
        phase = "stopped"
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
        "aggregator": "online" if online else "offline",
        "done_reason": done_reason,
        "model_version": version,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        # the devices' evaluation of the newest version they reported on (aggregator.fedeval)
        "federated": _federated(federated),
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
            # per device class (profile): online, ready, training, not ready by reason
            "classes": by_class(presence),
        },
        "counters": dict(sorted(counters.items())),
        # the last closed rounds, oldest first: {round, version, outcome, accuracy, loss}
        "recent_rounds": list(recent or []),
        "signing_key": signing_key,
        # rule, norm bound, example cap, privacy spent (epsilon, delta) under central DP
        "aggregation": dict(aggregation) if aggregation is not None else None,
        "aggregator_version": __version__,
        "updated_at": round(now, 3),
        "updated": _iso(now),
    }

"""What `fedmq status` prints: a summary for people, the device table, or one JSON
document for machines. Pure: built from a FleetState and `now`."""

from __future__ import annotations

import json
from typing import Any

from fedmq.fleetstate import Device, FleetState, ago, clock, human_bytes

SHOWN_COUNTERS = 12  # counters in the summary's line; --json has them all


def summary_lines(state: FleetState, now: float) -> list[str]:
    """The status as a few lines for people."""
    s = state.status
    if s is None:
        return [f"job {state.topics.job}: no status"]
    head = f"job {s.job or state.topics.job}"
    if s.task or s.mode:
        head += f" ({', '.join(x for x in (s.task, s.mode) if x)})"  # a Will has no mode
    if state.aggregator_offline:
        at = state.offline_at()
        if at is not None:
            where = f"aggregator offline since {clock(at)} ({ago(at, now)})"
        else:
            where = "aggregator offline: its connection was lost (its Last Will)"
    else:
        where = "aggregator online" if s.aggregator == "online" else ""
    phase = s.phase + (f": {s.done_reason}" if s.done_reason else "")
    lines = [f"{head}: {phase}" + (f" - {where}" if where else "")]
    if s.model_version is not None:
        model = f"version {s.model_version}"
        if s.accuracy is not None:
            model += f", accuracy {s.accuracy:.4f}"
        if s.loss is not None:
            model += f", loss {s.loss:.4f}"
        lines.append(f"  model     {model} ({s.rounds_closed} rounds closed)")
    if s.federated is not None:
        f = s.federated
        spread = f", p10..p90 {f.p10:.3f}..{f.p90:.3f}" if f.p10 is not None and (
            f.p90 is not None) else ""  # fmt: skip
        loss = f", loss {f.loss:.4f}" if f.loss is not None else ""
        lines.append(f"  federated version {f.version}: accuracy {f.accuracy:.4f}{loss} on "
                     f"{f.examples} held-out examples of {f.devices} devices{spread}")  # fmt: skip
    if s.round is not None:
        r = s.round
        text = (f"{r.round_id}: {r.received} of {r.target} updates, {r.selected} selected, "
                f"{len(r.dropped)} dropped")  # fmt: skip
        if r.deadline_in_s is not None:
            text += f", deadline in {r.deadline_in_s:.0f} s"
        lines.append(f"  round     {text}")
    elif s.aggregator != "offline":
        lines.append("  round     none open")
    if s.aggregator != "offline" or s.known:
        lines.append(f"  devices   {s.online} online of {s.known} known "
                     f"({s.trainers_online} can train)")  # fmt: skip
    for name, online, ready, training, why in s.classes:  # the fleet by class
        text = f"{name}: {online} online, {ready} ready, {training} training"
        if why:
            text += ", not ready: " + ", ".join(f"{k} {n}" for k, n in why.items())
        lines.append(f"  class     {text}")
    if s.counters:
        shown = sorted(s.counters.items(), key=lambda kv: (-kv[1], kv[0]))[:SHOWN_COUNTERS]
        more = len(s.counters) - len(shown)
        lines.append("  counters  " + ", ".join(f"{k} {v}" for k, v in shown)
                     + (f" (+{more} more)" if more > 0 else ""))  # fmt: skip
    if s.updated_at is not None:
        lines.append(f"  updated   {ago(s.updated_at, now)} ({clock(s.updated_at)})")
    return lines


COLUMNS = ("device", "class", "status", "version", "last seen", "verdict", "accepted",
           "rejected", "bytes up", "reason")  # fmt: skip


def device_cells(d: Device, now: float) -> tuple[str, ...]:
    """One device's row of the table, as text cells in COLUMNS order."""
    return (d.id, d.cls or "-", d.status or "?",
            "-" if d.model_version is None or d.model_version < 0 else str(d.model_version),
            ago(d.last_seen, now), d.last_verdict or "-", str(d.accepted), str(d.rejected),
            human_bytes(d.bytes_up), d.last_reason or "")  # fmt: skip


def device_lines(state: FleetState, now: float) -> list[str]:
    """The device table as aligned text (the reason column last, not padded)."""
    rows = [device_cells(d, now) for d in state.table()]
    if not rows:
        return ["no devices in the fleet mirror"]
    widths = [max(len(c[i]) for c in [COLUMNS, *rows]) for i in range(len(COLUMNS) - 1)]
    out = []
    for cells in [COLUMNS, *rows]:
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
                   + "  " + cells[-1])  # fmt: skip
    return [line.rstrip() for line in out]


def json_document(state: FleetState, *, devices: bool) -> dict[str, Any]:
    """The status as the aggregator published it; with devices, plus "fleet": one entry
    per device of the fleet mirror."""
    doc: dict[str, Any] = dict(state.status_doc or {})
    if devices:
        doc["fleet"] = [d.mirror() for d in state.table()]
    return doc


def render_text(state: FleetState, now: float, *, devices: bool) -> str:
    """The whole human output of `fedmq status`."""
    lines = summary_lines(state, now)
    if devices:
        lines += ["", *device_lines(state, now)]
    return "\n".join(lines)


def render_json(state: FleetState, *, devices: bool, compact: bool = False) -> str:
    """The JSON output of `fedmq status --json` (ASCII only: nothing reaches a terminal
    that could drive it)."""
    doc = json_document(state, devices=devices)
    return json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=2)

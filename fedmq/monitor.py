"""The screen of `fedmq monitor`, drawn with rich from a FleetState: a pure function of
the state, `now` and the screen's height (fedmq.operator runs the loop around it).

Every text from the broker goes in as rich `Text` (never markup), already stripped of
control characters by fedmq.fleetstate, so a device id like "[red]x" or "\\x1b[2J" is
shown as it is and cannot restyle or clear the screen.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedmq.fleetstate import FleetState, ago, clock
from fedmq.statusview import COLUMNS, device_cells

SPARKS = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {"online": "green", "training": "cyan", "offline": "red"}
STAGE_STYLE = {"delivered": "green", "training": "cyan", "waiting": "white",
               "dropped": "red", "offline": "red", "rejected": "red", "late": "yellow"}  # fmt: skip
VERDICT_STYLE = {"accepted": "green", "duplicate": "green", "late": "yellow", "rejected": "red"}


def sparkline(values: list[float | None], width: int = 40) -> str:
    """values (None: a gap) as block characters scaled between their min and max."""
    values = values[-width:]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    span = hi - lo
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            i = 0 if span <= 0 else round((v - lo) / span * (len(SPARKS) - 1))
            out.append(SPARKS[i])
    return "".join(out)


def render(state: FleetState, now: float, *, height: int = 50,
           connected: bool = True) -> RenderableType:  # fmt: skip
    """The whole screen."""
    parts: list[RenderableType] = [_header(state, now, connected), _alerts(state, now)]
    parts.append(_curves(state))
    parts.append(_round(state, now))
    used = 18 + len(state.alerts(now)) + (2 if state.progress() else 0)
    parts.append(_devices(state, now, max_rows=max(3, height - used)))
    parts.append(_counters(state))
    return Group(*parts)


def _header(state: FleetState, now: float, connected: bool) -> RenderableType:
    s = state.status
    t = Text()
    t.append("fedmq monitor", style="bold")
    t.append(f"  job {state.topics.job}")
    if s is not None:
        if s.task or s.mode:
            t.append(f" ({', '.join(x for x in (s.task, s.mode) if x)})")
        t.append("  phase ")
        t.append(s.phase or "?", style="bold")
        t.append("  aggregator ")
        if state.aggregator_offline:
            t.append("OFFLINE", style="bold white on red")
        else:
            t.append(s.aggregator or "?", style="green")
        if s.model_version is not None:
            t.append(f"  version {s.model_version}")
        if s.accuracy is not None:
            t.append(f"  accuracy {s.accuracy:.4f}")
        if s.loss is not None:
            t.append(f"  loss {s.loss:.4f}")
        if s.federated is not None:
            t.append(f"  federated {s.federated.accuracy:.4f} (v{s.federated.version}, "
                     f"{s.federated.devices} devices)")  # fmt: skip
        t.append(f"\n{s.online} devices online of {s.known} known, {s.rounds_closed} rounds "
                 f"closed", style="dim")  # fmt: skip
        if s.updated_at is not None:
            t.append(f"; status updated {ago(s.updated_at, now)}", style="dim")
    else:
        t.append("  waiting for the aggregator's status", style="yellow")
    if not connected:
        t.append("  broker connection lost, reconnecting", style="bold red")
    return Panel(t, padding=(0, 1))


def _alerts(state: FleetState, now: float) -> RenderableType:
    alerts = state.alerts(now)
    if not alerts:
        return Text("no alerts", style="dim")
    t = Text()
    for i, a in enumerate(alerts):
        if i:
            t.append("\n")
        style = "bold red" if a.level == "error" else "yellow"
        t.append(f"ALERT {a.text}", style=style)
    return Panel(t, title="alerts", border_style="red", padding=(0, 1))


def _curves(state: FleetState) -> RenderableType:
    series = state.series()
    t = Text()
    acc = [a for _, a, _ in series]
    loss = [lo for _, _, lo in series]
    first = series[0][0] if series else 0
    last = series[-1][0] if series else 0
    t.append("accuracy ", style="bold")
    t.append(sparkline(acc), style="green")
    known_acc = [a for a in acc if a is not None]
    if known_acc:
        t.append(f"  {known_acc[-1]:.4f} (min {min(known_acc):.3f}, max {max(known_acc):.3f})")
    t.append("\nloss     ", style="bold")
    t.append(sparkline(loss), style="magenta")
    known_loss = [v for v in loss if v is not None]
    if known_loss:
        t.append(f"  {known_loss[-1]:.4f} (min {min(known_loss):.3f}, max {max(known_loss):.3f})")
    if series:
        t.append(f"\nrounds {first}..{last}", style="dim")
    return Panel(t, title="model", padding=(0, 1))


def _round(state: FleetState, now: float) -> RenderableType:
    s = state.status
    if s is None or s.round is None:
        return Text("no round open", style="dim")
    r = s.round
    progress = state.progress()
    stages = Counter(p.stage for p in progress)
    t = Text()
    t.append(f"round {r.round_id}", style="bold")
    t.append(f": {r.received} of {r.target} updates, {r.selected} selected, "
             f"{len(r.dropped)} dropped")  # fmt: skip
    if r.deadline_in_s is not None:
        t.append(f", deadline in {r.deadline_in_s:.0f} s")
    if progress:
        t.append("  [" + ", ".join(f"{n} {k}" for k, n in sorted(stages.items())) + "]",
                 style="dim")  # fmt: skip
        t.append("\n")
        for i, p in enumerate(progress[:60]):
            if i:
                t.append("  ")
            t.append(p.device)
            t.append(f" {p.stage}", style=STAGE_STYLE.get(p.stage, "white"))
        if len(progress) > 60:
            t.append(f"  ... {len(progress) - 60} more", style="dim")
    return Panel(t, title="open round", padding=(0, 1))


def _devices(state: FleetState, now: float, *, max_rows: int) -> RenderableType:
    rows = state.table()
    table = Table(expand=True, show_edge=False, pad_edge=False, box=None,
                  header_style="bold")  # fmt: skip
    for name in COLUMNS:
        table.add_column(name, no_wrap=True, overflow="ellipsis",
                         ratio=3 if name == "reason" else None)  # fmt: skip
    for d in rows[:max_rows]:
        cells = [Text(c) for c in device_cells(d, now)]
        cells[2].stylize(STATUS_STYLE.get(d.status, "white"))
        cells[5].stylize(VERDICT_STYLE.get(d.last_verdict, "white"))
        table.add_row(*cells)
    title = f"devices ({len(rows)})"
    if len(rows) > max_rows:
        title += f", first {max_rows} shown"
    if not rows:
        return Panel(Text("no devices seen yet", style="dim"), title=title)
    return Panel(table, title=title, padding=(0, 1))


def _counters(state: FleetState) -> RenderableType:
    s = state.status
    if s is None or not s.counters:
        return Text("")
    t = Text()
    for i, (k, v) in enumerate(sorted(s.counters.items())):
        if i:
            t.append("  ")
        style = "red" if k.startswith("rejected") and v else None
        t.append(f"{k} {v}", style=style)
    when = clock(state.status_at) if state.status_at else "-"
    return Panel(t, title=f"counters (status received {when})", padding=(0, 1))

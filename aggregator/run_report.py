"""`fedmq report STATE_DIR`: one self-contained HTML page of a run, from its state directory.

It reads what the aggregator wrote (history.jsonl, state.json, the ledger in
journal.sqlite) and nothing else: a summary, the plots (accuracy, loss, bytes up and down,
participation per round) embedded as base64 PNG, and a table with a row per round.
Rejections per round come from the ledger, by when they were given (an update's claimed
round is whatever its sender wrote).
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregator.journal import read_ledger
from fedmq.report import plot_versions, read_history, summarize


class ReportError(Exception):
    """A report that cannot be made; the message is one line an operator can act on."""


def write_run_report(state_dir: Path, out: Path | None = None) -> Path:
    """Write the HTML report of the run in state_dir to out (default STATE_DIR/report.html)."""
    state_dir = Path(state_dir)
    out = Path(out) if out is not None else state_dir / "report.html"
    page = render_report(state_dir)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot write {out}: {err.strerror or err}") from None
    return out


def render_report(state_dir: Path) -> str:
    """The report of the run in state_dir, as one HTML page."""
    history_file = state_dir / "history.jsonl"
    if not state_dir.is_dir():
        raise ReportError(f"no such directory: {state_dir}")
    try:
        rounds = read_history(state_dir)
        state = _state(state_dir)
    except OSError as err:
        raise ReportError(f"cannot read {err.filename or state_dir}: {err.strerror}") from None
    except (KeyError, TypeError, AttributeError) as err:  # a line without a round number
        raise _unreadable(history_file, err) from None
    if not rounds:
        raise ReportError(
            f"no round history in {history_file} (is {state_dir} an "
            "aggregator's --state-dir, and has a round ended?)"
        )
    try:
        ledger: list[dict[str, Any]] | None = read_ledger(state_dir)
    except sqlite3.Error:
        ledger = None  # the report says so rather than showing zeros
    given = sorted((v["at"], v["verdict"]) for v in ledger) if ledger is not None else None
    try:
        rows = [_row(r, given) for r in rounds]
        summary = _summary(rounds, rows, state, ledger)
    except (KeyError, TypeError, ValueError) as err:  # written by hand, or by another tool
        raise _unreadable(history_file, err) from None
    plots = {
        "accuracy and loss": _plot_metrics(rounds),
        "bytes per round": _plot_bytes(rows),
        "participation per round": _plot_participation(rows),
    }
    return _page(state_dir, summary, plots, rows)


def _unreadable(history_file: Path, err: Exception) -> ReportError:
    return ReportError(f"{history_file} is not a round history fedmq can read "
                       f"({err.__class__.__name__}: {err})")  # fmt: skip


def _state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _row(r: dict[str, Any], given: list[tuple[float, str]] | None) -> dict[str, Any]:
    """What the table and the plots show of one round; given: the ledger's (time, verdict),
    sorted (a run keeps up to a million verdicts: each round looks up its own window)."""
    pool = given or []
    lo = bisect.bisect_left(pool, (r["opened_at"], ""))
    hi = bisect.bisect_right(pool, (r["closed_at"], "~"))  # "~": after every verdict name
    window = Counter(v for _, v in pool[lo:hi])
    return {
        "round": r["round"],
        "outcome": r["outcome"],
        "reason": r.get("reason", ""),
        "base_version": r.get("base_version"),
        "version": r.get("version"),
        "selected": len(r.get("selected", ())),
        "accepted": r.get("accepted", 0),
        "dropped": len(r.get("dropped", ())),
        "rejected": None if given is None else window["rejected"],
        "late": None if given is None else window["late"],
        "accuracy": r.get("accuracy"),
        "loss": r.get("loss"),
        "federated": r.get("federated") if isinstance(r.get("federated"), dict) else None,
        "wall_s": r.get("wall_s", 0.0),
        "bytes_up": r.get("bytes_up", 0),
        "bytes_down": r.get("bytes_down", 0),
    }


def _summary(
    rounds: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    state: dict[str, Any],
    ledger: list[dict[str, Any]] | None,
) -> dict[str, str]:
    s = summarize(rounds)
    best = max(
        (r for r in rows if r["accuracy"] is not None), key=lambda r: r["accuracy"], default=None
    )
    devices = {p.get("device") for r in rounds for p in r.get("participants", ())}
    wall = rounds[-1]["closed_at"] - rounds[0]["opened_at"]
    rejected = (
        "ledger unreadable"
        if ledger is None
        else str(sum(v["verdict"] == "rejected" for v in ledger))
    )
    return {
        "job": str(state.get("job", "?")),
        "task": str(state.get("task", "?")),
        "rounds": f"{s['rounds']} ({s['rounds_closed']} closed, "
        f"{s['rounds'] - s['rounds_closed']} abandoned)",
        "model version": str(state.get("version", rows[-1]["version"])),
        "final accuracy": _num(s["final_accuracy"]),
        "best accuracy": "-" if best is None else f"{best['accuracy']:.4f} (round {best['round']})",
        "final loss": _num(s["final_loss"]),
        "federated accuracy": _federated_summary(s),
        "updates accepted": str(sum(r["accepted"] for r in rows)),
        "updates rejected": rejected,
        "devices that contributed": str(len(devices - {None})),
        "bytes up": _size(s["bytes_up"]),
        "bytes down": _size(s["bytes_down"]),
        "wall time": f"{wall:.1f} s",
    }


def _federated_summary(s: dict[str, Any]) -> str:
    """The newest federated accuracy and its version, or "-"."""
    if s["federated_version"] is None:
        return "-"
    return f"{s['final_federated_accuracy']:.4f} (version {s['federated_version']})"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ---------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    return fig, ax


def _plot_metrics(rounds: Sequence[dict[str, Any]]) -> list[str]:
    """Accuracy and loss of each version, central and federated (the devices'): two images."""
    out = []
    for key, color in (("accuracy", "tab:blue"), ("loss", "tab:red")):
        fig, ax = _figure()
        plot_versions(ax, rounds, key, color)
        ax.set_title(f"{key} of each version")
        out.append(_png(fig))
    return out


def _plot_bytes(rows: Sequence[dict[str, Any]]) -> list[str]:
    fig, ax = _figure()
    xs = [r["round"] for r in rows]
    ax.bar([x - 0.2 for x in xs], [r["bytes_up"] / 1024 for r in rows], 0.4, label="up (updates)")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["bytes_down"] / 1024 for r in rows],
        0.4,
        label="down (models fetched)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("KiB")
    ax.set_title("bytes per round")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return [_png(fig)]


def _plot_participation(rows: Sequence[dict[str, Any]]) -> list[str]:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    xs = [r["round"] for r in rows]
    series = [
        ("selected", "tab:gray"),
        ("accepted", "tab:green"),
        ("dropped", "tab:orange"),
        ("rejected", "tab:red"),
    ]
    width = 0.8 / len(series)
    for i, (key, color) in enumerate(series):
        ax.bar(
            [x - 0.4 + (i + 0.5) * width for x in xs],
            [r[key] or 0 for r in rows],
            width,
            label=key,
            color=color,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("devices / updates")
    ax.set_title("participation per round")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return [_png(fig)]


# ---------------------------------------------------------------- the page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
tr.abandoned td { color: #a33; }
.plots img { max-width: 48%; margin: 0.3em; border: 1px solid #eee; }
"""
COLUMNS = (
    "round",
    "outcome",
    "version",
    "selected",
    "accepted",
    "dropped",
    "rejected",
    "late",
    "accuracy",
    "loss",
    "federated accuracy",
    "wall s",
    "up KiB",
    "down KiB",
)


def _cells(r: dict[str, Any]) -> list[str]:
    version = "" if r["version"] is None else f"{r['base_version']} &rarr; {r['version']}"
    dash = "-"
    return [
        str(r["round"]),
        html.escape(r["outcome"]),
        version,
        str(r["selected"]),
        str(r["accepted"]),
        str(r["dropped"]),
        dash if r["rejected"] is None else str(r["rejected"]),
        dash if r["late"] is None else str(r["late"]),
        "" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
        "" if r["loss"] is None else f"{r['loss']:.4f}",
        _federated_cell(r["federated"]),
        f"{r['wall_s']:.2f}",
        f"{r['bytes_up'] / 1024:.1f}",
        f"{r['bytes_down'] / 1024:.1f}",
    ]


def _federated_cell(fed: dict[str, Any] | None) -> str:
    """The devices' evaluation of the round's base version: "0.8123 (v3, 9 devices)"."""
    try:
        return (f"{float(fed['accuracy']):.4f} (v{int(fed['version'])}, "
                f"{int(fed['devices'])} devices)") if fed else ""  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return ""


def _page(
    state_dir: Path,
    summary: dict[str, str],
    plots: dict[str, list[str]],
    rows: Sequence[dict[str, Any]],
) -> str:
    esc = html.escape
    title = f"fedmq run report: {summary['task']} ({summary['job']})"
    facts = "\n".join(
        f"<tr><th class=text>{esc(k)}</th><td class=text>{esc(v)}</td></tr>"
        for k, v in summary.items()
    )
    images = "\n".join(
        f'<img alt="{esc(name)}" src="data:image/png;base64,{png}">'
        for name, pngs in plots.items()
        for png in pngs
    )
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "\n".join(
        f'<tr class="round {esc(r["outcome"])}" data-round="{r["round"]}" '
        f'title="{esc(r["reason"])}">' + "".join(f"<td>{c}</td>" for c in _cells(r)) + "</tr>"
        for r in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>From <code>{esc(str(state_dir))}</code>: history.jsonl, state.json and the ledger.</p>
<h2>Summary</h2>
<table>{facts}</table>
<h2>Plots</h2>
<div class="plots">{images}</div>
<h2>Rounds</h2>
<table><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
</body></html>
"""

"""Read a run's round history (the aggregator's history.jsonl); turn it into a table, a
metrics JSON and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_history(state_dir: Path) -> list[dict[str, Any]]:
    """The round records of a state directory, oldest first, one per round.

    A round closed again after a crash (between its history line and the commit of
    state.json) has two lines: the later one wins. A torn last line is skipped."""
    path = Path(state_dir) / "history.jsonl"
    if not path.exists():
        return []
    rounds: dict[int, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line a crash cut short
        rounds.pop(record["round"], None)
        rounds[record["round"]] = record
    return list(rounds.values())


def format_table(rounds: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one line per round."""
    head = f"{'round':>5} {'outcome':>9} {'updates':>7} {'accuracy':>8} {'loss':>7} " \
           f"{'wall s':>7} {'up KiB':>9} {'down KiB':>9}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rounds:
        acc = r.get("accuracy")
        loss = r.get("loss")
        lines.append(
            f"{r['round']:>5} {r['outcome']:>9} {r['accepted']:>7} "
            f"{'' if acc is None else f'{acc:.4f}':>8} {'' if loss is None else f'{loss:.4f}':>7} "
            f"{r['wall_s']:>7.2f} {r['bytes_up'] / 1024:>9.1f} {r['bytes_down'] / 1024:>9.1f}"
        )
    return "\n".join(lines)


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a run: rounds, final and best accuracy, bytes up and down."""
    closed = [r for r in rounds if r.get("accuracy") is not None]
    return {
        "rounds": len(rounds),
        "rounds_closed": len(closed),
        "final_accuracy": closed[-1]["accuracy"] if closed else None,
        "best_accuracy": max((r["accuracy"] for r in closed), default=None),
        "final_loss": closed[-1]["loss"] if closed else None,
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
    }


def plot_history(rounds: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Accuracy and loss per round, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in rounds if r.get("accuracy") is not None]
    xs = [r["round"] for r in closed]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(xs, [r["accuracy"] for r in closed], marker=".")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(xs, [r["loss"] for r in closed], marker=".", color="tab:red")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("test loss")
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    rounds: Sequence[dict[str, Any]], run_dir: Path, *, config: dict[str, Any], title: str = ""
) -> dict[str, Any]:
    """Write metrics.json and accuracy.png into run_dir; return the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rounds)
    doc = {"config": config, "summary": summary, "rounds": list(rounds)}
    (run_dir / "metrics.json").write_text(json.dumps(doc, indent=1))
    if any(r.get("accuracy") is not None for r in rounds):
        plot_history(rounds, run_dir / "accuracy.png", title=title)
    return summary

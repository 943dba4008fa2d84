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


def by_version(rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per global version, oldest first: the central test set's `accuracy` and `loss` (from
    the record of the round that made the version) beside the devices' federated evaluation
    (`federated`, from the record of the round that began at it); None where one is missing."""
    versions: dict[int, dict[str, Any]] = {}

    def row(version: Any) -> dict[str, Any] | None:
        if not isinstance(version, int) or isinstance(version, bool):
            return None
        return versions.setdefault(version, {"version": version, "accuracy": None,
                                             "loss": None, "federated": None})  # fmt: skip

    for r in rounds:
        made = row(r.get("version")) if r.get("outcome") != "abandoned" else None
        if made is not None and r.get("accuracy") is not None:
            made["accuracy"], made["loss"] = r.get("accuracy"), r.get("loss")
        fed = r.get("federated")
        began = row(fed.get("version")) if isinstance(fed, dict) else None
        if began is not None:
            began["federated"] = fed
    return [versions[v] for v in sorted(versions)]


def central_vs_federated(rounds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How far the federated accuracy is from the central one over the versions that have
    both: {versions, mean_abs_diff, max_abs_diff}; None when none has both."""
    diffs = [abs(v["accuracy"] - v["federated"]["accuracy"]) for v in by_version(rounds)
             if v["accuracy"] is not None and v["federated"]]  # fmt: skip
    if not diffs:
        return None
    return {"versions": len(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "max_abs_diff": max(diffs)}  # fmt: skip


def format_versions(rounds: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of each version's central and federated accuracy side by side."""
    head = f"{'version':>7} {'central acc':>11} {'federated acc':>13} {'p10..p90':>13} " \
           f"{'devices':>7} {'central loss':>12} {'fed loss':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]

    def num(x: Any, width: int) -> str:
        return f"{'' if x is None else f'{x:.4f}':>{width}}"

    for v in by_version(rounds):
        fed = v["federated"] or {}
        spread = (f"{fed['accuracy_p10']:.3f}..{fed['accuracy_p90']:.3f}"
                  if "accuracy_p10" in fed else "")  # fmt: skip
        lines.append(f"{v['version']:>7} {num(v['accuracy'], 11)} "
                     f"{num(fed.get('accuracy'), 13)} {spread:>13} "
                     f"{fed.get('devices', ''):>7} {num(v['loss'], 12)} "
                     f"{num(fed.get('loss'), 8)}")  # fmt: skip
    return "\n".join(lines)


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
    federated = [v["federated"] for v in by_version(rounds) if v["federated"]]
    return {
        "rounds": len(rounds),
        "rounds_closed": len(closed),
        "final_accuracy": closed[-1]["accuracy"] if closed else None,
        "best_accuracy": max((r["accuracy"] for r in closed), default=None),
        "final_loss": closed[-1]["loss"] if closed else None,
        # the devices' evaluation of the newest version that has one (docs/devices.md)
        "federated_version": federated[-1]["version"] if federated else None,
        "final_federated_accuracy": federated[-1]["accuracy"] if federated else None,
        "central_vs_federated": central_vs_federated(rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
    }


def plot_versions(ax: Any, rounds: Sequence[dict[str, Any]], key: str, color: str) -> None:
    """Draw key ("accuracy" or "loss") per version on ax: the central test set's (a line)
    and the federated evaluation's (dashed; for accuracy with the devices' p10..p90 band)."""
    rows = by_version(rounds)
    central = [(v["version"], v[key]) for v in rows if v[key] is not None]
    fed = [(v["version"], v["federated"]) for v in rows if v["federated"]]
    if central:
        ax.plot(*zip(*central, strict=True), marker=".", color=color, label="central test set")
    if fed:
        xs = [x for x, _ in fed]
        ax.plot(xs, [f[key] for _, f in fed], marker="x", linestyle="--", color=color,
                alpha=0.7, label="federated (devices)")  # fmt: skip
        if key == "accuracy" and all("accuracy_p10" in f for _, f in fed):
            ax.fill_between(xs, [f["accuracy_p10"] for _, f in fed],
                            [f["accuracy_p90"] for _, f in fed], color=color, alpha=0.12,
                            label="devices p10..p90")  # fmt: skip
        ax.legend(fontsize="small")
    ax.set_xlabel("model version")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)


def plot_history(rounds: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Accuracy and loss per version, side by side, as a PNG: central and federated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    plot_versions(ax_acc, rounds, "accuracy", "tab:blue")
    plot_versions(ax_loss, rounds, "loss", "tab:red")
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
    if any(v["accuracy"] is not None or v["federated"] for v in by_version(rounds)):
        plot_history(rounds, run_dir / "accuracy.png", title=title)
    return summary

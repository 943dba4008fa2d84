"""Benchmark personal models on label shards: a real fleet over Mosquitto per strategy.

The fleet benchmark's workload (mnist-2nn, 20 agent processes, 2 label shards each, E=1,
B=10, SGD lr 0.05, 30 rounds, float32 updates) once per strategy: plain FedAvg (the
baseline, no held-out data), `finetune` and `fedper`, each with `personal_steps` local steps
of the personal model. Every device holds out 20% of its shard (its default
holdout_fraction) and reports with each update the global model's accuracy and its
personal model's on it; the aggregator's history has their distribution per round
(`personal`, `global_local`: mean, p10, n). Each run gets its own broker, job and state.

    .venv/bin/python bench/personal.py                          # the issue's workload
    .venv/bin/python bench/personal.py --rounds 3 --devices 4 --strategies finetune

Writes bench/results/personal.json in the issue's schema ({"runs": [{"partition",
"strategy", "setting", "accuracy_per_round", "final_accuracy", "personal_accuracy_mean",
"bytes_up"}]}, plus the per-round distributions) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import TASK, read_history, run_fleet  # noqa: E402

STRATEGIES = ("fedavg", "finetune", "fedper")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, of {', '.join(STRATEGIES)} (default all)")
    p.add_argument("--personal-steps", default="50",
                   help="comma-separated personal_steps to run each personal strategy with")
    p.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    p.add_argument("--devices", type=int, default=20, help="agent processes (default 20)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs E (default 1)")
    p.add_argument("--batch-size", type=int, default=10, help="local batch size B (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    p.add_argument("--codec", default="float32", help="update pipeline (default float32)")
    p.add_argument("--round-timeout-s", type=float, default=120.0,
                   help="round deadline in seconds (default 120)")
    p.add_argument("--out", type=Path, default=Path("bench/results/personal.json"))
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in --out and add these (a grid in parts)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.personal_steps = [int(s) for s in args.personal_steps.split(",") if s.strip()]
    if not args.strategies or set(args.strategies) - set(STRATEGIES):
        p.error(f"--strategies takes {', '.join(STRATEGIES)}, comma-separated")
    return args


def run_one(strategy: str, steps: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run of a strategy in a fresh broker; its record in the issue's schema."""
    from broker.launch import start_fleet_broker
    from fedmq.processes import device_id

    name = strategy if strategy == "fedavg" else f"{strategy}-{steps}"
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    job = f"personal-{name}"
    broker, fleet = start_fleet_broker(
        run_dir, job=job, prefer="mosquitto", devices=[device_id(i) for i in range(args.devices)]
    )
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", TASK]  # fmt: skip
    flags = ["--codec", args.codec, "--no-publish-onnx"]
    if strategy != "fedavg":
        flags += ["--personalization", strategy, "--personal-steps", str(steps)]
    try:
        wall, _, _ = run_fleet(name, args, common=common, partition="shards", run_dir=run_dir,
                               aggregator_flags=flags, fleet=fleet)  # fmt: skip
    finally:
        broker.stop()
    return summarize(strategy, steps, read_history(run_dir / "aggregator"), args, wall, run_dir)


def _stat(record: dict[str, Any], key: str, field: str) -> float | None:
    value = (record.get(key) or {}).get(field)
    return None if value is None else float(value)


def summarize(strategy: str, steps: int, history: list[dict[str, Any]],
              args: argparse.Namespace, wall: float, run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """The run's record: the issue's fields, then the per-round distributions."""
    closed = [r for r in history if r.get("accuracy") is not None]
    last = closed[-1] if closed else {}
    personal = strategy != "fedavg"
    setting = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "codec": args.codec, "devices": args.devices, "rounds": args.rounds}  # fmt: skip
    if personal:
        setting.update(personal_steps=steps, holdout_fraction=0.2)
    return {
        "partition": "shards",
        "strategy": strategy,
        "setting": setting,
        "accuracy_per_round": [r["accuracy"] for r in closed],
        "final_accuracy": last.get("accuracy"),
        "personal_accuracy_mean": _stat(last, "personal", "mean") if personal else None,
        "personal_accuracy_p10": _stat(last, "personal", "p10") if personal else None,
        # the global model on the same held-out shares (its per-device accuracy)
        "global_local_accuracy_mean": _stat(last, "global_local", "mean") if personal else None,
        "global_local_accuracy_p10": _stat(last, "global_local", "p10") if personal else None,
        "personal_mean_per_round": [_stat(r, "personal", "mean") for r in closed],
        "global_local_mean_per_round": [_stat(r, "global_local", "mean") for r in closed],
        "bytes_up": sum(int(r.get("bytes_up") or 0) for r in history),
        "total_wall_s": round(wall, 1),
        "work_dir": str(run_dir),
    }


def workload(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured and on what machine."""
    from fedmq import __version__

    return {
        "task": TASK,
        "partition": "shards: 4000 train samples sorted by label, 2 shards of 100 per device",
        "devices": args.devices, "rounds": args.rounds, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "codec": args.codec,
        "how": "real aggregator and agent processes over Mosquitto (bench/fleet.py run_fleet)",
        "personal": "devices hold out a seeded 20% of their shard; personal_accuracy_* and "
                    "global_local_* are the last round's distribution over its updates",
        "machine": os.cpu_count(), "python": platform.python_version(), "fedmq": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_report(runs: list[dict[str, Any]]) -> str:
    """One row per run."""
    head = (f"{'strategy':<9} {'steps':>5} {'global':>7} {'personal':>8} {'p10':>7} "
            f"{'glob/dev':>8} {'MB up':>8} {'wall s':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r['strategy']:<9} {r['setting'].get('personal_steps', '-'):>5} "
            f"{_pct(r['final_accuracy']):>7} {_pct(r['personal_accuracy_mean']):>8} "
            f"{_pct(r['personal_accuracy_p10']):>7} {_pct(r['global_local_accuracy_mean']):>8} "
            f"{r['bytes_up'] / 1e6:>8.1f} {r['total_wall_s']:>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-personal-"))
    runs = json.loads(args.out.read_text())["runs"] if args.append and args.out.exists() else []
    for strategy in args.strategies:
        for steps in [0] if strategy == "fedavg" else args.personal_steps:
            runs.append(run_one(strategy, steps, args, work))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"workload": workload(args), "runs": runs}, indent=1))
    print(format_report(runs))
    print(f"\nwrote {args.out}; logs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

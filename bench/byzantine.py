"""Benchmark robust aggregation and differential privacy against attacking devices.

The fleet benchmark's workload (bench/fleet.py: mnist-2nn on MNIST 5k, 20 devices, all of
them every round, E=1, B=10, SGD lr 0.05, 30 rounds, IID and label shards), run in one
process: fedmq's own partition and training loop (edge_agent.training.train_local) for
every device, and the aggregator's real admission bounds and aggregation rules
(aggregator.bounds, aggregator.robust) on float32 deltas, without a broker. 4 of the 20
devices attack in every round:

    replacement  delta = -global (drives the model to zero), claiming 10,000,000 examples
    signflip     -10 x its honest delta
    noise        N(0, 1) in every coordinate instead of a delta
    labelflip    trains honestly on labels 9 - y

Rules: `fedavg` with no bounds (the service before issue 9: example cap 10,000,000, no
norm bound), `default` (FedAvg with the default admission: the adaptive L2 bound, 3 x
the previous round's median norm, with clipping, and the example cap: each device
enrolled with its own dataset size in the fleet file), and `median`, `trimmed_mean`
(trim 0.2), `krum` (Multi-Krum, f = 4), `clip` (C = the previous round's median norm,
updates weighed alike), each with the default admission in front. Central DP (IID):
`clip` with a fixed C and Gaussian noise on the sum, z calibrated with dp-accounting
for epsilon 1, 4, 8 at delta 1e-5 over the 30 rounds (every device takes part: q = 1).
Local DP (IID): every device clips its delta to C and adds N(0, (z C)^2) before
upload (edge_agent.privacy), z for the same epsilons per device (sensitivity 2C).

    .venv/bin/python bench/byzantine.py                 # everything, ~15 minutes
    .venv/bin/python bench/byzantine.py --rounds 3 --partitions iid --attacks none,noise

Writes bench/results/byzantine.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# bench/aggregator.py's folder on sys.path would shadow the aggregator package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from aggregator.bounds import (  # noqa: E402
    MAX_EXAMPLES_LIMIT,
    adaptive_bound,
    example_cap,
    first_round_bound,
    round_example_cap,
)
from aggregator.privacy import local_noise_for_epsilon, noise_for_epsilon  # noqa: E402
from aggregator.robust import make_rule, round_bound  # noqa: E402
from aggregator.server_opt import make_server_optimizer  # noqa: E402
from aggregator.settings import AggregatorSettings  # noqa: E402
from edge_agent.privacy import privatize  # noqa: E402
from fedmq.errors import ProtocolError  # noqa: E402

TASK = "mnist-2nn"
ATTACKS = ("none", "replacement", "signflip", "noise", "labelflip")
RULES = ("fedavg", "default", "median", "trimmed_mean", "krum", "clip")
ATTACKERS = 4
EPSILONS = (1.0, 4.0, 8.0)
DP_DELTA = 1e-5
DP_CLIP = 1.0  # C for central and local DP, fixed before the run (see --dp-clip)


@dataclass(frozen=True)
class Run:
    """One configuration of the bench."""

    partition: str
    attack: str
    rule: str
    central_z: float = 0.0  # central DP noise multiplier (rule clip, fixed C)
    local_z: float = 0.0  # local DP noise multiplier on every device
    epsilon: float = 0.0  # the DP target z was calibrated for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    p.add_argument("--devices", type=int, default=20, help="devices (default 20)")
    p.add_argument("--partitions", default="iid,shards", help="iid and/or shards")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    p.add_argument("--no-dp", action="store_true", help="skip the DP runs")
    p.add_argument("--dp-clip", type=float, default=DP_CLIP, help="C of central and local DP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs measured at once, one process each (default: 2 or the CPUs); "
                        "every run is seeded, so the numbers do not depend on it")
    p.add_argument("--no-fleet-file", action="store_true",
                   help="bounded rules without the fleet file's per-device example caps "
                        "(only the max_examples policy)")
    p.add_argument("--out", type=Path, default=Path("bench/results/byzantine.json"))
    # fmt: on
    a = p.parse_args(argv)
    a.partitions = [x for x in a.partitions.split(",") if x]
    a.attacks = [x for x in a.attacks.split(",") if x]
    a.rules = [x for x in a.rules.split(",") if x]
    if (
        set(a.partitions) - {"iid", "shards"}
        or set(a.attacks) - set(ATTACKS)
        or (set(a.rules) - set(RULES))
    ):
        p.error("unknown partition, attack or rule")
    return a


class Fleet:
    """The devices' data, the model and the test set: shared by every run."""

    def __init__(self, *, partition: str, devices: int, seed: int) -> None:
        import torch

        from fedmq.tasks import get_task
        from fedmq.tasks.partition import device_data
        from fedmq.wire import specs_of

        torch.set_num_threads(1)
        self.task = get_task(TASK)
        self.data = [device_data(self.task, scheme=partition, num_devices=devices,
                                 device_index=i, seed=0) for i in range(devices)]  # fmt: skip
        self.test = self.task.load_test()
        self.seed = seed
        self.model = self.task.build_model()
        self.specs = specs_of(self.initial())

    def initial(self) -> dict[str, np.ndarray]:
        """Version 0 as the aggregator makes it (torch seeded with the job's seed)."""
        import torch

        from fedmq.tasks.weights import get_weights

        torch.manual_seed(self.seed)
        return get_weights(self.task.build_model())

    def train(self, weights: dict[str, np.ndarray], i: int, round_id: int, *,
              flip: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
        """Device i's delta for one round, as the agent trains it (E=1, B=10, lr 0.05)."""
        from edge_agent.training import Budget, train_local
        from fedmq.tasks.weights import get_weights, set_weights
        from fedmq.wire import TrainConfig

        x, y = self.data[i]
        set_weights(self.model, weights)
        train_local(self.model, x, 9 - y if flip else y,
                    config=TrainConfig(epochs=1, batch_size=10, lr=0.05, momentum=0.0),
                    budget=Budget(max_seconds=1e9, max_memory_mb=1 << 20),
                    seed=round_id * 100_003 + i)  # fmt: skip
        trained = get_weights(self.model)
        return {k: trained[k] - weights[k] for k in weights}

    def accuracy(self, weights: dict[str, np.ndarray]) -> float:
        """Test accuracy of a global model."""
        from fedmq.tasks.weights import evaluate, set_weights

        set_weights(self.model, weights)
        return float(evaluate(self.model, *self.test)["accuracy"])


Weights = dict[str, np.ndarray]


def attack_update(attack: str, *, honest: Weights, weights: Weights, n: int,
                  rng: np.random.Generator) -> tuple[Weights, int]:  # fmt: skip
    """What an attacking device sends instead of its honest (delta, examples)."""
    if attack == "replacement":
        return {k: -w for k, w in weights.items()}, MAX_EXAMPLES_LIMIT
    if attack == "signflip":
        return {k: -10.0 * d for k, d in honest.items()}, n
    if attack == "noise":
        return {k: rng.normal(0.0, 1.0, d.shape).astype(np.float32) for k, d in honest.items()}, n
    return honest, n  # labelflip trains on flipped labels; none is honest


def run_one(
    fleet: Fleet, run: Run, *, rounds: int, clip: float, seed: int, fleet_file: bool = True
) -> float:
    """Final test accuracy of one configuration after `rounds` rounds."""
    s = AggregatorSettings(insecure=True)
    devices = len(fleet.data)
    attackers = set(range(0, devices, max(1, devices // ATTACKERS))[:ATTACKERS])
    bounded = run.rule != "fedavg"
    rule = "fedavg" if run.rule == "default" else run.rule
    # each device enrolled with its dataset size; fedavg: the service before issue 9
    enrolled = ({str(i): len(fleet.data[i][0]) for i in range(devices)}
                if bounded and fleet_file else {})  # fmt: skip
    max_examples = s.max_examples if bounded else MAX_EXAMPLES_LIMIT
    rng = np.random.default_rng([seed, len(run.attack), len(run.rule)])
    weights = fleet.initial()
    specs = fleet.specs
    optimizer = make_server_optimizer(s, specs)  # the settings' (sgd: FedAvg)
    median = median_examples = 0.0
    for round_id in range(1, rounds + 1):
        # the service's adaptive example cap (examples_factor x the last round's median)
        round_cap = round_example_cap(s.examples_factor, median_examples) if bounded else 0
        bound = round_bound(fixed=0.0, factor=s.norm_bound_factor if bounded else 0.0,
                            median_norm=median)  # fmt: skip
        if bounded and not bound and not median:  # the service's first round
            bound = first_round_bound(weights)
        if run.central_z:
            acc = make_rule(specs=specs, rule="clip", bound=bound, clip_norm=clip,
                            noise_multiplier=run.central_z, rng=rng)  # fmt: skip
        else:
            acc = make_rule(specs=specs, rule=rule, bound=bound, median_norm=median,
                            trim=s.trim_fraction, krum_f=ATTACKERS, krum_m=s.krum_m)  # fmt: skip
        norms, counts = [], []
        for i in range(devices):
            attacking = run.attack != "none" and i in attackers
            delta = fleet.train(weights, i, round_id,
                                flip=attacking and run.attack == "labelflip")  # fmt: skip
            n = len(fleet.data[i][0])
            if attacking:
                delta, n = attack_update(run.attack, honest=delta, weights=weights, n=n, rng=rng)
            if run.local_z:
                delta = privatize(delta, clip=clip, noise_multiplier=run.local_z, rng=rng)
            n = min(n, example_cap(str(i), max_examples=max_examples, enrolled=enrolled))
            claimed = n
            if round_cap:
                n = min(n, round_cap)
            try:
                p = acc.prepare(delta, float(n))
            except ProtocolError:  # refused (non-finite or absurd), as the service would
                continue
            acc.add_prepared(p)
            norms.append(p.l2)
            counts.append(float(claimed))
        if acc.count:  # otherwise the round is abandoned and the model kept
            weights = optimizer.step(weights, acc.mean())
            optimizer.commit(round_id)
            median = adaptive_bound(norms, 1.0)
            median_examples = adaptive_bound(counts, 1.0)
        if os.environ.get("BYZANTINE_TRACE"):
            print(f"  round {round_id}: median norm {median:.3f}", file=sys.stderr)
    return fleet.accuracy(weights)


_FLEETS: dict[tuple[str, int, int], Fleet] = {}


def measure(run: Run, devices: int, seed: int, rounds: int, clip: float,
            fleet_file: bool) -> float:  # fmt: skip
    """One run in this process (the fleet's data loaded once per process and partition)."""
    key = (run.partition, devices, seed)
    if key not in _FLEETS:
        _FLEETS[key] = Fleet(partition=run.partition, devices=devices, seed=seed)
    return run_one(_FLEETS[key], run, rounds=rounds, clip=clip, seed=seed, fleet_file=fleet_file)


def plan(args: argparse.Namespace) -> list[Run]:
    """Every configuration to run, in order."""
    runs = [Run(p, a, r) for p in args.partitions for a in args.attacks for r in args.rules]
    if not args.no_dp and "iid" in args.partitions:
        for eps in EPSILONS:
            z = noise_for_epsilon(epsilon=eps, delta=DP_DELTA, rounds=args.rounds, q=1.0)
            runs.append(Run("iid", "none", "clip", central_z=z, epsilon=eps))
        for eps in EPSILONS:
            z = local_noise_for_epsilon(epsilon=eps, delta=DP_DELTA, rounds=args.rounds)
            runs.append(Run("iid", "none", "default", local_z=z, epsilon=eps))
    return runs


def tls_round_times(path: Path = Path("bench/results/tls.json")) -> dict[str, float] | None:
    """Median round wall time of a plain and an mTLS fleet, as bench/tls_cost.py measured
    them side by side (real processes over two Mosquittos; this benchmark runs in-process
    and cannot); None until that has run."""
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: measured[k] for k in ("median_round_s_plain", "median_round_s_mtls")}


def format_table(result: dict[str, Any]) -> str:
    """Final accuracy per attack (rows) and rule (columns), per partition; then DP."""
    lines = []
    for part in sorted({r["partition"] for r in result["runs"]}):
        cells = {(r["attack"], r["rule"]): r["final_accuracy"]
                 for r in result["runs"] if r["partition"] == part}  # fmt: skip
        rules = [r for r in RULES if any(k[1] == r for k in cells)]
        head = f"{part:<12}" + "".join(f"{r:>13}" for r in rules)
        lines += [head, "-" * len(head)]
        for attack in ATTACKS:
            if any(k[0] == attack for k in cells):
                vals = [cells.get((attack, r)) for r in rules]
                lines.append(f"{attack:<12}" + "".join(
                    f"{'-' if v is None else f'{v:.4f}':>13}" for v in vals))  # fmt: skip
        lines.append("")
    if result["dp"]:
        lines += [f"{'DP (iid)':<10}{'epsilon':>9}{'delta':>9}{'z':>9}{'accuracy':>10}",
                  "-" * 47]  # fmt: skip
        for d in result["dp"]:
            lines.append(f"{d['mode']:<10}{d['epsilon']:>9g}{d['delta']:>9g}"
                         f"{d['noise_multiplier']:>9.3f}{d['final_accuracy']:>10.4f}")  # fmt: skip
    return "\n".join(lines)


def result_row(result: dict[str, Any], run: Run, acc: float, clip: float) -> None:
    """File one run's final accuracy under runs, or dp for a DP run."""
    if run.central_z or run.local_z:
        result["dp"].append({"mode": "central" if run.central_z else "local",
                             "epsilon": run.epsilon, "delta": DP_DELTA, "final_accuracy": acc,
                             "noise_multiplier": run.central_z or run.local_z,
                             "clip_norm": clip})  # fmt: skip
    else:
        result["runs"].append({"partition": run.partition, "attack": run.attack,
                               "rule": run.rule, "final_accuracy": acc})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, write the JSON, print the table."""
    args = parse_args(argv)
    result: dict[str, Any] = {"runs": [], "dp": [], "tls": tls_round_times()}
    started = time.monotonic()
    todo = plan(args)
    job = (args.devices, args.seed, args.rounds, args.dp_clip, not args.no_fleet_file)
    with ProcessPoolExecutor(
        max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = [pool.submit(measure, run, *job) for run in todo]
        for k, (run, future) in enumerate(zip(todo, futures, strict=True), 1):
            acc = future.result()
            print(
                f"[{k}/{len(todo)}] {run.partition} {run.attack} {run.rule} "
                f"z={run.central_z or run.local_z:.3g}: {acc:.4f} "
                f"({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
            result_row(result, run, acc, args.dp_clip)
    result["workload"] = {
        "task": TASK, "devices": args.devices, "attackers": ATTACKERS, "rounds": args.rounds,
        "epochs": 1, "batch_size": 10, "lr": 0.05, "in_process": True,
        "default_admission": "L2 bound 3 x previous round's median norm (clipped; round 1: the "
                             "model's norm), num_examples capped at examples_factor x the "
                             "previous round's median claim (round 1: alike)"
                             + (", and at each device's enrolled dataset size (fleet file)"
                                if not args.no_fleet_file else " (no fleet file)"),
        "krum_f": ATTACKERS, "trim_fraction": 0.2, "dp_partition": "iid", "jobs": args.jobs,
        "wall_s": round(time.monotonic() - started, 1), "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the strategies of issue 12 on skewed data: FedAvg, FedProx, SCAFFOLD,
FedNova, FedAvgM, FedAdam, FedYogi and FedAdagrad, each over a small tuning grid.

The workload is the fleet benchmark's (bench/fleet.py): task `mnist-2nn`, 20 devices, all
of them every round, E = 1, B = 10, SGD lr 0.05, 30 rounds, float32 updates; on label
shards (2 shards of 100 per device) and on Dirichlet(alpha) splits, alpha 0.1 and 0.5.

**How it runs (default: in process).** The full grid is 17 settings x 3 partitions x 30
rounds x 20 devices; through Mosquitto with 20 agent processes each run takes minutes, too
long for the shared 2-core machine it was measured on. So by default one process drives
the very code the agent and the aggregator run: per device `edge_agent.training.
train_local` (with FedProx's prox_mu and SCAFFOLD's correction), `fedmq.correction.
with_control` and `edge_agent.updates.build_update` (the bytes a device would publish,
counted as bytes_up), then `aggregator.admission.Admission` (decode and validate against
the update specs), the round's rule (`aggregator.fedavg.RunningSum`, wrapped by
`aggregator.scaffold.ScaffoldRule` for SCAFFOLD, weights by `aggregator.localwork` for
FedNova), `aggregator.server_opt.make_server_optimizer` and `aggregator.scaffold.
ServerControl`. Seeds are those of the real processes (model seed 0, device seed
round x 100003 + index, data seed 0). What it leaves out is the transport: chunking,
acks, retries, deadlines (every device answers every round).

`--broker STRATEGY:SETTING` instead runs that one configuration end to end (one
Mosquitto, one aggregator, 20 agent processes, bench/fleet.run_fleet) on the first
partition given and reports it the same way.

    .venv/bin/python bench/strategies.py                 # the whole grid, in process
    .venv/bin/python bench/strategies.py --partitions shards --rounds 5
    .venv/bin/python bench/strategies.py --broker adam:0.01 --partitions shards

Writes bench/results/strategies.json (schema of issue 12; "selection" and the personal
runs are merged from bench/results/selection.json and personal.json when they exist),
strategies.png and prints a table. Tuned = the grid point with the best final accuracy
per strategy and partition.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TASK = "mnist-2nn"
ROOT = Path(__file__).resolve().parent.parent
# bench/aggregator.py would shadow the aggregator package when run as a script
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

# strategy -> (what the setting sets, the grid searched)
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "fedavg": ("", (0.0,)),
    "fedprox": ("prox_mu", (0.001, 0.01, 0.1)),
    "scaffold": ("server_lr", (1.0,)),
    "fednova": ("server_lr", (1.0,)),
    "fedavgm": ("server_lr", (0.3, 1.0)),
    "fedadam": ("server_lr", (0.003, 0.01, 0.03, 0.1, 0.3)),
    "fedyogi": ("server_lr", (0.003, 0.01, 0.03, 0.1, 0.3)),
    "fedadagrad": ("server_lr", (0.03, 0.1, 0.3)),
}
OPTIMIZER = {"fedavgm": "avgm", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
PARTITIONS = {"shards": ("shards", 0.5), "dirichlet0.1": ("dirichlet", 0.1),
              "dirichlet0.5": ("dirichlet", 0.5)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload and grid."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--partitions", default="shards,dirichlet0.1,dirichlet0.5")
    p.add_argument("--strategies", default=",".join(GRID))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tune-on", default="",
                   help="search the grid on this partition only and run the others at its "
                        "tuned setting (default: search on every partition)")
    p.add_argument("--broker", default="", metavar="STRATEGY:SETTING",
                   help="run this one configuration through Mosquitto and real agents")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a .partial.jsonl of an earlier run with the same workload: its runs "
                        "are kept and not run again")
    p.add_argument("--round-timeout-s", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/strategies.json")
    # fmt: on
    a = p.parse_args(argv)
    a.partitions = [s for s in a.partitions.split(",") if s]
    a.strategies = [s for s in a.strategies.split(",") if s]
    if set(a.partitions) - set(PARTITIONS) or set(a.strategies) - set(GRID):
        p.error(f"partitions: {', '.join(PARTITIONS)}; strategies: {', '.join(GRID)}")
    return a


def aggregator_settings(strategy: str, setting: float) -> SimpleNamespace:
    """What make_server_optimizer and the round need of the aggregator's settings."""
    return SimpleNamespace(
        server_optimizer=OPTIMIZER.get(strategy, "sgd"),
        server_lr=setting if GRID[strategy][0] == "server_lr" else 0.0,
        server_momentum=0.9, server_beta2=0.99, server_tau=1e-3,
        prox_mu=setting if strategy == "fedprox" else 0.0,
        client_correction="scaffold" if strategy == "scaffold" else "none",
        normalize_local_work=strategy == "fednova",
    )  # fmt: skip


def run_in_process(partition: str, strategy: str, setting: float,
                   args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One configuration, driven in this process through the agent's and aggregator's code."""
    import torch

    from aggregator.admission import Admission
    from aggregator.fedavg import RunningSum
    from aggregator.localwork import normalize, rescale, tau_effective
    from aggregator.modes import Contribution
    from aggregator.scaffold import ScaffoldRule, ServerControl
    from aggregator.server_opt import make_server_optimizer
    from edge_agent.training import Budget, train_local
    from edge_agent.updates import BuiltUpdate, build_update, update_rng
    from fedmq.correction import gradient_correction, update_specs, with_control, zeros_like
    from fedmq.tasks import get_task
    from fedmq.tasks.partition import device_data
    from fedmq.tasks.weights import evaluate, get_weights, set_weights
    from fedmq.wire import RoundAnnouncement, TrainConfig, specs_of

    torch.set_num_threads(1)  # like each agent process of the fleet benchmark
    s = aggregator_settings(strategy, setting)
    scheme, alpha = PARTITIONS[partition]
    task = get_task(TASK)
    data = [device_data(task, scheme=scheme, num_devices=args.devices, device_index=i,
                        seed=0, alpha=alpha) for i in range(args.devices)]  # fmt: skip
    torch.manual_seed(0)
    server_model = task.build_model()
    weights = get_weights(server_model)
    specs = specs_of(weights)
    device_model = task.build_model()
    x_test, y_test = task.load_test()
    optimizer = make_server_optimizer(s, specs)
    scaffold = s.client_correction == "scaffold"
    control = ServerControl(specs=specs)
    c_local = [zeros_like(weights) for _ in range(args.devices)]
    admission = Admission(specs=update_specs(specs, s.client_correction),
                          max_update_bytes=64 << 20)  # fmt: skip
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        prox_mu=s.prox_mu, correction=s.client_correction)  # fmt: skip
    accs: list[float] = []
    bytes_up = 0
    for rnd in range(1, args.rounds + 1):
        ann = RoundAnnouncement(job="bench", round_id=rnd, model_version=rnd - 1, state="open",
                                opened_at=0.0, deadline=0.0, selected=(), target=args.devices,
                                min_devices=args.devices, train=train, codec="float32")  # fmt: skip
        rule: Any = RunningSum(specs=specs)
        if scaffold:
            rule = ScaffoldRule(inner=rule, specs=specs, lr=args.lr, c_norm=control.norm())
        c_pub = control.published
        participants = []
        for i, (x, y) in enumerate(data):
            set_weights(device_model, weights)
            corr = gradient_correction(c_pub, c_local[i]) if scaffold else None
            res = train_local(device_model, x, y, config=train, budget=Budget(),
                              seed=rnd * 100_003 + i, correction=corr)  # fmt: skip
            base, trained = weights, get_weights(device_model)
            if scaffold:
                base, trained, c_local[i] = with_control(
                    base=base, trained=trained, c_server=c_pub, c_local=c_local[i],
                    steps=res.steps, lr=args.lr)  # fmt: skip
            device = f"device-{i:02d}"
            built = build_update(
                announcement=ann, device=device, update_id=uuid.uuid4().hex, base=base,
                trained=trained, residual=None, profile_max_bytes=0,
                num_examples=min(len(x), max(1, res.examples)),
                metrics={"train_loss": res.mean_loss, "local_steps": float(res.steps)},
                fetched_bytes=0, rng=update_rng(rnd, device),
            )  # fmt: skip
            assert isinstance(built, BuiltUpdate), built
            bytes_up += len(built.payload)
            u = admission.decode(built.payload, device=device, payload_id=built.update_id)
            tensors = admission.validate(u)
            given = Contribution(weight=float(u.num_examples), norm=float(u.num_examples))
            if s.normalize_local_work:
                given = normalize(given, u, train)
            rule.add_prepared(rule.prepare(tensors, given.weight, norm=given.norm))
            participants.append({"examples": u.num_examples, **given.record})
        mean = rule.mean()
        if s.normalize_local_work:
            mean = rescale(mean, tau_effective(participants))
        weights = optimizer.step(weights, mean)
        optimizer.commit(rnd)
        if scaffold:
            control.step(rule.mean_control(), participating=args.devices,
                         population=args.devices)  # fmt: skip
            control.commit(rnd)
        set_weights(server_model, weights)
        accs.append(round(float(evaluate(server_model, x_test, y_test)["accuracy"]), 4))
    return {"partition": partition, "strategy": strategy,
            "setting": setting_name(strategy, setting),
            "accuracy_per_round": accs, "final_accuracy": accs[-1],
            "personal_accuracy_mean": None, "bytes_up": bytes_up,
            "driver": "in-process"}  # fmt: skip


def run_broker(partition: str, strategy: str, setting: float,
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One configuration end to end: Mosquitto, the aggregator and args.devices agents."""
    import importlib.util

    from broker.launch import start_fleet_broker

    spec = importlib.util.spec_from_file_location("bench_fleet", ROOT / "bench" / "fleet.py")
    assert spec is not None and spec.loader is not None
    fleet_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fleet_bench)
    run_fleet = fleet_bench.run_fleet

    from fedmq.processes import device_id
    from fedmq.report import read_history

    s = aggregator_settings(strategy, setting)
    scheme, alpha = PARTITIONS[partition]
    work = Path(tempfile.mkdtemp(prefix="fedmq-strategies-"))
    job = f"bench-{strategy}"
    broker, fleet = start_fleet_broker(work, job=job, prefer="mosquitto",
                                       devices=[device_id(i) for i in range(args.devices)])
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", TASK]  # fmt: skip
    if scheme == "dirichlet" and alpha != 0.5:  # run_fleet passes no alpha to the agents
        raise SystemExit(f"--broker runs shards and dirichlet0.5 (the agents' alpha), "
                         f"not {partition}")  # fmt: skip
    flags = ["--codec", "float32", "--server-optimizer", s.server_optimizer,
             "--prox-mu", str(s.prox_mu), "--client-correction", s.client_correction]
    if s.server_lr:
        flags += ["--server-lr", str(s.server_lr)]
    if s.normalize_local_work:
        flags += ["--normalize-local-work"]
    try:
        run_fleet(f"{strategy} {partition}", args, common=common, partition=scheme,
                  run_dir=work, aggregator_flags=flags, fleet=fleet)  # fmt: skip
    finally:
        broker.stop()
    history = read_history(work / "aggregator")
    accs = [round(float(r["accuracy"]), 4) for r in history if r.get("accuracy") is not None]
    return {"partition": partition, "strategy": strategy,
            "setting": setting_name(strategy, setting),
            "accuracy_per_round": accs, "final_accuracy": accs[-1] if accs else None,
            "personal_accuracy_mean": None,
            "bytes_up": sum(int(r.get("bytes_up", 0)) for r in history), "driver": "broker",
            "work_dir": str(work)}  # fmt: skip


def setting_name(strategy: str, setting: float) -> str:
    """What a grid point sets, e.g. "server_lr=0.01"; "" for FedAvg."""
    key = GRID[strategy][0]
    return f"{key}={setting:g}" if key else ""


def rounds_to(accs: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reached target, or None."""
    return next((i + 1 for i, a in enumerate(accs) if a >= target), None)


def summarise(runs: list[dict[str, Any]]) -> None:
    """Add best accuracy, rounds to FedAvg's final accuracy and the tuned flag in place."""
    for part in {r["partition"] for r in runs}:
        mine = [r for r in runs if r["partition"] == part]
        fedavg = next((r for r in mine if r["strategy"] == "fedavg"), None)
        for r in mine:
            r["best_accuracy"] = max(r["accuracy_per_round"])
            r["rounds_to_fedavg_final"] = (rounds_to(r["accuracy_per_round"],
                                                     fedavg["final_accuracy"])
                                           if fedavg else None)  # fmt: skip
        for strategy in {r["strategy"] for r in mine}:
            grid = [r for r in mine if r["strategy"] == strategy]
            best = max(grid, key=lambda r: r["final_accuracy"])
            for r in grid:
                r["tuned"] = r is best


def table(runs: list[dict[str, Any]]) -> str:
    """The tuned run of every strategy per partition, one line each."""
    lines = [f"{'partition':<13} {'strategy':<11} {'setting':<16} {'final':>6} {'best':>6} "
             f"{'r->FedAvg':>9} {'MB up':>7}"]  # fmt: skip
    for r in runs:
        if not r.get("tuned"):
            continue
        to = r["rounds_to_fedavg_final"]
        lines.append(f"{r['partition']:<13} {r['strategy']:<11} {r['setting'] or '-':<16} "
                     f"{r['final_accuracy']:>6.4f} {r['best_accuracy']:>6.4f} "
                     f"{to if to is not None else '-':>9} {r['bytes_up'] / 1e6:>7.1f}")  # fmt: skip
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round of each tuned strategy, one panel per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in PARTITIONS if any(r["partition"] == p for r in runs)]
    style = {name: (f"C{i}", "-") for i, name in enumerate(GRID)}
    style["fedavg"] = ("black", "--")  # on top: strategies equal to FedAvg hide under it
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        tuned = {r["strategy"]: r for r in runs if r["partition"] == part and r.get("tuned")}
        for name in [*(n for n in GRID if n != "fedavg"), "fedavg"]:
            if name not in tuned:
                continue
            r = tuned[name]
            color, line = style[name]
            ax.plot(range(1, len(r["accuracy_per_round"]) + 1), r["accuracy_per_round"],
                    color=color, linestyle=line,
                    label=f"{name} {r['setting']}".strip())  # fmt: skip
        ax.set_title(f"mnist-2nn, {part}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merged(runs: list[dict[str, Any]], results: Path) -> dict[str, Any]:
    """The issue's schema: these runs, the personal runs and the selection results of
    bench/personal.py and bench/selection.py when they have been written."""
    out: dict[str, Any] = {"runs": list(runs), "selection": []}
    personal, selection = results / "personal.json", results / "selection.json"
    if personal.exists():
        out["runs"] += json.loads(personal.read_text()).get("runs", [])
    if selection.exists():
        keep = ("policy", "time_to_85_s", "rounds_to_85", "final_accuracy")
        out["selection"] = [{k: s[k] for k in keep if k in s}
                            for s in json.loads(selection.read_text()).get("selection", [])]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the grid (or one --broker configuration), write JSON and PNG, print a table."""
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    if args.reuse is not None:
        runs = [json.loads(line) for line in args.reuse.read_text().splitlines() if line]
        keyed = {(r["partition"], r["strategy"], r["setting"]): r for r in reversed(runs)
                 if r["partition"] in args.partitions and r["strategy"] in args.strategies}
        runs = list(reversed(keyed.values()))  # one per configuration, the first kept
    done = {(r["partition"], r["strategy"], r["setting"]) for r in runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.broker:
        strategy, _, value = args.broker.partition(":")
        runs.append(run_broker(args.partitions[0], strategy, float(value or 0), args))
    else:
        order = sorted(args.partitions, key=lambda p: p != args.tune_on)
        for part in order:
            for strategy in args.strategies:
                grid = GRID[strategy][1]
                if args.tune_on and part != args.tune_on and len(grid) > 1:
                    tuned = [r for r in runs if r["partition"] == args.tune_on
                             and r["strategy"] == strategy]  # fmt: skip
                    if tuned:
                        best = max(tuned, key=lambda r: r["final_accuracy"])
                        grid = tuple(v for v in grid
                                     if setting_name(strategy, v) == best["setting"])
                for value in grid:
                    if (part, strategy, setting_name(strategy, value)) in done:
                        continue
                    t0 = time.monotonic()
                    runs.append(run_in_process(part, strategy, value, args))
                    r = runs[-1]
                    with args.out.with_suffix(".partial.jsonl").open("a") as fh:
                        fh.write(json.dumps(r) + "\n")  # a run cut short keeps what it did
                    print(f"{part:<13} {strategy:<11} {r['setting']:<16} final "
                          f"{r['final_accuracy']:.4f} best {max(r['accuracy_per_round']):.4f} "
                          f"({time.monotonic() - t0:.0f}s)", flush=True)  # fmt: skip
    summarise(runs)
    doc = merged(runs, args.out.parent)
    doc["meta"] = {"task": TASK, "devices": args.devices, "rounds": args.rounds,
                   "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "grid": {k: list(v[1]) for k, v in GRID.items()},
                   "tuned_on": args.tune_on or "each partition",
                   "driver": "broker" if args.broker else "in-process",
                   "wall_s": round(time.monotonic() - start, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(table(runs))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

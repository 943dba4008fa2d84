"""Benchmark what a device pays to run fedmq: peak memory and CPU of the agent.

Runs, each in a fresh secured Mosquitto (broker.launch.start_fleet_broker) with its fleet,
one aggregator and the agents:

- infer: one inference-only agent (`--infer-only --profile sensor-infer`, torch made
  unimportable) follows the global versions of mnist-2nn that two training agents make
  over --rounds rounds (each version's ONNX export fetched, verified and swapped in), then
  serves --predictions predictions one request at a time on its local API (Unix socket);
  latency is measured by the client, request sent to answer read.
- train: one training agent per task (mnist-2nn, mnist-cnn and the sensor task) over
  --rounds rounds, beside a second agent so the rounds are real.

The agents run with `--on-done idle`: once the aggregator has ended and the measured agent
serves the last version, its peak RSS (VmHWM) and CPU seconds (utime + stime) are read
from /proc/<pid> while it is alive, then it is stopped. (ru_maxrss from os.wait4 would not
do: on Linux it survives exec, so a child reports at least its parent's peak.)

Baselines, each a `python -c` of its own that reports its own VmHWM: `import onnxruntime`,
`import torch`, and per training task the bare workload: torch, the model and the same
device data, trained for the same local epochs with plain SGD. A training agent's overhead
is its peak minus that bare workload's.

    .venv/bin/python bench/footprint.py                     # the issue's workload
    .venv/bin/python bench/footprint.py --rounds 3 --predictions 100 --tasks mnist-2nn

Writes bench/results/footprint.json and prints a table (MiB, seconds, milliseconds).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.processes import ROLE_ENV, device_id, stop_all
from fedmq.report import read_history

SENSOR_TASK = "plaid-cnn"
TASKS = ("mnist-2nn", "mnist-cnn", SENSOR_TASK)
INFER_TASK = "mnist-2nn"
EPOCHS, BATCH, LR = 1, 10, 0.05
DEVICES = 2  # the training agents sharing each task's pool: the measured one and one more
INFER_DEVICE = "sensor-00"

# the agent as an inference-only device runs it: torch (and the bundled datasets) absent
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sklearn", "mlxtend"):
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, NoTorch())
from fedmq.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; the defaults are the issue's workload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--rounds", type=int, default=10, help="rounds (global versions) per run "
                   "(default 10)")
    p.add_argument("--predictions", type=int, default=1000,
                   help="predictions the inference-only agent serves (default 1000)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"training tasks, comma-separated (default {','.join(TASKS)}; "
                        "'' for none)")
    p.add_argument("--no-infer", action="store_true", help="skip the inference-only run")
    p.add_argument("--out", type=Path, default=Path("bench/results/footprint.json"),
                   help="JSON output (default bench/results/footprint.json)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state and logs (default: a new temp directory, removed)")
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
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            env={**os.environ, **ROLE_ENV},
        )  # fmt: skip


def proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS MiB, CPU seconds) of a live process: VmHWM and utime + stime."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return hwm / 1024.0, ticks / os.sysconf("SC_CLK_TCK")


# a baseline reports its own peak and CPU as it ends (os.times: this process only)
REPORT = """
import os
_t = os.times()
_hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print('FOOTPRINT', _hwm / 1024.0, _t.user + _t.system)
"""


def python_usage(code: str, log: Path, timeout_s: float = 900) -> tuple[float, float]:
    """(peak RSS MiB, CPU s) of `python -c code` in a process of its own."""
    out = subprocess.run([sys.executable, "-c", code + REPORT], capture_output=True,
                         text=True, timeout=timeout_s, env={**os.environ, **ROLE_ENV})  # fmt: skip
    log.write_text(out.stdout + out.stderr)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("FOOTPRINT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"baseline failed ({out.returncode}): see {log}")
    _, peak, cpu = lines[-1].split()
    return float(peak), float(cpu)


BARE_TRAIN = """
import torch, numpy as np
from fedmq.tasks import get_task, release_bundled_data
from fedmq.tasks.partition import device_data
torch.set_num_threads(1)
task = get_task({task!r})
x, y = device_data(task, scheme="iid", num_devices={devices}, device_index=0, seed=0, alpha=0.5)
release_bundled_data()  # as the agent does: its share only
model = task.build_model()
opt = torch.optim.SGD(model.parameters(), lr={lr})
xt, yt = torch.from_numpy(x), torch.from_numpy(y)
for _ in range({rounds} * {epochs}):
    for i in range(0, len(xt), {batch}):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[i:i+{batch}]), yt[i:i+{batch}]).backward()
        opt.step()
"""


def baselines(
    work: Path, tasks: list[str], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """({import_onnxruntime_mb, import_torch_mb}, {task: bare torch + model + data MiB})."""
    ort_mb, _ = python_usage("import onnxruntime", work / "baseline-ort.log")
    torch_mb, _ = python_usage("import torch", work / "baseline-torch.log")
    bare = {}
    for task in tasks:
        code = BARE_TRAIN.format(task=task, devices=DEVICES, lr=LR, rounds=rounds,
                                 epochs=EPOCHS, batch=BATCH)  # fmt: skip
        bare[task], _ = python_usage(code, work / f"baseline-{task}.log")
    return {"import_onnxruntime_mb": round(ort_mb, 1), "import_torch_mb": round(torch_mb, 1)}, bare


# ---------------------------------------------------------------- the local API's client


def call(sock: Path, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """(HTTP status, JSON body) of one request on the agent's Unix socket; (0, None) while
    nothing listens there."""
    conn = http.client.HTTPConnection("localhost", timeout=30)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.sock.connect(str(sock))
        conn.request(method, path, body=body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    except (FileNotFoundError, ConnectionRefusedError):
        return 0, None
    finally:
        conn.close()


def serving(sock: Path) -> int:
    """The version the agent serves, -1 before one (or before its API listens)."""
    code, health = call(sock, "GET", "/health")
    return int(health.get("version", -1)) if code == 200 else -1


def wait(what: str, check: Callable[[], bool], procs: list[subprocess.Popen[bytes]],
         timeout_s: float, where: Path) -> None:  # fmt: skip
    """Poll check until it holds; RuntimeError on timeout or when a measured process dies."""
    deadline = time.monotonic() + timeout_s
    while not check():
        dead = [p.args for p in procs if p.poll() is not None and p.returncode != 0]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} (failed: {dead}); see {where}")
        time.sleep(0.2)


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
        self.flags: tuple[str, ...] = ()  # given to every agent of the run
        trainers = sum(1 for d in devices if d != INFER_DEVICE)
        self.aggregator = self.spawn(
            ["aggregator", *self.common, *self.creds(aggregator_identity(self.job)),
             "--state-dir", str(self.dir / "aggregator"), "--rounds", str(rounds),
             "--devices-per-round", str(trainers), "--min-devices", str(trainers),
             "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR),
             "--round-timeout-s", "300", "--start-wait-s", "300"], "aggregator")  # fmt: skip

    def spawn(
        self, argv: list[str], name: str, *, no_torch: bool = False
    ) -> subprocess.Popen[bytes]:
        lead = ["-c", NO_TORCH] if no_torch else ["-m", "fedmq"]
        proc = start([sys.executable, *lead, *argv], self.dir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def agent(self, device: str, *extra: str, no_torch: bool = False) -> subprocess.Popen[bytes]:
        extra = (*self.flags, *extra)
        return self.spawn(["agent", *self.common, *self.creds(device), "--device-id", device,
                           "--state-dir", str(self.dir / "agents"), "--torch-threads", "1",
                           "--on-done", "idle",
                           "--serve-socket", str(self.socket(device)), *extra],
                          device, no_torch=no_torch)  # fmt: skip

    def socket(self, device: str) -> Path:
        return self.dir / f"{device}.sock"

    def versions(self) -> int:
        return len(read_history(self.dir / "aggregator"))

    def finished(self, measured: str) -> bool:
        """The aggregator ran every round and exited, and the measured agent holds the last
        global version (version N after round N): serves it, or, serving nothing, has it
        in its progress file."""
        if self.aggregator.poll() != 0 or self.versions() < self.rounds:
            return False
        if serving(self.socket(measured)) >= self.rounds:
            return True
        try:
            progress = json.loads((self.dir / "agents" / measured / "agent.json").read_text())
        except (OSError, ValueError):
            return False
        return "--no-serve" in self.flags and int(progress.get("version", -1)) >= self.rounds

    def wait_finished(self, measured: str) -> None:
        wait(f"{self.rounds} rounds served by {measured}", lambda: self.finished(measured),
             self.procs, self.rounds * 300 + 300, self.dir)  # fmt: skip

    def close(self) -> None:
        stop_all(self.procs)
        self.broker.stop()


def trainers(fleet: Fleet) -> None:
    """Start the training agents of a run."""
    devices = [device_id(i) for i in range(DEVICES)]
    share = ["--num-devices", str(DEVICES), "--partition", "iid"]
    for i, device in enumerate(devices):
        fleet.agent(device, *share, "--device-index", str(i))


def train_run(work: Path, task: str, rounds: int, *, serve: bool = True) -> dict[str, Any]:
    """A training agent of task over rounds rounds: its peak RSS and CPU seconds. With
    serve False every agent runs `--no-serve`: no ONNX export, onnx or onnxruntime."""
    devices = [device_id(i) for i in range(DEVICES)]
    name = f"train-{task}" + ("" if serve else "-noserve")
    fleet = Fleet(work, name=name, task=task, rounds=rounds, devices=devices)
    fleet.flags = () if serve else ("--no-serve",)
    try:
        trainers(fleet)
        measured = fleet.procs[1]  # devices[0]; the aggregator is procs[0]
        fleet.wait_finished(devices[0])
        peak, cpu = proc_usage(measured.pid)
        if measured.poll() is not None:
            raise RuntimeError(f"train {task}: the agent exited; see {fleet.dir}")
    finally:
        fleet.close()
    return {"role": "train", "task": task, "peak_rss_mb": round(peak, 1), "cpu_s": round(cpu, 2),
            "predict_p50_ms": None, "predict_p99_ms": None, "rounds": rounds,
            "serve": serve}  # fmt: skip


def infer_run(work: Path, rounds: int, predictions: int) -> dict[str, Any]:
    """The inference-only agent following rounds versions, then serving predictions."""
    from fedmq.tasks import get_task

    task = get_task(INFER_TASK)
    devices = [device_id(i) for i in range(DEVICES)] + [INFER_DEVICE]
    fleet = Fleet(work, name="infer", task=task.name, rounds=rounds, devices=devices)
    try:
        trainers(fleet)
        agent = fleet.agent(INFER_DEVICE, "--infer-only", "--profile", "sensor-infer",
                            no_torch=True)  # fmt: skip
        fleet.wait_finished(INFER_DEVICE)
        sock = fleet.socket(INFER_DEVICE)
        x = np.random.default_rng(0).random((predictions, *task.input_shape), np.float32)
        latencies = []
        for row in x:
            body = json.dumps({"inputs": row.tolist()}).encode()
            t0 = time.perf_counter()
            code, out = call(sock, "POST", "/predict", body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if code != 200 or out["version"] != rounds:
                raise RuntimeError(f"predict answered {code} {out}; see {fleet.dir}")
        peak, cpu = proc_usage(agent.pid)
        if agent.poll() is not None:
            raise RuntimeError(f"the inference-only agent exited; see {fleet.dir}")
    finally:
        fleet.close()
    return {"role": "infer", "task": task.name, "peak_rss_mb": round(peak, 1),
            "cpu_s": round(cpu, 2),
            "predict_p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "predict_p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "rounds": rounds, "predictions": predictions}  # fmt: skip


# ---------------------------------------------------------------- the report


def table(result: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return f"{v:7.2f}" if v is not None else f"{'-':>7s}"

    lines = [f"{'role':6s} {'task':10s} {'serves':>6s} {'peak MB':>8s} {'bare MB':>8s} "
             f"{'over MB':>8s} {'CPU s':>7s} {'p50 ms':>7s} {'p99 ms':>7s}"]  # fmt: skip
    for r in result["runs"]:
        bare = f"{r['bare_mb']:8.1f}" if "bare_mb" in r else f"{'-':>8s}"
        over = f"{r['overhead_mb']:8.1f}" if "overhead_mb" in r else f"{'-':>8s}"
        lines.append(
            f"{r['role']:6s} {r['task']:10s} {'yes' if r.get('serve', True) else 'no':>6s} "
            f"{r['peak_rss_mb']:8.1f} {bare} {over} "
            f"{r['cpu_s']:7.2f} {ms(r['predict_p50_ms'])} {ms(r['predict_p99_ms'])}"
        )
    b = result["baselines"]
    lines.append(f"bare import onnxruntime: {b['import_onnxruntime_mb']:.1f} MB, "
                 f"bare import torch: {b['import_torch_mb']:.1f} MB")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = []
    if not args.no_infer:
        runs.append(infer_run(work, args.rounds, args.predictions))
    base, bare = baselines(work, args.tasks, args.rounds)
    for task in args.tasks:
        for serve in (True, False):  # serving's cost, beside the agent's own
            r = train_run(work, task, args.rounds, serve=serve)
            r["bare_mb"] = round(bare[task], 1)
            r["overhead_mb"] = round(r["peak_rss_mb"] - bare[task], 1)
            runs.append(r)
    return {"runs": runs, "baselines": base,
            "machine": f"{platform.machine()} {platform.system()} {platform.release()}, "
                       f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
            "date": datetime.date.today().isoformat(),
            "command": "bench/footprint.py " + " ".join(sys.argv[1:])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work_dir)
    else:  # short: the agents' Unix sockets live under it
        with tempfile.TemporaryDirectory(prefix="fp", dir="/tmp") as tmp:
            result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

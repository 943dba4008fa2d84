"""What an inference-only device costs: peak RSS and CPU seconds of an agent following
`--versions` global versions (each one's ONNX export fetched, verified and swapped in) and
then answering `--predictions` single-example requests on its local API, with p50/p99
request latency; beside a bare `import onnxruntime`.

The agent runs as its own process (`fedmq agent --infer-only --profile sensor-infer`) with
torch made unimportable, on a plain local Mosquitto; this script publishes the versions as
the aggregator would (a torch export of the task's model with fresh weights each time) and
calls the API over the Unix socket.

    .venv/bin/python bench/serving_footprint.py                  # mnist-2nn, 10, 1000
    .venv/bin/python bench/serving_footprint.py --task mnist-cnn

Writes bench/results/serving_footprint.json in bench/footprint.py's schema ({"runs":
[{"role": "infer", ...}], "baselines": {"import_onnxruntime_mb"}}) and prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mnist-2nn")
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--predictions", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/serving_footprint.json")
    return p.parse_args(argv)


def call(sock: Path, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
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
    return int(health["version"]) if code == 200 else -1


def wait(what: str, check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def proc_usage(pid: int) -> tuple[float, float]:
    """Peak RSS (MB, VmHWM) and CPU seconds (user + system) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return hwm / 1024, ticks / os.sysconf("SC_CLK_TCK")


def baseline_onnxruntime_mb() -> float:
    """Peak RSS of a bare `import onnxruntime` (VmHWM: ru_maxrss survives exec on Linux, so
    a child would report this process's peak)."""
    code = ("import onnxruntime; print(next(line.split()[1] for line in "
            "open('/proc/self/status') if line.startswith('VmHWM')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    import torch

    from broker.mosquitto import BrokerSettings, MosquittoBroker
    from fedmq.processes import spawn
    from fedmq.tasks import get_task
    from fedmq.tasks.weights import export_onnx, get_weights
    from fedmq.topics import Topics
    from fedmq.wire import encode_chunk, encode_manifest
    from tests.edge_agent.versions import make_version
    from tests.integration.test_inference import NO_TORCH  # torch made unimportable

    task = get_task(args.task)
    broker = MosquittoBroker(settings=BrokerSettings(data_dir=work / "mosquitto")).start()
    topics, sock = Topics(job="bench", prefix="fb"), work / "api.sock"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    argv = ["agent", "--insecure", "--infer-only", "--profile", "sensor-infer", "--task",
            task.name, "--job", "bench", "--prefix", "fb", "--host", broker.host, "--port",
            str(broker.port), "--state-dir", str(work / "state"), "--device-id", "s0",
            "--serve-socket", str(sock)]  # fmt: skip
    agent = spawn([sys.executable, "-c", NO_TORCH, *argv], log_path=work / "agent.log")
    try:
        for v in range(args.versions):
            torch.manual_seed(v)
            model = task.build_model()
            made = make_version(get_weights(model), v, job="bench", task=task.name,
                                onnx=export_onnx(model, task.input_shape))  # fmt: skip
            sent = [client.publish(topics.global_chunk(v, i), encode_chunk(c), qos=1, retain=True)
                    for i, c in enumerate(made.full + made.onnx)]  # fmt: skip
            for info in sent:
                info.wait_for_publish(30)
            client.publish(topics.global_manifest(), encode_manifest(made.manifest), qos=1,
                           retain=True).wait_for_publish(30)  # fmt: skip
            wait(f"version {v} served", lambda v=v: serving(sock) == v)
        x = np.random.default_rng(0).random((args.predictions, *task.input_shape), np.float32)
        latencies = []
        for row in x:
            body = json.dumps({"inputs": row.tolist()}).encode()
            t0 = time.perf_counter()
            code, out = call(sock, "POST", "/predict", body)
            latencies.append((time.perf_counter() - t0) * 1000)
            assert code == 200 and out["version"] == args.versions - 1, out
        peak, cpu = proc_usage(agent.pid)
        assert agent.poll() is None, (work / "agent.log").read_text()[-2000:]
    finally:
        agent.terminate()
        agent.wait(30)
        client.loop_stop()
        broker.stop()
    return {"role": "infer", "task": task.name, "peak_rss_mb": round(peak, 1),
            "cpu_s": round(cpu, 2),
            "predict_p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "predict_p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "versions": args.versions, "predictions": args.predictions}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fqb", dir="/tmp") as tmp:
        result = run(args, Path(tmp))
    baseline = round(baseline_onnxruntime_mb(), 1)
    out = {"runs": [result], "baselines": {"import_onnxruntime_mb": baseline}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'role':6s} {'task':10s} {'peak RSS MB':>11s} {'CPU s':>7s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s}")  # fmt: skip
    print(f"{result['role']:6s} {result['task']:10s} {result['peak_rss_mb']:11.1f} "
          f"{result['cpu_s']:7.2f} {result['predict_p50_ms']:7.2f} {result['predict_p99_ms']:7.2f}")
    print(f"bare import onnxruntime: {out['baselines']['import_onnxruntime_mb']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark the aggregator alone: accepted updates/s through a real Mosquitto, per pipeline.

For each task and update pipeline, a fresh Mosquitto and a fresh aggregator (`python -m
fedmq aggregator`, async mode) receive pre-encoded updates from a pool of publisher
processes, each with its own paho client. Every publisher keeps a fixed window of updates
in flight (closed loop): it sends the next one when an ack for one of its own comes back on
the ack topics it subscribes to. The buffer is larger than the number of updates sent and
the deadline far away, so no version closes during the measurement (a close runs
evaluation and export, which is not what this measures): every update is a plain
admission + fold + crash-safe booking + ack.

Per (task, pipeline), the median over --repeats runs of:

- accepted_per_s: accepted acks per second over the middle 80% of them (no ramp, no drain);
- ack_p50_ms / ack_p99_ms: from the first chunk's publish to its ack, at that window;
- disk_bytes_per_update: the aggregator's /proc/<pid>/io write_bytes during the traffic,
  divided by the updates accepted (its log lines included);
- wire_bytes_per_update: MQTT payload bytes of one update (all its chunks);
- peak_rss_aggregator_mb: the aggregator's VmHWM (MiB) at the end, startup included;
- fold_per_s: decode_tensors + RunningSum.add on the same bodies in this process, no
  broker, no disk (median of timed blocks).

Updates are gaussian noise (std 1e-3) of the model's shape, encoded once per body with
compress_update; a few distinct bodies are cycled, each send with a fresh update id.
Before the sweep the same publisher pool runs against an echo acker (a paho client that
acks each update as soon as its last chunk arrives) to show what the harness itself can
deliver on this machine: the "harness ceiling".

    .venv/bin/python bench/aggregator.py                  # full sweep, ~8 min here
    .venv/bin/python bench/aggregator.py --quick          # smoke run, ~2 min
    .venv/bin/python bench/aggregator.py --tasks mnist-cnn --pipelines topk:0.1+int8+zstd

Writes bench/results/aggregator.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# this file is bench/aggregator.py: its folder on sys.path would shadow the aggregator package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

TASKS = ("mnist-2nn", "mnist-cnn")
PIPELINES = ("float32", "int8+zstd", "topk:0.1+int8+zstd", "topk:0.01+int8+zstd")
CEILING_TASK, CEILING_PIPELINE = "mnist-cnn", "topk:0.1+int8+zstd"
JOB = "bench"
MAX_MESSAGE_BYTES = 256 * 1024  # the aggregator's and the agents' default chunk size
NUM_EXAMPLES = 200  # FedAvg weight of every update; any plausible value
DELTA_STD = 1e-3
SENDERS_PER_WINDOW = 2  # device ids a publisher cycles through, per update in flight
FIELDS = (
    "accepted_per_s",
    "ack_p50_ms",
    "ack_p99_ms",
    "disk_bytes_per_update",
    "wire_bytes_per_update",
    "fold_per_s",
    "peak_rss_aggregator_mb",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help="comma-separated update pipelines")
    p.add_argument("--updates", type=int, default=1500,
                   help="most updates sent per run (default 1500)")
    p.add_argument("--duration-s", type=float, default=15.0,
                   help="stop sending after this many seconds, whichever comes first (default 15)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per (task, pipeline); the table shows medians (default 3)")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    p.add_argument("--window", type=int, default=16,
                   help="updates in flight per publisher (default 16)")
    p.add_argument("--bodies", type=int, default=4,
                   help="distinct encoded bodies cycled by the publishers (default 4)")
    p.add_argument("--fold-s", type=float, default=2.0,
                   help="seconds of in-process decode+fold timing per cell (default 2)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the harness ceiling (publishers against an echo acker)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200 updates or 6 s, 1 repeat, 0.5 s of fold timing")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="brokers, state dirs and logs (default: a new temp dir on disk)")
    p.add_argument("--keep-state", action="store_true",
                   help="keep each run's aggregator state dir (deleted after the run otherwise)")
    p.add_argument("--out", type=Path, default=Path("bench/results/aggregator.json"),
                   help="JSON output (default bench/results/aggregator.json)")
    # fmt: on
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(updates=200, duration_s=6.0, repeats=1, fold_s=0.5)
        args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.pipelines = [s.strip() for s in args.pipelines.split(",") if s.strip()]
    from fedmq.codecs import parse_pipeline

    for name in args.pipelines:
        try:
            parse_pipeline(name)
        except ValueError as err:
            p.error(f"--pipelines: {err}")
    if min(args.updates, args.repeats, args.publishers, args.window, args.bodies) < 1:
        p.error("--updates, --repeats, --publishers, --window and --bodies must be >= 1")
    return args


# ------------------------------------------------------------------ workload


def make_bodies(task: str, pipeline: str, count: int, seed: int = 0) -> tuple[Any, list[bytes]]:
    """(specs, encoded bodies) of `count` gaussian deltas of the task's model."""
    from fedmq.codecs import compress_update, parse_pipeline
    from fedmq.tasks import get_task
    from fedmq.tasks.weights import get_weights
    from fedmq.wire import specs_of

    weights = get_weights(get_task(task).build_model())
    rng = np.random.default_rng(seed)
    p = parse_pipeline(pipeline)
    bodies = []
    for _ in range(count):
        delta = {
            n: rng.normal(0, DELTA_STD, w.shape).astype(np.float32) for n, w in weights.items()
        }
        bodies.append(compress_update(delta, p, rng=rng).body)
    return specs_of(weights), bodies


def fold_rate(specs: Any, bodies: list[bytes], codec: str, seconds: float) -> float:
    """Median updates/s of decode_tensors + RunningSum.add over timed blocks."""
    from aggregator.fedavg import RunningSum
    from fedmq.codecs import decode_tensors

    acc = RunningSum(specs=tuple(specs))
    rates: list[float] = []
    i = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < seconds / 8:
            acc.add(decode_tensors(bodies[i % len(bodies)], codec, specs), float(NUM_EXAMPLES))
            i, n = i + 1, n + 1
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


# ------------------------------------------------------------------ MQTT helpers


def mqtt_client(client_id: str, host: str, port: int) -> Any:
    """A connected paho client (MQTT 5, callback API 2) with its network thread running."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    up = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props: up.set()
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not up.wait(15):
        client.loop_stop()
        raise RuntimeError(f"no CONNACK from {host}:{port}")
    return client


def subscribe_all(client: Any, topics: list[str], qos: int = 1) -> None:
    """Subscribe to topics (in batches) and wait for every SUBACK."""
    pending: set[int] = set()
    done = threading.Condition()

    def on_subscribe(c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        with done:
            pending.discard(mid)
            done.notify_all()

    client.on_subscribe = on_subscribe
    with done:
        for i in range(0, len(topics), 100):
            rc, mid = client.subscribe([(t, qos) for t in topics[i : i + 100]])
            if rc != 0:
                raise RuntimeError(f"subscribe failed: rc {rc}")
            pending.add(mid)
        if not done.wait_for(lambda: not pending, timeout=30):
            raise RuntimeError("no SUBACK within 30 s")


def publish_states(host: str, port: int, prefix: str, devices: list[str]) -> None:
    """Retained 'online, trains' states for the fake devices, so the aggregator opens."""
    from fedmq.topics import Topics
    from fedmq.wire import DeviceState, encode_state

    topics = Topics(job=JOB, prefix=prefix)
    client = mqtt_client("bench-states", host, port)
    try:
        infos = [
            client.publish(
                topics.device_state(d),
                encode_state(
                    DeviceState(
                        device=d,
                        status="online",
                        job=JOB,
                        num_examples=NUM_EXAMPLES,
                        model_version=0,
                        ts=time.time(),
                        trains=True,
                    )
                ),  # fmt: skip
                qos=1,
                retain=True,
            )
            for d in devices
        ]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_round(host: str, port: int, prefix: str, proc: Any, log_path: Path,
               target: int, timeout: float = 180.0) -> tuple[int, int]:  # fmt: skip
    """(round id, model version) of the open buffer the aggregator announces."""
    from fedmq.topics import Topics
    from fedmq.wire import decode_round

    found: dict[str, Any] = {}
    seen = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if msg.payload:
            r = decode_round(msg.payload)
            if r.state == "open":
                found["round"] = r
                seen.set()

    client = mqtt_client("bench-round", host, port)
    client.on_message = on_message
    try:
        subscribe_all(client, [Topics(job=JOB, prefix=prefix).round()])
        deadline = time.monotonic() + timeout
        while not seen.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"the aggregator announced no open round; log tail:\n{tail}")
    finally:
        client.disconnect()
        client.loop_stop()
    r = found["round"]
    if r.target != target:
        raise RuntimeError(f"the buffer's target is {r.target}, expected {target}")
    return r.round_id, r.model_version


# ------------------------------------------------------------------ publishers


def publisher(index: int, cfg: dict[str, Any], start: Any, ready: Any, results: Any) -> None:
    """One publisher process: a closed loop of `window` updates in flight, acks on its topics."""
    from fedmq.chunks import encode_chunks
    from fedmq.topics import Topics
    from fedmq.wire import Update, decode_ack, encode_update

    topics = Topics(job=JOB, prefix=cfg["prefix"])
    senders: list[str] = cfg["senders"]
    sent_at: dict[str, float] = {}
    records: list[tuple[float, float, str]] = []  # (publish, ack, status)
    cond = threading.Condition()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        now = time.monotonic()
        ack = decode_ack(msg.payload)
        with cond:
            t0 = sent_at.pop(ack.update_id, None)
            if t0 is not None:
                records.append((t0, now, ack.status if not ack.reason else f"{ack.status}: "
                                f"{ack.reason}"))  # fmt: skip
                cond.notify_all()

    client = mqtt_client(f"bench-pub-{cfg['prefix'].replace('/', '-')}-{index}",
                         cfg["host"], cfg["port"])  # fmt: skip
    client.on_message = on_message
    subscribe_all(client, [topics.ack(d) for d in senders])
    ready.put(index)
    start.wait()
    deadline = time.monotonic() + cfg["duration_s"]
    wire: list[int] = []
    n = 0
    while n < cfg["quota"] and time.monotonic() < deadline:
        with cond:
            cond.wait_for(lambda: len(sent_at) < cfg["window"], timeout=1.0)
            if len(sent_at) >= cfg["window"]:
                continue
        device = senders[n % len(senders)]
        update = Update(
            update_id=uuid.uuid4().hex,
            device=device,
            round_id=cfg["round_id"],
            base_version=cfg["base_version"],
            num_examples=NUM_EXAMPLES,
            codec=cfg["codec"],
            body=cfg["bodies"][(index + n) % len(cfg["bodies"])],
        )
        chunks = encode_chunks(encode_update(update), update.update_id, MAX_MESSAGE_BYTES)
        topic = topics.update(device)
        with cond:
            sent_at[update.update_id] = time.monotonic()
        for chunk in chunks:
            client.publish(topic, chunk, qos=1)
        wire.append(sum(len(c) for c in chunks))
        n += 1
    with cond:  # drain: every update in flight gets its ack, or is counted as lost
        cond.wait_for(lambda: not sent_at, timeout=cfg["drain_s"])
        lost = len(sent_at)
    client.disconnect()
    client.loop_stop()
    results.put({"index": index, "records": records, "wire": wire, "lost": lost})


def run_publishers(cfg: dict[str, Any], publishers: int, window: int,
                   before_start: Any = None) -> dict[str, Any]:  # fmt: skip
    """Start the pool, release it together, collect every publisher's records."""
    ctx = mp.get_context("spawn")
    start, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    senders_each = window * SENDERS_PER_WINDOW
    procs = []
    for i in range(publishers):
        mine = {**cfg, "window": window, "quota": -(-cfg["updates"] // publishers),
                "senders": cfg["devices"][i * senders_each : (i + 1) * senders_each]}  # fmt: skip
        procs.append(ctx.Process(target=publisher, args=(i, mine, start, ready, results)))
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        if before_start is not None:
            before_start()
        start.set()
        out = [results.get(timeout=cfg["duration_s"] + cfg["drain_s"] + 60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return {
        "records": [r for o in out for r in o["records"]],
        "wire": [w for o in out for w in o["wire"]],
        "lost": sum(o["lost"] for o in out),
    }


def echo_acker(host: str, port: int, prefix: str, ready: Any, stop: Any) -> None:
    """A stand-in aggregator that acks an update as soon as its last chunk arrives."""
    from fedmq.topics import Topics
    from fedmq.wire import Ack, decode_chunk, encode_ack

    topics = Topics(job=JOB, prefix=prefix)
    seen: dict[str, int] = {}

    def on_message(c: Any, u: Any, msg: Any) -> None:
        chunk = decode_chunk(msg.payload, max_bytes=MAX_MESSAGE_BYTES + 4096)
        got = seen.get(chunk.payload_id, 0) + 1
        if got < chunk.count:
            seen[chunk.payload_id] = got
            return
        seen.pop(chunk.payload_id, None)
        device = topics.device_of(msg.topic) or "?"
        c.publish(topics.ack(device), encode_ack(Ack(chunk.payload_id, 1, "accepted")), qos=1)

    client = mqtt_client("bench-echo", host, port)
    client.on_message = on_message
    subscribe_all(client, [topics.updates_filter()])
    ready.put("up")
    stop.wait()
    client.disconnect()
    client.loop_stop()


# ------------------------------------------------------------------ one run


def proc_io_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def summarize(pub: dict[str, Any]) -> dict[str, Any]:
    """Rate over the middle 80% of accepted acks; latency percentiles of accepted ones."""
    ok = sorted((t1, t1 - t0) for t0, t1, status in pub["records"] if status == "accepted")
    others: dict[str, int] = {}
    for _, _, status in pub["records"]:
        if status != "accepted":
            others[status] = others.get(status, 0) + 1
    rate = 0.0
    if len(ok) >= 10:
        lo, hi = len(ok) // 10, len(ok) - 1 - len(ok) // 10
        rate = (hi - lo) / max(ok[hi][0] - ok[lo][0], 1e-9)
    elif len(ok) >= 2:
        rate = (len(ok) - 1) / max(ok[-1][0] - ok[0][0], 1e-9)
    lat = np.array([x[1] for x in ok]) * 1000 if ok else np.array([np.nan])
    return {
        "accepted": len(ok),
        "not_accepted": others,
        "lost": pub["lost"],
        "accepted_per_s": rate,
        "ack_p50_ms": float(np.percentile(lat, 50)),
        "ack_p99_ms": float(np.percentile(lat, 99)),
        "wire_bytes_per_update": float(np.mean(pub["wire"])) if pub["wire"] else 0.0,
    }


def start_broker(data_dir: Path) -> Any:
    from broker.mosquitto import BrokerSettings, MosquittoBroker

    return MosquittoBroker(settings=BrokerSettings(data_dir=data_dir, persistence=False)).start()


def base_cfg(args: argparse.Namespace, broker: Any, prefix: str, codec: str,
             bodies: list[bytes], devices: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "host": broker.host, "port": broker.port, "prefix": prefix, "codec": codec,
        "bodies": bodies, "devices": devices, "updates": args.updates,
        "duration_s": args.duration_s, "drain_s": 60.0, "round_id": 1, "base_version": 0,
    }  # fmt: skip


def fleet_devices(args: argparse.Namespace) -> list[str]:
    """Enough device ids that the buffer (one slot per online device) never fills."""
    count = max(args.updates + 1, args.publishers * args.window * SENDERS_PER_WINDOW)
    return [f"b{i:05d}" for i in range(count)]


def run_ceiling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The publisher pool against an echo acker: what the harness delivers by itself."""
    _, bodies = make_bodies(CEILING_TASK, CEILING_PIPELINE, args.bodies)
    broker = start_broker(work / "ceiling-broker")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    prefix = "ceiling"
    acker = ctx.Process(target=echo_acker, args=(broker.host, broker.port, prefix, ready, stop))
    acker.start()
    try:
        ready.get(timeout=60)
        cfg = base_cfg(args, broker, prefix, CEILING_PIPELINE, bodies, fleet_devices(args))
        cfg["updates"] = max(args.updates, 3000)  # the ceiling should be time-bound
        result = summarize(run_publishers(cfg, args.publishers, args.window))
    finally:
        stop.set()
        acker.join(timeout=10)
        if acker.is_alive():
            acker.kill()
        broker.stop()
    return {"task": CEILING_TASK, "pipeline": CEILING_PIPELINE, **result}


def run_cell(args: argparse.Namespace, task: str, pipeline: str, specs: Any,
             bodies: list[bytes], run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """One aggregator + broker, one burst of traffic; the raw numbers of this run."""
    from fedmq.processes import spawn_fedmq, stop_all

    run_dir.mkdir(parents=True)
    broker = start_broker(run_dir / "broker")
    prefix = "b" + uuid.uuid4().hex[:8]
    devices = fleet_devices(args)
    agg = None
    try:
        publish_states(broker.host, broker.port, prefix, devices)
        log_path = run_dir / "aggregator.log"
        # fmt: off
        agg = spawn_fedmq([
            # --insecure: this measures the aggregator's intake behind a plain local broker
            # (the publishers are a harness, not enrolled devices); TLS costs: byzantine.py
            "aggregator", "--insecure", "--job", JOB, "--prefix", prefix, "--host", broker.host,
            "--port", str(broker.port), "--task", task, "--state-dir", str(run_dir / "state"),
            "--rounds", "0", "--mode", "async", "--buffer-size", str(len(devices)),
            "--devices-per-round", str(len(devices)), "--round-timeout-s", "86400",
            "--start-wait-s", "86400", "--codec", pipeline, "--no-publish-onnx",
            "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        ], log_path)
        # fmt: on
        round_id, version = wait_round(
            broker.host, broker.port, prefix, agg, log_path, target=len(devices)
        )
        cfg = base_cfg(args, broker, prefix, pipeline, bodies, devices)
        cfg.update(round_id=round_id, base_version=version)
        io: dict[str, int] = {}

        def before_start() -> None:
            io["write_before"] = proc_io_write_bytes(agg.pid)
            io["rss_before_kib"] = proc_status_kib(agg.pid, "VmRSS")

        pub = run_publishers(cfg, args.publishers, args.window, before_start)
        if agg.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({agg.returncode}); see {log_path}")
        written = proc_io_write_bytes(agg.pid) - io["write_before"]
        hwm_kib = proc_status_kib(agg.pid, "VmHWM")
        rss_after_kib = proc_status_kib(agg.pid, "VmRSS")
    finally:
        if agg is not None:
            stop_all([agg])
        broker.stop()
        if not args.keep_state:
            shutil.rmtree(run_dir / "state", ignore_errors=True)  # versions, checkpoints: MBs
    result = summarize(pub)
    accepted = max(result["accepted"], 1)
    return {
        **result,
        "disk_bytes_per_update": written / accepted,
        "peak_rss_aggregator_mb": hwm_kib / 1024,
        "rss_before_mb": io["rss_before_kib"] / 1024,
        "rss_after_mb": rss_after_kib / 1024,
    }


# ------------------------------------------------------------------ report


def median_record(task: str, pipeline: str, runs: list[dict[str, Any]], fold: float) -> dict:
    rec: dict[str, Any] = {"task": task, "pipeline": pipeline}
    for key in FIELDS:
        if key == "fold_per_s":
            rec[key] = round(fold, 1)
        else:
            rec[key] = round(float(statistics.median(r[key] for r in runs)), 1)
    return rec


def format_table(records: list[dict[str, Any]], extra: list[dict[str, Any]]) -> str:
    head = (f"{'task':<10} {'pipeline':<20} {'acc/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'disk B/upd':>11} {'wire B/upd':>11} {'disk/wire':>9} {'fold/s':>8} "
            f"{'RSS MiB':>8} {'RSS +MiB':>8} {'not ok':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r, x in zip(records, extra, strict=True):
        ratio = r["disk_bytes_per_update"] / max(r["wire_bytes_per_update"], 1)
        lines.append(
            f"{r['task']:<10} {r['pipeline']:<20} {r['accepted_per_s']:>7.1f} "
            f"{r['ack_p50_ms']:>8.1f} {r['ack_p99_ms']:>8.1f} "
            f"{r['disk_bytes_per_update']:>11,.0f} {r['wire_bytes_per_update']:>11,.0f} "
            f"{ratio:>9.1f} {r['fold_per_s']:>8.1f} {r['peak_rss_aggregator_mb']:>8.0f} "
            f"{x['rss_growth_mb']:>8.1f} {x['not_ok']:>6}"
        )
    return "\n".join(lines)


def ceiling_line(c: dict[str, Any]) -> str:
    return (
        f"harness ceiling ({c['task']}, {c['pipeline']}, echo acker): "
        f"{c['accepted_per_s']:.0f} updates/s, ack p50 {c['ack_p50_ms']:.1f} ms, "
        f"p99 {c['ack_p99_ms']:.1f} ms"
    )


def machine(ceiling: dict[str, Any] | None) -> dict[str, Any]:
    import paho.mqtt
    import torch

    from fedmq import __version__

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "paho": paho.mqtt.__version__,
        "fedmq": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "harness_ceiling": ceiling,
    }


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "updates_per_run_max": args.updates,
        "duration_s_max": args.duration_s,
        "repeats": args.repeats,
        "publishers": args.publishers,
        "window_per_publisher": args.window,
        "distinct_bodies": args.bodies,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "delta": f"gaussian, std {DELTA_STD}",
        "aggregator": "async (FedBuff), buffer larger than the updates sent: no version closes",
        "broker": "mosquitto, persistence off, one per run",
        "qos": 1,
        "stat": "median over repeats; rate over the middle 80% of accepted acks",
        "units": "bytes; RSS in MiB (VmHWM)",
    }


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmq-bench-agg-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    cells = [(t, p) for t in args.tasks for p in args.pipelines]
    ceiling = None
    bar = tqdm(total=len(cells) * args.repeats + (0 if args.no_ceiling else 1),
               unit="run", dynamic_ncols=True)  # fmt: skip
    records, extra = [], []
    try:
        if not args.no_ceiling:
            bar.set_description("harness ceiling")
            ceiling = run_ceiling(args, work)
            bar.update()
            bar.write(ceiling_line(ceiling))
        for task, pipeline in cells:
            bar.set_description(f"{task} {pipeline}")
            specs, bodies = make_bodies(task, pipeline, args.bodies)
            fold = fold_rate(specs, bodies, pipeline, args.fold_s)
            runs = []
            for rep in range(args.repeats):
                run_dir = work / f"{task}-{pipeline.replace(':', '_')}-{rep}"
                runs.append(run_cell(args, task, pipeline, specs, bodies, run_dir))
                bar.update()
            rec = median_record(task, pipeline, runs, fold)
            records.append(rec)
            not_ok = sum(sum(r["not_accepted"].values()) + r["lost"] for r in runs)
            extra.append({
                "rss_growth_mb": statistics.median(r["rss_after_mb"] - r["rss_before_mb"]
                                                   for r in runs),
                "not_ok": not_ok,
            })  # fmt: skip
            for r in runs:
                if r["not_accepted"] or r["lost"]:
                    bar.write(f"{task} {pipeline}: not accepted {r['not_accepted']}, "
                              f"lost {r['lost']}")  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": config(args), "machine": machine(ceiling), "runs": records}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(format_table(records, extra))
    print("\nRSS +MiB: the aggregator's RSS after the traffic minus before it (median); "
          "not ok: updates rejected, late or without an ack, all repeats")  # fmt: skip
    if ceiling is not None:
        print(ceiling_line(ceiling))
    print(f"\nwrote {args.out}; brokers, state and logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

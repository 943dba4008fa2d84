"""`fedmq demo`: a broker, an aggregator and a fleet of agents, as separate processes.

Live progress comes from the aggregator's retained status topic, the same JSON a person
sees with `mosquitto_sub -t fedmq/demo/status`. Every process started here is stopped
on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aggregator.settings import AggregatorSettings
from fedmq.processes import spawn_agents, spawn_fedmq, stop_all

_AGGREGATOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AggregatorSettings)}


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    """The demo's flags; its defaults reach 80% on non-IID MNIST in about two minutes."""
    p.add_argument("--devices", type=int, default=10, help="agents to start (default 10)")
    p.add_argument("--task", default="mnist-2nn", help="task (default mnist-2nn)")
    from fedmq.tasks.partition import ALL_SCHEMES

    p.add_argument(
        "--partition",
        default=None,
        choices=ALL_SCHEMES,
        help="how data is split across devices (default: the task's; shards, 2 labels each, "
        "for MNIST and digits; natural for plaid-cnn)",
    )
    p.add_argument("--rounds", type=int, default=60, help="most rounds to run (default 60)")
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop once test accuracy reaches this (default: the task's; 0.80 for MNIST)",
    )
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (default 2)")
    p.add_argument("--batch-size", type=int, default=10, help="local batch size (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="local learning rate (default 0.05)")
    p.add_argument(
        "--round-timeout-s", type=float, default=30.0, help="round deadline in seconds (default 30)"
    )
    # the codec settings are the aggregator's own: the same names, defaults and help
    from fedmq.cli import AGGREGATOR_HELP

    for name in ("codec", "update_budget_bytes", "downlink", "downlink_delta"):
        default = _AGGREGATOR_DEFAULTS[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{AGGREGATOR_HELP[name]} (default: {default!r})")  # fmt: skip
    p.add_argument(
        "--broker",
        default="auto",
        choices=["auto", "mosquitto", "embedded"],
        help="auto uses Mosquitto when installed, else an embedded broker",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where logs, metrics.json and accuracy.png go (default runs/demo-<time>)",
    )
    p.add_argument("--seed", type=int, default=0)  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve the aggregator's Prometheus metrics on this port (default 0: off; "
                   "docs/metrics.md)")  # fmt: skip
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain MQTT without certificates, ACL or signed models (default: a fleet "
        "directory in the run directory, mTLS, generated ACL, signed downlink)",
    )


def codec_flags(args: argparse.Namespace) -> list[str]:
    """The aggregator flags that carry the demo's codec settings, one for one."""
    return ["--codec", args.codec, "--update-budget-bytes", str(args.update_budget_bytes),
            "--downlink", args.downlink, "--downlink-delta", args.downlink_delta]  # fmt: skip


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo end to end; 0 when it reached the target accuracy, 3 when not."""
    from broker.launch import start_fleet_broker
    from broker.provision import aggregator_identity, credential_flags
    from fedmq.demo_checks import check_demo_args
    from fedmq.processes import device_id
    from fedmq.report import by_version, format_table, format_versions, read_history, write_report

    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    check_demo_args(args, run_dir)  # every argument, before anything starts or is made
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        broker, fleet = start_fleet_broker(
            run_dir, job="demo", devices=[device_id(i) for i in range(args.devices)],
            prefer=args.broker, insecure=args.insecure,
        )  # fmt: skip
    except RuntimeError as err:
        print(f"fedmq demo: {err}", file=sys.stderr)
        return 4
    print(f"broker: {broker.kind} on {broker.host}:{broker.port} (MQTT {broker.mqtt_version})")
    if fleet is not None:
        print(f"secured: mTLS, generated ACL and signed models (fleet in {fleet.root})")
    elif not args.insecure:
        print("fedmq demo: the embedded broker cannot check certificates or enforce an ACL: "
              "running without them (install Mosquitto for a secured fleet)", file=sys.stderr)
    if fleet is None:
        args.insecure = True  # what the run did, in metrics.json
    print(f"run directory: {run_dir}")
    common = ["--host", broker.host, "--port", str(broker.port), "--job", "demo",
              "--mqtt-version", broker.mqtt_version, "--task", args.task]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    code = 1
    try:
        procs.append(spawn_fedmq(
            ["aggregator", *common, "--state-dir", str(run_dir / "aggregator"),
             "--rounds", str(args.rounds), "--target-accuracy", str(args.target_accuracy),
             "--devices-per-round", str(args.devices),
             "--min-devices", str(max(1, args.devices // 2)),
             "--round-timeout-s", str(args.round_timeout_s), "--start-wait-s", "60",
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--seed", str(args.seed), *codec_flags(args),
             *credential_flags(fleet, aggregator_identity("demo")),
             "--metrics-port", str(args.metrics_port)],
            run_dir / "aggregator.log",
        ))  # fmt: skip
        procs += spawn_agents(
            common, devices=args.devices, partition=args.partition,
            state_dir=run_dir / "agents", log_dir=run_dir,
            # simulated devices have no sensors of their own: the host's thermal zones and
            # battery are not theirs (a hot laptop must not stall the demo), so they read
            # an empty sysfs tree and count as ready
            extra=["--data-seed", str(args.seed), "--sysfs-root", str(run_dir / "sysfs")],
            credentials=lambda device: credential_flags(fleet, device),
        )  # fmt: skip
        if args.metrics_port:
            print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics")
        deltas = f" + {args.downlink_delta} deltas" if args.downlink_delta else ""
        print(f"started 1 aggregator and {args.devices} agents "
              f"({args.task}, {args.partition} partition; updates {args.codec}, "
              f"models {args.downlink}{deltas})")  # fmt: skip
        agg_code = _watch(broker, fleet, procs[0], args)
        rounds = read_history(run_dir / "aggregator")
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["broker"] = broker.kind
        summary = write_report(rounds, run_dir, config=config,
                               title=f"fedmq demo: {args.task}, {args.devices} devices, "
                                     f"{args.partition}")  # fmt: skip
        print()
        print(format_table(rounds))
        print()
        if any(v["federated"] for v in by_version(rounds)):  # the agents evaluated versions
            print("central test set and federated evaluation (the devices' held-out data):")
            print(format_versions(rounds))
            agree = summary["central_vs_federated"]
            if agree:
                print(f"they differ by {agree['mean_abs_diff']:.4f} on average (at most "
                      f"{agree['max_abs_diff']:.4f}) over {agree['versions']} versions")
            print()
        final = summary["final_accuracy"]  # the central test set's, else the devices'
        if final is None:
            final = summary["final_federated_accuracy"]
        print(f"final accuracy {final if final is None else f'{final:.4f}'} after "
              f"{summary['rounds_closed']} rounds; uplink {summary['bytes_up'] / 1e6:.1f} MB, "
              f"downlink {summary['bytes_down'] / 1e6:.1f} MB")  # fmt: skip
        wrote = [p for p in (run_dir / "metrics.json", run_dir / "accuracy.png") if p.exists()]
        print(f"wrote {' and '.join(str(p) for p in wrote)}")
        if agg_code != 0:
            print(f"fedmq demo: the aggregator exited with {agg_code}; see "
                  f"{run_dir / 'aggregator.log'}", file=sys.stderr)  # fmt: skip
            code = 1
        elif final is not None and final >= args.target_accuracy:
            code = 0
        else:
            print(f"fedmq demo: target accuracy {args.target_accuracy} not reached",
                  file=sys.stderr)  # fmt: skip
            code = 3
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        code = 130
    finally:
        stop_all(procs)
        broker.stop()
    return code


def _watch(broker: Any, fleet: Any, aggregator: subprocess.Popen[bytes],
           args: argparse.Namespace) -> int:  # fmt: skip
    """Show progress from the status topic until the aggregator exits; its exit code."""
    from broker.launch import PROGRESS_OPERATOR
    from broker.provision import operator_identity
    from fedmq.demo_checks import DemoProgress
    from fedmq.link import BrokerAddress, Link, Message
    from fedmq.topics import Topics

    address = BrokerAddress(host=broker.host, port=broker.port, mqtt_version=broker.mqtt_version)
    if fleet is not None:  # a read-only operator identity of its own (docs/security.md)
        address = fleet.bundle(operator_identity("demo", PROGRESS_OPERATOR)).address(
            broker.host, broker.port, broker.mqtt_version)
    link = Link(
        client_id=f"fedmq-demo-watch-{os.getpid()}",
        address=address,
        subscriptions=[(Topics(job="demo").status(), 0)],
        persistent=False,
    )
    link.start()
    progress = DemoProgress(rounds=args.rounds, target=args.target_accuracy,
                            devices=args.devices)  # fmt: skip
    try:
        while aggregator.poll() is None:
            event = link.next_event(0.5)
            if isinstance(event, Message) and event.payload:
                progress.update(json.loads(event.payload))
        return aggregator.wait()
    finally:
        progress.close()
        link.stop()

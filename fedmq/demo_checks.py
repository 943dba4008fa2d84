"""`fedmq demo`: every argument checked before anything starts, and its progress display.

The demo hands its arguments to an aggregator and agents in other processes; a bad one
used to surface after every process had started. Here the aggregator's and an agent's own
settings are built from them first, so their validation runs in this process: one line,
exit 2 (or 4/5 for a missing broker, package or unusable run directory), nothing started,
no directory created.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from fedmq.config import ConfigError


def check_demo_args(args: argparse.Namespace, run_dir: Path) -> None:
    """ConfigError / FatalError for anything that would stop the demo once started."""
    from aggregator.settings import AggregatorSettings
    from broker.launch import choose_broker
    from edge_agent.settings import AgentSettings
    from fedmq.cli_errors import EXIT_NO_BROKER, FatalError, check_writable_dir, require
    from fedmq.processes import device_id
    from fedmq.tasks import get_task

    if args.devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {args.devices}")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    try:
        task = get_task(args.task)
        if args.partition is None:  # the task's own defaults (Task.demo_partition)
            args.partition = task.demo_partition
        if args.target_accuracy is None:
            args.target_accuracy = task.demo_target
        AggregatorSettings(
            task=args.task, state_dir=run_dir / "aggregator", rounds=args.rounds,
            target_accuracy=args.target_accuracy, devices_per_round=args.devices,
            min_devices=max(1, args.devices // 2), round_timeout_s=args.round_timeout_s,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            codec=args.codec, update_budget_bytes=args.update_budget_bytes,
            downlink=args.downlink, downlink_delta=args.downlink_delta, insecure=True,
            metrics_port=args.metrics_port,
        )  # fmt: skip
        AgentSettings(device_id=device_id(0), task=args.task, partition=args.partition,
                      num_devices=args.devices, data_seed=args.seed, insecure=True,
                      state_dir=run_dir / "agents")  # fmt: skip
    except ValueError as err:
        raise ConfigError(str(err)) from err
    require("tqdm", "matplotlib", "torch")  # the progress bar, the plot, the aggregator
    try:
        choose_broker(args.broker)
    except RuntimeError as err:
        raise FatalError(str(err), exit_code=EXIT_NO_BROKER) from err
    check_writable_dir(run_dir, what="the demo's run directory", flag="--run-dir")


class DemoProgress:
    """Progress from the status topic: a bar towards the target accuracy on a terminal,
    a plain line per closed round otherwise (a log file, a CI job, a pipe)."""

    def __init__(self, *, rounds: int, target: float, devices: int,
                 stream: TextIO | None = None) -> None:  # fmt: skip
        self.rounds, self.target, self.devices = rounds, target, devices
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.shown_round = -1
        if self.stream.isatty():
            from tqdm import tqdm

            if target > 0:  # the demo stops at its target: that is where the bar ends
                self.bar = tqdm(total=round(target * 100), unit="%", file=self.stream,
                                desc=f"accuracy to {target:.0%}", dynamic_ncols=True,
                                bar_format="{desc}: {bar} {n:.0f}/{total_fmt}%{postfix}")
            else:
                self.bar = tqdm(total=rounds, unit="round", desc="training", file=self.stream,
                                dynamic_ncols=True)  # fmt: skip

    def update(self, status: dict[str, Any]) -> None:
        """Show what one status document says."""
        if status.get("aggregator") == "offline":  # its Will or last word: nothing to show
            return
        closed = int(status.get("rounds_closed", 0))
        acc = status.get("accuracy")
        fed = status.get("federated")
        if acc is None and isinstance(fed, dict):  # no central test set: the devices' result
            acc = fed.get("accuracy")
        online = f"{status.get('devices', {}).get('online', 0)}/{self.devices} devices online"
        if self.bar is None:
            if closed != self.shown_round and acc is not None:
                print(f"round {closed}/{self.rounds}: accuracy {acc:.4f} (target "
                      f"{self.target:g}), {online}", file=self.stream, flush=True)  # fmt: skip
            self.shown_round = closed
            return
        r = status.get("round") or {}
        open_round = (f" | round {r['id']}: {r.get('received', 0)}/{r.get('target', 0)} "
                      "updates") if r else ""  # fmt: skip
        if self.target > 0:
            self.bar.n = min(self.bar.total, round((acc or 0.0) * 100))
            self.bar.set_postfix_str(f"{closed}/{self.rounds} rounds{open_round} | {online}")
        else:
            self.bar.n = closed
            self.bar.set_postfix_str(
                (f"acc {acc:.3f}" if acc is not None else "") + f"{open_round} | {online}")
        self.bar.refresh()

    def close(self) -> None:
        """End the bar (a plain display has nothing to end)."""
        if self.bar is not None:
            self.bar.close()

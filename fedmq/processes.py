"""Start fedmq roles as child processes and stop them all (the demo and the benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def spawn_fedmq(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `python -m fedmq <argv>` with one math thread and its output in log_path."""
    # many simulated devices share this machine's cores: one thread each
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "fedmq", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def spawn_agents(
    common: list[str],
    *,
    devices: int,
    partition: str,
    state_dir: Path,
    log_dir: Path,
    extra: Iterable[str] = (),
) -> list[subprocess.Popen[bytes]]:
    """Start agents device-00 .. device-<devices-1>, each with its share of the task's data."""
    procs = []
    for i in range(devices):
        argv = ["agent", *common, "--device-id", f"device-{i:02d}", "--device-index", str(i),
                "--num-devices", str(devices), "--partition", partition,
                "--state-dir", str(state_dir), *extra,
                # many simulated devices share this machine's cores: one thread each
                "--torch-threads", "1"]  # fmt: skip
        procs.append(spawn_fedmq(argv, log_dir / f"agent-{i:02d}.log"))
    return procs


def stop_all(procs: Iterable[subprocess.Popen[bytes]], *, grace_s: float = 10.0) -> None:
    """SIGTERM every process still running (services flush their state), then kill."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

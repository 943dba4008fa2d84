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

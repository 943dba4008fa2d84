"""Child processes: start one with its output in a log file, signal it, stop it with a grace
period, reap it and say how it ended. The brokers, the demo, the benchmarks and the tests
all start and stop their children here."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

# many simulated devices share this machine's cores: one math thread each; and a role's log
# should show each line when it happens, not when a buffer fills
ROLE_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

Child: TypeAlias = subprocess.Popen[bytes]


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    own_group: bool = False,
    cwd: Path | None = None,
) -> Child:
    """Start argv with stdin closed and stdout and stderr appended to log_path.

    The child gets our environment plus ROLE_ENV plus env. With own_group it leads a new
    process group: a Ctrl-C in the terminal does not reach it, and signals go to its group.
    """
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ROLE_ENV, **(env or {})},
            start_new_session=own_group,
            cwd=cwd,
        )


def send_signal(proc: Child, sig: signal.Signals) -> None:
    """Send sig to a running child, to its whole group when it leads one; no-op once exited."""
    if proc.poll() is not None:
        return
    # until it is reaped its pid cannot be reused, so the pid still names this child
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def reap(proc: Child, timeout: float) -> int:
    """Wait up to timeout seconds for the child to exit, SIGKILL it after; its exit status."""
    try:
        return proc.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        send_signal(proc, signal.SIGKILL)
        return proc.wait()


def stop(proc: Child, *, grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int:
    """Ask the child to exit with sig (SIGTERM: services save their state), SIGKILL it
    after grace_s, reap it; its exit status."""
    send_signal(proc, sig)
    return reap(proc, grace_s)


def kill(proc: Child) -> int:
    """SIGKILL the child, as a crash would, and reap it; its exit status."""
    return stop(proc, sig=signal.SIGKILL)


def stop_all(procs: Iterable[Child], *, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every child still running, SIGKILL those still running grace_s later, reap
    them all; their exit statuses in order."""
    procs = list(procs)
    for proc in procs:
        send_signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    return [reap(proc, max(0.1, deadline - time.monotonic())) for proc in procs]


def describe_exit(code: int) -> str:
    """A child's exit status in words: 'status 2' or 'signal SIGKILL'."""
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def spawn_fedmq(argv: list[str], log_path: Path) -> Child:
    """Start `python -m fedmq <argv>` (a role) with its output appended to log_path."""
    return spawn([sys.executable, "-m", "fedmq", *argv], log_path=log_path)


def device_id(index: int) -> str:
    """The id of the index-th agent that spawn_agents starts."""
    return f"device-{index:02d}"


def spawn_agents(
    common: list[str],
    *,
    devices: int,
    partition: str,
    state_dir: Path,
    log_dir: Path,
    credentials: Callable[[str], list[str]],
    extra: Iterable[str] = (),
) -> list[Child]:
    """Start agents device-00 .. device-<devices-1>, each with its share of the task's data;
    credentials(device) gives each its connection flags (broker.provision.credential_flags)."""
    procs = []
    for i in range(devices):
        device = device_id(i)
        argv = ["agent", *common, *credentials(device), "--device-id", device,
                "--device-index", str(i),
                "--num-devices", str(devices), "--partition", partition,
                "--state-dir", str(state_dir), *extra,
                # many simulated devices share this machine's cores: one thread each
                "--torch-threads", "1"]  # fmt: skip
        procs.append(spawn_fedmq(argv, log_dir / f"agent-{i:02d}.log"))
    return procs

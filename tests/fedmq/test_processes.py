"""The child-process helper: output to a log, role env, stop with a grace, kill, exit status."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedmq import processes

# prints its environment's role settings, then waits to be stopped
SLEEPER = """
import os, sys, time
print(os.environ.get("OMP_NUM_THREADS"), os.environ.get("FEDMQ_TEST_EXTRA"), flush=True)
print("err line", file=sys.stderr, flush=True)
time.sleep(60)
"""
# ignores SIGTERM: only the grace period's SIGKILL ends it
STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""
# starts a grandchild in its own group and writes its pid, then waits
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def _wait_for(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_output_and_env_reach_the_log_and_sigterm_ends_it(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("earlier run\n")
    proc = processes.spawn([sys.executable, "-c", SLEEPER], log_path=log,
                           env={"FEDMQ_TEST_EXTRA": "x"})  # fmt: skip
    _wait_for(lambda: "err line" in log.read_text())
    assert log.read_text().splitlines() == ["earlier run", "1 x", "err line"]
    assert processes.stop(proc, grace_s=10) == -signal.SIGTERM
    assert processes.describe_exit(proc.returncode) == "signal SIGTERM"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    proc = processes.spawn([sys.executable, "-c", STUBBORN], log_path=log)
    _wait_for(lambda: "ready" in log.read_text())
    start = time.monotonic()
    assert processes.stop(proc, grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 5
    # stopping it again is harmless and reports the same status
    assert processes.stop_all([proc]) == [-signal.SIGKILL]


def test_signals_reach_the_whole_group_of_a_child_that_leads_one(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    proc = processes.spawn([sys.executable, "-c", PARENT, str(pid_file)],
                           log_path=tmp_path / "parent.log", own_group=True)  # fmt: skip
    _wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)
    assert processes.kill(proc) == -signal.SIGKILL
    _wait_for(lambda: not _alive(grandchild))


def test_exit_statuses_in_words() -> None:
    assert processes.describe_exit(0) == "status 0"
    assert processes.describe_exit(2) == "status 2"
    assert processes.describe_exit(-9) == "signal SIGKILL"

"""`fedmq demo` end to end on the embedded broker, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_on_embedded_broker(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--broker", "embedded", "--task", "digits-mlp",
         "--devices", "3", "--rounds", "8", "--epochs", "3", "--lr", "0.1",
         "--target-accuracy", "0.7", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broker: embedded (amqtt)" in proc.stdout and "MQTT 3.1.1" in proc.stdout
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["summary"]["final_accuracy"] >= 0.7
    assert doc["config"]["broker"] == "embedded (amqtt)"
    assert all(r["outcome"] == "complete" and r["accepted"] == 3 for r in doc["rounds"])
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "final accuracy" in proc.stdout and "round" in proc.stdout
    # every process it started is gone: nothing listens on the broker's port any more
    port = int(proc.stdout.split("127.0.0.1:")[1].split()[0])
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_missing_target_exits_3(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--broker", "embedded", "--task", "digits-mlp",
         "--devices", "2", "--rounds", "1", "--target-accuracy", "0.999",
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not reached" in proc.stderr

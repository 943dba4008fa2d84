"""`fedmq demo --task plaid-cnn`, two rounds: the sensor task's own split and target reach
every process (the full run to its target is a measurement, README "Tasks")."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from edge_agent.personal import holdout_split
from edge_agent.settings import AgentSettings
from fedmq.report import read_history
from fedmq.tasks import get_task


def test_sensor_demo_trains_on_the_natural_split(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--task", "plaid-cnn", "--devices", "3",
         "--rounds", "2", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    task = get_task("plaid-cnn")
    config = json.loads((run_dir / "metrics.json").read_text())["config"]
    assert config["partition"] == "natural" and config["target_accuracy"] == task.demo_target
    rounds = read_history(run_dir / "aggregator")
    assert [r["outcome"] for r in rounds] == ["complete", "complete"], proc.stderr
    # each agent trained on its own share of the natural split, less what it held out to
    # evaluate (edge_agent/data.py)
    holdout = {f.name: f.default for f in dataclasses.fields(AgentSettings)}["holdout_fraction"]
    shares = [len(p) for p in task.natural_split(3)]  # type: ignore[misc]
    assert sum(shares) == 537
    sizes = sorted(len(holdout_split(n, holdout, 0)[0]) for n in shares)
    for r in rounds:
        # what each device claimed (the aggregator may cap the weight it gives a claim)
        claimed = {p["device"]: p.get("examples_claimed", p["examples"]) for p in r["participants"]}
        assert sorted(claimed.values()) == sizes
    final = rounds[-1]["accuracy"]
    assert final > 0.2  # guessing the largest class scores 0.16
    assert proc.returncode == (0 if final >= task.demo_target else 3), proc.stderr

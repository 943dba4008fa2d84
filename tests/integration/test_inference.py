"""An inference-only device on a machine without torch (nor scikit-learn or mlxtend) runs
each global version in onnxruntime: it verifies and serves it, and reports its evaluation on
the device's own data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.evaluation import EVAL_ACCURACY, EVAL_EXAMPLES
from fedmq.cli import main
from fedmq.processes import spawn
from fedmq.tasks import get_task
from fedmq.wire import decode_metrics
from tests.integration.fleet import Fleet, Watcher, _flags

NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sklearn", "mlxtend"):
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, NoTorch())
from fedmq.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_infer_only_agent_without_torch(
    fleet: Fleet, mosquitto: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watcher = Watcher(mosquitto, fleet.topics.metrics("sensor"))
    x, y = get_task(fleet.task).load_test()  # the device's own labelled data
    np.savez(tmp_path / "sensor.npz", x=x[:200], y=y[:200])
    try:
        fleet.aggregator(rounds=3, devices_per_round=2, min_devices=2, epochs=3, lr=0.1)
        fleet.agent(0, 3)
        fleet.agent(1, 3)
        argv = ["agent", "--host", mosquitto.host, "--port", str(mosquitto.port),
                "--job", fleet.job, "--prefix", fleet.prefix, "--task", fleet.task,
                *_flags({"device_id": "sensor", "device_index": 2, "num_devices": 3,
                         "profile": "sensor-infer", "state_dir": tmp_path / "sensor",
                         "data": tmp_path / "sensor.npz",
                         **fleet.credentials("sensor")})]  # fmt: skip
        sensor = spawn([sys.executable, "-c", NO_TORCH, *argv], log_path=tmp_path / "sensor.log")
        fleet.procs["sensor"] = sensor

        def final_metrics() -> Any:
            got = [decode_metrics(p) for _, p in watcher.messages]
            return [m for m in got if m.model_version == 3]

        (m,) = fleet.wait_for("onnx metrics for version 3", final_metrics, timeout=120)
        assert sensor.poll() is None, (tmp_path / "sensor.log").read_text()
        assert m.device == "sensor" and m.metrics[EVAL_ACCURACY] > 0.6
        assert m.metrics[EVAL_EXAMPLES] == 200  # all of its data: it trains on none
        versions = sorted({decode_metrics(p).model_version for _, p in watcher.messages})
        assert versions[-1] == 3 and len(versions) >= 2
        # it serves version 3 (its serving pointer), and `fedmq predict` on a file runs it
        pointer = json.loads((tmp_path / "sensor" / "sensor" / "serving" / "current.json")
                             .read_text())  # fmt: skip
        assert pointer["version"] == 3
        np.savez(tmp_path / "test.npz", x=x[200:])
        assert main(["predict", str(tmp_path / "test.npz"), "--state-dir",
                     str(tmp_path / "sensor"), "--device", "sensor", "--json"]) == 0  # fmt: skip
        out = json.loads(capsys.readouterr().out)
        assert out["version"] == 3 and np.mean(np.array(out["predictions"]) == y[200:]) > 0.6
        text = (tmp_path / "sensor.log").read_text()
        assert "inference only" in text and "Traceback" not in text
    finally:
        watcher.close()

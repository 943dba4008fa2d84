"""An inference-only device installed as a real device would be: a fresh venv holding the
built wheel with the `infer` extra alone (no torch, no `data` extra: no scikit-learn,
mlxtend, scipy or pandas). It follows a real fleet, verifies and serves each global version
in onnxruntime, reports its evaluation on the device's own data, and `fedmq predict` from
that venv runs the model it serves."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.evaluation import EVAL_ACCURACY, EVAL_EXAMPLES
from fedmq.processes import spawn
from fedmq.tasks import get_task
from fedmq.wire import decode_metrics
from tests.integration.fleet import Fleet, Watcher, _flags

ROOT = Path(__file__).resolve().parents[2]
# what a device without the training and data extras must not have
ABSENT = ("torch", "sklearn", "mlxtend", "scipy", "pandas", "sktime", "matplotlib")

# the venv must import its own installed fedmq, never this tree
CLEAN_ENV = {"PYTHONPATH": ""}


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **CLEAN_ENV}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True,
                          env=env, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def infer_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with `pip install fedmq-<version>.whl[infer]`: the wheel built from this tree
    (python -m build, as the README's device install does)."""
    root = tmp_path_factory.mktemp("infer-venv")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
         str(root / "dist"), str(ROOT)])  # fmt: skip
    (wheel,) = (root / "dist").glob("fedmq-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"),
         f"{wheel}[infer]"])  # fmt: skip
    have = run([str(venv / "bin" / "python"), "-c",
                "import importlib.util as u, fedmq; "
                f"print([m for m in {ABSENT!r} if u.find_spec(m)], fedmq.__file__)"],
               cwd=root).stdout.split()  # fmt: skip
    assert have[0] == "[]", f"the infer install pulled in {have[:-1]}"
    assert have[-1].startswith(str(venv)), f"the venv imports fedmq from {have[-1]}"
    yield venv


def test_infer_only_install_follows_and_serves(
    fleet: Fleet, mosquitto: Any, tmp_path: Path, infer_venv: Path
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
        # the venv's own console script, run away from the source tree
        sensor = spawn([str(infer_venv / "bin" / "fedmq"), *argv], log_path=tmp_path / "sensor.log",
                       env=CLEAN_ENV, cwd=tmp_path)  # fmt: skip
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
        out = json.loads(run([str(infer_venv / "bin" / "fedmq"), "predict",
                              str(tmp_path / "test.npz"), "--state-dir", str(tmp_path / "sensor"),
                              "--device", "sensor", "--json"], cwd=tmp_path).stdout)  # fmt: skip
        assert out["version"] == 3 and np.mean(np.array(out["predictions"]) == y[200:]) > 0.6
        text = (tmp_path / "sensor.log").read_text()
        assert "inference only" in text and "Traceback" not in text
    finally:
        watcher.close()

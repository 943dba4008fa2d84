"""A fleet on data that lives on its devices: each trains on its own .npz and evaluates each
version on its own held-out .npz; the aggregator has no test set at all. The federated
result it records for a version must be what a central evaluation of that same version
gives on the union of the devices' held-out files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.evaluation import EVAL_ACCURACY, EVAL_LOSS, evaluate_onnx
from fedmq.tasks import get_task
from fedmq.tasks.partition import partition
from tests.integration.fleet import Fleet

DEVICES = 3


def write_device_files(task_name: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each device's train-<i>.npz and eval-<i>.npz from a label-skewed split (never the
    bundled files at run time); the union of the held-out parts."""
    pool = get_task(task_name).load_pool
    assert pool is not None
    x, y = pool()
    held_x, held_y = [], []
    for i, idx in enumerate(partition(y, "shards", DEVICES, seed=0)):
        idx = np.random.default_rng(i).permutation(idx)
        cut = len(idx) * 3 // 4
        np.savez(root / f"train-{i}.npz", x=x[idx[:cut]], y=y[idx[:cut]])
        np.savez(root / f"eval-{i}.npz", x=x[idx[cut:]], y=y[idx[cut:]])
        held_x.append(x[idx[cut:]])
        held_y.append(y[idx[cut:]])
    return np.concatenate(held_x), np.concatenate(held_y)


def test_federated_evaluation_equals_central_on_the_union(fleet: Fleet, tmp_path: Path) -> None:
    data = tmp_path / "device-files"
    data.mkdir()
    union_x, union_y = write_device_files(fleet.task, data)
    fleet.aggregator(rounds=3, devices_per_round=DEVICES, min_devices=DEVICES, epochs=2,
                     lr=0.1, eval_data="none")  # fmt: skip
    for i in range(DEVICES):
        fleet.agent(i, DEVICES, data=data / f"train-{i}.npz", eval_data=data / f"eval-{i}.npz")

    def federated_versions() -> list[dict] | None:
        got = {r["federated"]["version"]: r["federated"] for r in fleet.history()
               if isinstance(r.get("federated"), dict)}  # fmt: skip
        return [got[v] for v in sorted(got)] if {1, 2} <= set(got) else None

    results = fleet.wait_for("federated results for versions 1 and 2", federated_versions,
                             timeout=120)  # fmt: skip
    assert all(r.get("accuracy") is None for r in fleet.history())  # no central test set
    checked = 0
    for fed in results:
        onnx = (fleet.state_dir / "versions" / f"{fed['version']:06d}.onnx").read_bytes()
        central = evaluate_onnx(onnx, union_x, union_y, batch_size=256, threads=1)
        assert fed["devices"] == DEVICES and fed["examples"] == len(union_y)
        # devices judge with torch, this with onnxruntime: the same weights, so at most a
        # float rounding tie may flip one argmax
        assert abs(fed["accuracy"] - central[EVAL_ACCURACY]) <= 1.0 / len(union_y)
        assert abs(fed["loss"] - central[EVAL_LOSS]) <= 1e-4 * max(1.0, central[EVAL_LOSS])
        checked += 1
    assert checked >= 3  # versions 0, 1 and 2

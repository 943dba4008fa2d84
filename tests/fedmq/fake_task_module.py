"""A tiny user-defined task, for get_task('tests.fedmq.fake_task_module:TASK')."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmq.tasks import Task

if TYPE_CHECKING:
    import torch


def _build_model() -> torch.nn.Module:
    import torch

    return torch.nn.Linear(3, 2)


def _load() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    return X, y


TASK = Task(
    name="fake-linear",
    num_classes=2,
    input_shape=(3,),
    build_model=_build_model,
    load_pool=_load,
    load_test=_load,
    description="two classes, three features",
)


def make_task() -> Task:
    """A zero-argument factory, the other way a user can name a task."""
    return TASK


NOT_A_TASK = 42

"""A task of your own: scikit-learn's 8x8 digits with a small CNN.

Run a fleet on it from the repository root:

    fedmq demo --task examples.digits_cnn:TASK --devices 4 --partition dirichlet

or run one device of it on its own data (examples/device_data.py):

    fedmq agent --task examples.digits_cnn:TASK --data examples/device_data.py:stream ...

A task is a model factory, its input shape and its labels. The training pool that the
demo's devices split among themselves (`load_pool`) and the held-out test set the
aggregator evaluates every global version on (`load_test`) are optional: on a real fleet
each device brings its own data (--data; docs/devices.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmq.tasks import Task, get_task

if TYPE_CHECKING:
    import torch


def build_model() -> torch.nn.Module:
    """Two 3x3 convolutions on the 8x8 image, then a linear classifier."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )  # fmt: skip


def _as_images(xy: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, y = xy
    return x.reshape(-1, 1, 8, 8), y


_digits = get_task("digits-mlp")  # reuse the built-in split: 80% of each class trains

TASK = Task(
    name="digits-cnn",
    num_classes=10,
    input_shape=(1, 8, 8),
    build_model=build_model,
    load_pool=lambda: _as_images(_digits.load_pool()),
    load_test=lambda: _as_images(_digits.load_test()),
    description="scikit-learn digits, small CNN (example of a user task)",
)

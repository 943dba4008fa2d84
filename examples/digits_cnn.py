"""A task of your own: scikit-learn's 8x8 digits with a small CNN.

Run a fleet on it from the repository root:

    fedmq demo --task examples.digits_cnn:TASK --devices 4 --partition dirichlet

A task is a model factory, the training pool that devices split among themselves, and a
held-out test set the aggregator evaluates every global version on. On a real fleet each
device loads its own data instead; `load_pool` is how the demo and tests stand one in.
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

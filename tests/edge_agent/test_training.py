"""Local training on real digits data: learns, and stops when the budget is spent."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_agent.training import Budget, peak_rss_mb, train_local
from fedmq.tasks import get_task
from fedmq.tasks.partition import device_data
from fedmq.tasks.weights import evaluate
from fedmq.wire import TrainConfig


def _setup() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    task = get_task("digits-mlp")
    x, y = device_data(task, scheme="iid", num_devices=2, device_index=0)
    return task.build_model(), x, y


def test_training_reduces_loss() -> None:
    model, x, y = _setup()
    before = evaluate(model, x, y)["loss"]
    r = train_local(model, x, y, config=TrainConfig(epochs=3, batch_size=10, lr=0.1),
                    budget=Budget(), seed=1)  # fmt: skip
    assert r.stopped_by == "" and r.epochs_done == 3 and r.examples == 3 * len(x)
    assert evaluate(model, x, y)["loss"] < before / 2


def test_time_budget_stops_training() -> None:
    model, x, y = _setup()
    r = train_local(model, x, y, config=TrainConfig(epochs=1000, batch_size=1, lr=0.01),
                    budget=Budget(max_seconds=0.2), seed=1)  # fmt: skip
    assert r.stopped_by == "time" and r.epochs_done < 1000 and r.seconds < 5


def test_memory_budget_counts_what_training_adds_not_the_lifetime_peak() -> None:
    model, x, y = _setup()
    # one 38 MB weight: its gradient and momentum buffer are fresh mappings that training
    # adds to the resident memory in its first batch, past a 16 MB budget
    wide = nn.Sequential(nn.Linear(64, 150_000), nn.ReLU(), nn.Linear(150_000, 10))
    config = TrainConfig(epochs=2, batch_size=500, lr=0.01, momentum=0.9)
    small = train_local(wide, x, y, config=config,
                        budget=Budget(max_memory_mb=16, max_batch_size=8), seed=1)  # fmt: skip
    assert small.stopped_by == "memory" and small.examples == 8  # one capped batch
    del wide
    # the process's lifetime peak is far above the next budget: training adds much less
    assert peak_rss_mb() > 64
    generous = train_local(model, x, y, config=config,
                           budget=Budget(max_memory_mb=64, max_batch_size=64), seed=1)  # fmt: skip
    assert generous.stopped_by == "" and generous.epochs_done == 2

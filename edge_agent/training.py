"""Local training: one visible loop over epochs and batches, with the device budget inline."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.wire import TrainConfig


@dataclass(frozen=True)
class Budget:
    """What one round of local training may spend (from the device's firmware profile)."""

    max_seconds: float = 300.0
    max_memory_mb: int = 1024
    max_batch_size: int = 64


@dataclass(frozen=True)
class TrainResult:
    """What happened in a round of local training."""

    examples: int  # examples processed, counting repeats across epochs once per epoch
    epochs_done: float
    mean_loss: float
    seconds: float
    stopped_by: str  # "" when every epoch ran, else the budget that ended training


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: TrainConfig,
    budget: Budget,
    seed: int,
) -> TrainResult:
    """Run SGD on (x, y) for config.epochs, stopping early when the budget is spent."""
    if len(x) == 0:
        raise ValueError("this device has no training examples")
    batch_size = min(config.batch_size, budget.max_batch_size)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start = time.monotonic()
    seen, loss_sum, batches, stopped_by = 0, 0.0, 0, ""
    for _epoch in range(config.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach())
            batches += 1
            # the budget, checked after every batch so a slow device stops on time
            if time.monotonic() - start > budget.max_seconds:
                stopped_by = "time"
            elif peak_rss_mb() > budget.max_memory_mb:
                stopped_by = "memory"
            if stopped_by:
                break
        if stopped_by:
            break
    return TrainResult(
        examples=seen,
        epochs_done=seen / len(xt),
        mean_loss=loss_sum / max(1, batches),
        seconds=time.monotonic() - start,
        stopped_by=stopped_by,
    )

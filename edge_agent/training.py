"""Local training: one visible loop over epochs and batches, with the device budget inline."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.wire import TrainConfig


@dataclass(frozen=True)
class Budget:
    """What one round of local training may spend (from the device's firmware profile)."""

    max_seconds: float = 300.0
    max_memory_mb: int = 1024  # what training may add to the process's resident memory
    max_batch_size: int = 64


@dataclass(frozen=True)
class TrainResult:
    """What happened in a round of local training."""

    examples: int  # examples processed, counting repeats across epochs once per epoch
    epochs_done: float
    mean_loss: float
    seconds: float
    stopped_by: str  # "" when every epoch ran, else the budget that ended training
    steps: int = 0  # local SGD steps taken (FedNova's tau_i, SCAFFOLD's K)

    def work(self, epochs_planned: int) -> dict[str, float]:
        """What the update's metrics say of the work done and planned (docs/devices.md,
        "Work done")."""
        return {"local_steps": float(self.steps), "epochs_done": self.epochs_done,
                "epochs_planned": float(epochs_planned),
                "budget_stopped": float(bool(self.stopped_by))}  # fmt: skip


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def rss_mb() -> float:
    """Resident memory of this process now, in MiB; the peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            resident_pages = int(fh.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: TrainConfig,
    budget: Budget,
    seed: int,
    max_steps: int = 0,
    correction: Mapping[str, np.ndarray] | None = None,
) -> TrainResult:
    """Run SGD on (x, y) for config.epochs, stopping early when the budget is spent.

    With config.prox_mu > 0 (FedProx) the loss minimised is the data loss plus
    mu/2 ||w - w_global||^2, w_global the weights the model holds on entry; mean_loss
    reports the data loss alone. With prox_mu = 0 not one operation differs from plain
    SGD, so the weights come out bit for bit the same. max_steps > 0 ends training after
    that many batches (a personal model's steps), epochs permitting.

    correction (SCAFFOLD: c - c_i per parameter name, fedmq.correction) is added to every
    gradient before the step; None leaves the loop as it was."""
    if len(x) == 0:
        raise ValueError("this device has no training examples")
    # the memory budget is what training adds (resident now, against before training), not
    # the process's lifetime peak: a round that once went over it must not cut every later one
    baseline_mb = rss_mb()
    batch_size = min(config.batch_size, budget.max_batch_size)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.CrossEntropyLoss()
    mu = config.prox_mu
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    shift = [(p, torch.from_numpy(np.ascontiguousarray(correction[n], dtype=np.float32)))
             for n, p in model.named_parameters()] if correction is not None else []  # fmt: skip
    model.train()
    start = time.monotonic()
    seen, loss_sum, batches, stopped_by = 0, 0.0, 0, ""
    for _epoch in range(config.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            if anchor:  # FedProx: pulls the local model towards the global one
                params = zip(model.parameters(), anchor, strict=True)
                prox = sum(((p - a) ** 2).sum() for p, a in params)
                (loss + 0.5 * mu * prox).backward()
            else:
                loss.backward()
            for p, c in shift:  # SCAFFOLD: g - c_i + c
                if p.grad is not None:
                    p.grad.add_(c)
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach())
            batches += 1
            # the budget, checked after every batch so a slow device stops on time
            if time.monotonic() - start > budget.max_seconds:
                stopped_by = "time"
            elif rss_mb() - baseline_mb > budget.max_memory_mb:
                stopped_by = "memory"
            if stopped_by or batches == max_steps:
                break
        if stopped_by or batches == max_steps:
            break
    return TrainResult(
        examples=seen,
        epochs_done=seen / len(xt),
        mean_loss=loss_sum / max(1, batches),
        seconds=time.monotonic() - start,
        stopped_by=stopped_by,
        steps=batches,
    )

"""Local training on real digits data: learns, stops when the budget is spent, and with
FedProx stays nearer the global model."""

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


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(((p - q) ** 2).sum() for p, q in zip(a, b, strict=True)) ** 0.5)


def test_fedprox_with_mu_0_is_plain_sgd_bit_for_bit() -> None:
    torch.use_deterministic_algorithms(True)
    try:
        model, x, y = _setup()
        start = _weights(model)
        train_local(model, x, y, config=TrainConfig(2, 10, 0.1, momentum=0.5, prox_mu=0.0),
                    budget=Budget(), seed=7)  # fmt: skip
        # FedAvg's local training as it was before FedProx: the same seed, order and steps
        ref, _, _ = _setup()
        gen = torch.Generator().manual_seed(7)
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
        ref.train()
        for _ in range(2):
            order = torch.randperm(len(xt), generator=gen)
            for first in range(0, len(order), 10):
                idx = order[first : first + 10]
                opt.zero_grad(set_to_none=True)
                nn.CrossEntropyLoss()(ref(xt[idx]), yt[idx]).backward()
                opt.step()
        assert _distance(_weights(ref), start) > 0.5  # it trained
        for a, b in zip(_weights(model), _weights(ref), strict=True):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


def test_fedprox_pulls_the_local_model_towards_the_global_one() -> None:
    model, x, y = _setup()
    start = _weights(model)
    config = TrainConfig(epochs=3, batch_size=10, lr=0.1)
    plain = train_local(model, x, y, config=config, budget=Budget(), seed=1)
    drift = _distance(_weights(model), start)
    prox_model, _, _ = _setup()
    prox = train_local(prox_model, x, y, config=TrainConfig(3, 10, 0.1, prox_mu=0.1),
                       budget=Budget(), seed=1)  # fmt: skip
    prox_drift = _distance(_weights(prox_model), start)
    # the proximal term keeps the local model measurably nearer w_global ...
    assert prox_drift < 0.8 * drift, (prox_drift, drift)
    # ... while it still learns, and mean_loss is the data loss (comparable to plain SGD's)
    assert prox.mean_loss < 2 * plain.mean_loss + 0.1
    assert evaluate(prox_model, x, y)["loss"] < 0.75 * evaluate(_setup()[0], x, y)["loss"]

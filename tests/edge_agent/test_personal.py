"""Personal models on the device: the held-out split, the head/body split and combination,
fine-tuning on a label-skewed device, fedper's body-only update and kept head, serving."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from edge_agent.personal import (
    GLOBAL_ACC,
    PERSONAL_ACC,
    PersonalModels,
    combine,
    holdout_split,
    serving_weights,
    split_head,
)
from edge_agent.state import DeviceStore
from edge_agent.training import Budget, train_local
from fedmq.errors import SchemaError
from fedmq.wire import TrainConfig


def test_holdout_split_is_seeded_disjoint_and_never_takes_everything() -> None:
    train, held = holdout_split(100, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    again = holdout_split(100, 0.2, seed=3)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(100, 0.2, seed=4)[1], held)
    assert [len(p) for p in holdout_split(1, 0.5, seed=0)] == [1, 0]  # one example trains
    assert [len(p) for p in holdout_split(10, 0.0, seed=0)] == [10, 0]
    with pytest.raises(ValueError):
        holdout_split(10, 1.0, seed=0)


W = {"0.weight": np.ones((3, 2), np.float32), "0.bias": np.ones(3, np.float32),
     "2.weight": np.ones((2, 3), np.float32), "2.bias": np.ones(2, np.float32)}  # fmt: skip
HEAD = ("2.weight", "2.bias")


def test_split_and_combine_head_and_body() -> None:
    body, head = split_head(W, HEAD)
    assert set(body) == {"0.weight", "0.bias"} and set(head) == set(HEAD)
    new_global = {k: v * 7 for k, v in W.items()}
    mine = {k: v * -1 for k, v in head.items()}
    out = combine(new_global, mine)
    np.testing.assert_array_equal(out["0.weight"], 7.0)  # the global body
    np.testing.assert_array_equal(out["2.bias"], -1.0)  # this device's head
    out["0.weight"][0, 0] = 99  # a copy: the inputs are untouched
    assert new_global["0.weight"][0, 0] == 7
    with pytest.raises(ValueError, match="does not fit"):
        combine(new_global, {"2.bias": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match="no tensors"):
        split_head(W, ("9.bias",))


def _blobs(labels: list[int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 8-class task in 16 dimensions: overlapping Gaussian blobs per label."""
    centres = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.choice(labels, size=n).astype(np.int64)
    x = centres[y] + rng.normal(scale=1.5, size=(n, 16)).astype(np.float32)
    return x, y


def _model() -> object:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


@functools.lru_cache(maxsize=1)
def _global_weights() -> dict[str, np.ndarray]:
    from fedmq.tasks.weights import get_weights

    model = _model()
    x, y = _blobs(list(range(8)), 400, seed=1)  # a global model trained on every label
    train_local(model, x, y, config=TrainConfig(epochs=2, batch_size=10, lr=0.05),
                budget=Budget(), seed=0)  # fmt: skip
    return get_weights(model)


def _global_model() -> tuple[object, dict[str, np.ndarray]]:
    return _model(), {k: v.copy() for k, v in _global_weights().items()}


def _models(root: Path, x: np.ndarray, y: np.ndarray, holdout: float = 0.2) -> PersonalModels:
    train, held = holdout_split(len(x), holdout, 0)
    return PersonalModels(store=DeviceStore(root=root), x=x[train], y=y[train],
                          held_x=x[held], held_y=y[held])  # fmt: skip


def test_finetuning_improves_held_out_accuracy_on_a_label_skewed_device(tmp_path: Path) -> None:
    model, base = _global_model()
    x, y = _blobs([2, 5], 200, seed=2)  # this device sees two labels only
    pm = _models(tmp_path, x, y)
    local = pm.train_round(model, base, TrainConfig(personal="finetune", personal_steps=40),
                           budget=Budget(), seed=1, version=4)  # fmt: skip
    assert local.metrics["holdout_examples"] == 40 and local.examples == 160
    assert local.metrics[PERSONAL_ACC] >= 0.85
    assert local.metrics[PERSONAL_ACC] > local.metrics[GLOBAL_ACC] + 0.1
    assert set(local.trained) == set(local.base) == set(base)  # finetune sends the whole delta
    pm.keep(local)
    note, kept = pm.store.load_personal() or ({}, {})
    assert note["mode"] == "finetune" and note["base_version"] == 4
    weights, which = serving_weights(pm.store, base)
    assert which == "personal" and weights is not None
    assert all(np.array_equal(weights[k], kept[k]) for k in base)
    assert not all(np.array_equal(weights[k], base[k]) for k in base)


def test_none_is_the_plain_training_call_bit_for_bit(tmp_path: Path) -> None:
    from fedmq.tasks.weights import get_weights, set_weights

    model, base = _global_model()
    x, y = _blobs([2, 5], 100, seed=2)
    pm = _models(tmp_path, x, y, holdout=0.0)  # none trains on the whole training share
    cfg = TrainConfig()
    local = pm.train_round(model, base, cfg, budget=Budget(), seed=9, version=1)
    set_weights(model, base)
    train_local(model, x, y, config=cfg, budget=Budget(), seed=9)
    plain = get_weights(model)
    assert all(np.array_equal(local.trained[k], plain[k]) for k in plain)
    assert local.metrics == {} and local.personal is None and local.examples == 100
    pm.keep(local)
    assert pm.store.load_personal() is None
    assert serving_weights(pm.store, base)[1] == "global"


def test_fedper_sends_the_body_and_keeps_its_head(tmp_path: Path) -> None:
    model, base = _global_model()
    head = ("2.weight", "2.bias")
    x, y = _blobs([2, 5], 200, seed=2)
    pm = _models(tmp_path, x, y)
    cfg = TrainConfig(personal="fedper", personal_steps=30, personal_head=head)
    local = pm.train_round(model, base, cfg, budget=Budget(), seed=1, version=1)
    assert set(local.trained) == set(local.base) == {"0.weight", "0.bias"}
    assert local.personal is not None
    assert local.metrics[PERSONAL_ACC] > local.metrics[GLOBAL_ACC] + 0.1
    # the personal model is the global body this round trained on, with the new head
    assert all(np.array_equal(local.personal[k], base[k]) for k in ("0.weight", "0.bias"))
    assert not np.array_equal(local.personal["2.weight"], base["2.weight"])
    pm.keep(local)
    # the next global version: the device puts its kept head on the new body
    nxt = {k: v + 0.01 if k.startswith("0.") else -v for k, v in base.items()}
    served, which = serving_weights(pm.store, nxt)
    assert which == "personal" and served is not None
    np.testing.assert_array_equal(served["0.weight"], nxt["0.weight"])
    np.testing.assert_array_equal(served["2.weight"], local.personal["2.weight"])
    again = pm.train_round(model, nxt, dataclasses.replace(cfg, personal_steps=0),
                           budget=Budget(), seed=2, version=2)  # fmt: skip
    # the kept head, not the global's (negated: it ranks the labels upside down)
    assert again.metrics[GLOBAL_ACC] < 0.5
    assert again.metrics[PERSONAL_ACC] >= local.metrics[PERSONAL_ACC] - 0.1
    with pytest.raises(SchemaError):
        pm.train_round(model, base, dataclasses.replace(cfg, personal_head=("9.bias",)),
                       budget=Budget(), seed=1, version=1)  # fmt: skip


def test_a_torn_personal_model_is_not_served(tmp_path: Path) -> None:
    store = DeviceStore(root=tmp_path)
    store.save_personal({"mode": "finetune"}, W)
    assert store.load_personal() is not None
    (tmp_path / "personal.weights").write_bytes(b"not the bytes the note names")
    assert store.load_personal() is None
    assert serving_weights(store, W)[1] == "global"
    assert serving_weights(store, None) == (None, "global")


def test_the_inference_path_serves_the_personal_model_when_there_is_one(tmp_path: Path) -> None:
    import hashlib

    from edge_agent.inference import serving_model
    from fedmq.tasks import get_task
    from fedmq.tasks.weights import get_weights
    from fedmq.wire import encode_weights

    task = get_task("digits-mlp")
    store = DeviceStore(root=tmp_path)
    with pytest.raises(ValueError, match="no model"):  # an inference-only device: nothing held
        serving_model(store=store, task=task)
    glob = get_weights(task.build_model())
    blob = encode_weights(glob)
    store.save_model(blob)
    store.save({"version": 3, "model_sha": hashlib.sha256(blob).hexdigest()})
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    onnx, which = serving_model(store=store, task=task)
    assert which == "global"
    mine = {k: (v * 3 if k.startswith("2.") else v) for k, v in glob.items()}
    store.save_personal({"mode": "finetune", "base_version": 3}, mine)
    personal, which = serving_model(store=store, task=task)
    expected = x @ mine["0.weight"].T + mine["0.bias"]
    expected = np.maximum(expected, 0) @ mine["2.weight"].T + mine["2.bias"]
    assert which == "personal"
    np.testing.assert_allclose(personal.logits(x), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(onnx.logits(x), expected, atol=1e-3)

"""The plaid-cnn sensor task: its reader, preprocessing, natural split, model and demo defaults."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.tasks import Task, get_task
from fedmq.tasks.partition import device_data, natural_parts, partition
from fedmq.tasks.sensors import (
    PLAID_CLASSES,
    PLAID_LENGTH,
    read_ts,
    split_by_order,
    to_fixed_length,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAID_PARAMS = 31_819
PLAID_MACS = 1_340_096  # multiply-adds of one forward pass over one series (README, Tasks)


@pytest.fixture(scope="module")
def plaid() -> Task:
    return get_task("plaid-cnn")


# -- the .ts reader and preprocessing ---------------------------------------------------------


def write_ts(tmp_path: Path, *data_lines: str) -> Path:
    path = tmp_path / "x.ts"
    path.write_text("# a comment\n@problemName X\n@classLabel true 0 1 2\n@data\n"
                    + "\n".join(data_lines) + "\n", encoding="utf-8")  # fmt: skip
    return path


def test_read_ts_reads_series_of_any_length(tmp_path: Path) -> None:
    series, labels = read_ts(write_ts(tmp_path, "1,2,3:0", "", "4.5,-1:2"), num_classes=3)
    assert [s.tolist() for s in series] == [[1.0, 2.0, 3.0], [4.5, -1.0]]
    assert labels.tolist() == [0, 2] and labels.dtype == np.int64


@pytest.mark.parametrize(
    "line, says",
    [
        ("1,2,3", "expected"),
        ("1,2:3:0", "one dimension"),
        ("1,x,3:0", "not numbers"),
        ("1,2,3:zero", "not numbers"),
        ("1,nan,3:0", "finite"),
        ("1:0", "2.."),
        ("1,2,3:3", "label 3 outside 0..2"),
        ("1,2,3:-1", "outside"),
    ],
)
def test_read_ts_names_file_and_line_of_a_bad_record(tmp_path: Path, line: str, says: str) -> None:
    path = write_ts(tmp_path, "1,2,3:0", line)
    with pytest.raises(ValueError, match=says) as err:
        read_ts(path, num_classes=3)
    assert f"{path}:6" in str(err.value)


def test_read_ts_refuses_a_file_without_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no series"):
        read_ts(write_ts(tmp_path), num_classes=3)


def test_fixed_length_resamples_and_standardises() -> None:
    ramp, flat = np.arange(5, dtype=np.float64) * 100.0, np.full(7, 3.0)
    out = to_fixed_length([ramp, flat], 9)
    assert out.shape == (2, 1, 9) and out.dtype == np.float32
    assert np.allclose(np.diff(out[0, 0]), out[0, 0, 1] - out[0, 0, 0])  # still a straight line
    assert abs(out[0].mean()) < 1e-6 and abs(out[0].std() - 1) < 1e-5
    assert not out[1].any()  # a constant series has no shape: all zeros, not NaN


# -- the real data ----------------------------------------------------------------------------


def test_plaid_shapes_labels_and_normalisation(plaid: Task) -> None:
    assert plaid.num_classes == len(PLAID_CLASSES) == 11
    assert plaid.input_shape == (1, PLAID_LENGTH)
    for X, y in (plaid.load_pool(), plaid.load_test()):
        assert X.shape == (537, 1, PLAID_LENGTH) and X.dtype == np.float32
        assert y.shape == (537,) and y.dtype == np.int64
        assert set(np.unique(y)) == set(range(11))
        assert np.isfinite(X).all()
        assert np.allclose(X.mean(axis=2), 0, atol=1e-4)
        assert np.allclose(X.std(axis=2), 1, atol=1e-3)
    # the largest class is 16% of the test set: what guessing it scores
    _, y_test = plaid.load_test()
    assert np.bincount(y_test).max() / len(y_test) < 0.17


def test_plaid_returns_fresh_writable_copies(plaid: Task) -> None:
    X, _ = plaid.load_pool()
    X[:] = 0
    X2, _ = plaid.load_pool()
    assert X2.any()


def test_importing_tasks_reads_no_data_and_imports_no_sktime() -> None:
    code = textwrap.dedent(
        """
        import sys
        import fedmq.tasks
        from fedmq.tasks.sensors import _plaid
        assert fedmq.tasks.get_task("plaid-cnn").name == "plaid-cnn"
        assert _plaid.cache_info().currsize == 0
        assert "sktime" not in sys.modules and "pandas" not in sys.modules
        fedmq.tasks.get_task("plaid-cnn").load_pool()
        assert "sktime" not in sys.modules and "pandas" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- the natural split ------------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [1, 3, 10, 40])
def test_natural_split_covers_the_pool_without_overlap(plaid: Task, num_devices: int) -> None:
    _, y = plaid.load_pool()
    parts = [device_data(plaid, scheme="natural", num_devices=num_devices, device_index=i)[1]
             for i in range(num_devices)]  # fmt: skip
    assert sum(len(p) for p in parts) == len(y)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(y))  # same label counts
    idx = plaid.natural_split(num_devices)  # type: ignore[misc]
    every = np.concatenate(idx)
    assert np.array_equal(np.sort(every), np.arange(len(y)))  # each record exactly once


def test_natural_split_gives_each_device_its_own_run_of_every_label() -> None:
    labels = np.repeat(np.arange(3), [6, 9, 3])
    parts = split_by_order(labels, 3)
    assert [p.tolist() for p in parts] == [[0, 1, 6, 7, 8, 15], [2, 3, 9, 10, 11, 16],
                                           [4, 5, 12, 13, 14, 17]]  # fmt: skip
    with pytest.raises(ValueError, match="at most 9 devices"):
        split_by_order(labels, 10)


def tiny_task(natural_split: object = None) -> Task:
    def load() -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((10, 4), dtype=np.float32), np.arange(10) % 2

    return Task(name="tiny", num_classes=2, input_shape=(4,), build_model=lambda: None,
                load_pool=load, load_test=load, natural_split=natural_split)  # type: ignore[arg-type]


def test_natural_split_is_refused_where_a_task_has_none() -> None:
    with pytest.raises(ValueError, match="has no natural split"):
        device_data(tiny_task(), scheme="natural", num_devices=2, device_index=0)
    with pytest.raises(ValueError, match="the task's own"):
        partition(np.arange(10), "natural", 2, seed=0)


def test_a_broken_natural_split_is_caught() -> None:
    def with_split(parts: list[list[int]]) -> Task:
        return tiny_task(lambda n: [np.array(p) for p in parts])

    with pytest.raises(ValueError, match="two devices"):
        natural_parts(with_split([[0, 1], [1, 2]]), 2, pool_size=10)
    with pytest.raises(ValueError, match="empty"):
        natural_parts(with_split([[0, 1], []]), 2, pool_size=10)
    with pytest.raises(ValueError, match="outside"):
        natural_parts(with_split([[0, 1], [10]]), 2, pool_size=10)
    with pytest.raises(ValueError, match="gave 1 parts for 2"):
        natural_parts(with_split([[0, 1]]), 2, pool_size=10)


# -- the model --------------------------------------------------------------------------------


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    macs = 0

    def hook(module: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, torch.nn.Conv1d):
            per_output = module.in_channels // module.groups * module.kernel_size[0]
            macs += out.numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            macs += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model(x)
    for h in handles:
        h.remove()
    return macs


def test_model_size_and_cost_are_the_documented_ones(plaid: Task) -> None:
    model = plaid.build_model()
    assert sum(p.numel() for p in model.parameters()) == PLAID_PARAMS
    assert count_macs(model, torch.zeros(1, *plaid.input_shape)) == PLAID_MACS
    names = dict(model.named_parameters())
    assert set(plaid.head) <= set(names)
    assert names[plaid.head[0]].shape == (11, 64)  # the head is the final layer


def test_a_few_steps_lower_the_loss(plaid: Task) -> None:
    torch.manual_seed(0)
    model = plaid.build_model()
    X, y = device_data(plaid, scheme="natural", num_devices=10, device_index=3)
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.functional.cross_entropy
    with torch.no_grad():
        before = float(loss_fn(model(x), t))
    for _ in range(5):  # epochs, batch 10, the demo's learning rate
        for i in range(0, len(t), 10):
            opt.zero_grad()
            loss_fn(model(x[i : i + 10]), t[i : i + 10]).backward()
            opt.step()
    with torch.no_grad():
        after = float(loss_fn(model(x), t))
    assert after < 0.9 * before, (before, after)


# -- the demo's defaults ----------------------------------------------------------------------


def demo_args(*argv: str) -> argparse.Namespace:
    from fedmq.cli import build_parser

    return build_parser().parse_args(["demo", *argv])


def test_demo_takes_the_tasks_partition_and_target(tmp_path: Path) -> None:
    from fedmq.demo_checks import check_demo_args

    args = demo_args("--task", "plaid-cnn", "--insecure")
    check_demo_args(args, tmp_path / "run")
    assert args.partition == "natural" and args.target_accuracy == get_task("plaid-cnn").demo_target
    assert 0.5 <= args.target_accuracy < 1  # a real target, far above guessing (16%)
    args = demo_args("--insecure")
    check_demo_args(args, tmp_path / "run")
    assert args.partition == "shards" and args.target_accuracy == 0.80  # mnist-2nn as before
    args = demo_args("--task", "plaid-cnn", "--partition", "iid", "--target-accuracy", "0.5")
    check_demo_args(args, tmp_path / "run")
    assert args.partition == "iid" and args.target_accuracy == 0.5  # flags win

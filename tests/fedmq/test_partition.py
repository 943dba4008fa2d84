"""Partitioning the training pool across devices: pure numpy, no torch, no datasets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.tasks import Task
from fedmq.tasks.partition import (
    SCHEMES,
    device_data,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)


def sorted_labels(num_classes: int = 10, per_class: int = 400) -> np.ndarray:
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype.kind == "i"


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each device's label mix and the pool's."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for p in parts:
        if len(p) == 0:
            continue
        mix = np.array([(labels[p] == c).mean() for c in classes])
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


# -- IID ------------------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_iid(sorted_labels(), 7, seed=1)
    sizes = [len(p) for p in parts]
    assert len(parts) == 7
    assert max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, 4000)


def test_iid_mixes_labels() -> None:
    labels = sorted_labels()
    parts = partition_iid(labels, 20, seed=0)
    assert all(len(np.unique(labels[p])) == 10 for p in parts)
    assert label_skew(parts, labels) < 0.15


# -- shards ---------------------------------------------------------------------------------


def test_shards_fedavg_layout() -> None:
    labels = sorted_labels()
    parts = partition_shards(labels, 20, shards_per_device=2, seed=0)
    assert_disjoint_cover(parts, 4000)
    assert [len(p) for p in parts] == [200] * 20
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_shards_sort_unsorted_labels_first() -> None:
    labels = np.random.default_rng(3).permutation(sorted_labels())
    parts = partition_shards(labels, 20, seed=5)
    assert_disjoint_cover(parts, 4000)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_shards_per_device_bounds_classes() -> None:
    labels = sorted_labels()
    # 10 devices x 4 shards = 40 shards of 100, so no shard straddles two classes
    parts = partition_shards(labels, 10, shards_per_device=4, seed=0)
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)


def test_shards_impossible_raises() -> None:
    with pytest.raises(ValueError, match="shards"):
        partition_shards(np.zeros(10, dtype=np.int64), 6, shards_per_device=2, seed=0)
    with pytest.raises(ValueError, match="shards_per_device"):
        partition_shards(sorted_labels(), 4, shards_per_device=0, seed=0)


# -- Dirichlet ------------------------------------------------------------------------------


def test_dirichlet_covers_and_respects_min_size() -> None:
    labels = sorted_labels()
    parts = partition_dirichlet(labels, 20, alpha=0.1, seed=0, min_size=10)
    assert_disjoint_cover(parts, 4000)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_skew_decreases_as_alpha_grows() -> None:
    labels = sorted_labels()
    skews = [
        np.mean(
            [
                label_skew(partition_dirichlet(labels, 20, alpha=alpha, seed=s), labels)
                for s in range(5)
            ]
        )
        for alpha in (0.05, 0.5, 5.0, 500.0)
    ]
    assert skews == sorted(skews, reverse=True)
    assert skews[0] > 0.6
    assert skews[-1] < 0.1


def test_dirichlet_bad_arguments() -> None:
    labels = sorted_labels()
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, 5, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        partition_dirichlet(labels, 5, alpha=0.5, seed=0, min_size=1000)


def test_dirichlet_gives_up_with_advice() -> None:
    # 2 samples per class across 50 devices at tiny alpha: one device always ends up empty
    labels = sorted_labels(num_classes=30, per_class=2)
    with pytest.raises(ValueError, match="raise alpha"):
        partition_dirichlet(labels, 50, alpha=0.001, seed=0, min_size=1)


# -- dispatch, determinism, errors ----------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_partition(scheme: str) -> None:
    labels = sorted_labels()
    a = partition(labels, scheme, 20, seed=42)
    b = partition(labels, scheme, 20, seed=42)
    c = partition(labels, scheme, 20, seed=43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dispatch_matches_direct_calls() -> None:
    labels = sorted_labels()
    pairs = [
        (partition(labels, "iid", 8, seed=1), partition_iid(labels, 8, seed=1)),
        (
            partition(labels, "shards", 8, seed=1, shards_per_device=3),
            partition_shards(labels, 8, shards_per_device=3, seed=1),
        ),
        (
            partition(labels, "dirichlet", 8, seed=1, alpha=0.3),
            partition_dirichlet(labels, 8, alpha=0.3, seed=1),
        ),
    ]
    for got, want in pairs:
        assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="iid, shards, dirichlet"):
        partition(sorted_labels(), "pathological", 4, seed=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_device_count_errors(scheme: str) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        partition(sorted_labels(), scheme, 0, seed=0)
    with pytest.raises(ValueError, match="fewer devices"):
        partition(np.zeros(5, dtype=np.int64), scheme, 6, seed=0)


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_iid(np.zeros((4, 4), dtype=np.int64), 2, seed=0)


# -- properties -----------------------------------------------------------------------------

label_arrays = st.integers(min_value=1, max_value=300).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 9), min_size=n, max_size=n).map(
            lambda xs: np.array(xs, dtype=np.int64)
        ),
        st.integers(1, n),
        st.integers(0, 2**32 - 1),
    )
)


@settings(max_examples=60, deadline=None)
@given(label_arrays)
def test_iid_property(case: tuple[np.ndarray, int, int]) -> None:
    labels, devices, seed = case
    parts = partition_iid(labels, devices, seed=seed)
    assert len(parts) == devices
    assert_disjoint_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(label_arrays, st.integers(1, 4))
def test_shards_property(case: tuple[np.ndarray, int, int], per_device: int) -> None:
    labels, devices, seed = case
    if devices * per_device > len(labels):
        with pytest.raises(ValueError):
            partition_shards(labels, devices, shards_per_device=per_device, seed=seed)
        return
    parts = partition_shards(labels, devices, shards_per_device=per_device, seed=seed)
    assert len(parts) == devices
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= per_device


@settings(max_examples=60, deadline=None)
@given(label_arrays, st.floats(0.05, 100.0))
def test_dirichlet_property(case: tuple[np.ndarray, int, int], alpha: float) -> None:
    labels, devices, seed = case
    try:
        parts = partition_dirichlet(labels, devices, alpha=alpha, seed=seed)
    except ValueError as err:
        assert "raise alpha" in str(err)
        return
    assert len(parts) == devices
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


# -- device_data ----------------------------------------------------------------------------


def synthetic_task() -> Task:
    labels = sorted_labels(num_classes=4, per_class=25)
    features = np.arange(len(labels) * 2, dtype=np.float32).reshape(-1, 2)

    def load() -> tuple[np.ndarray, np.ndarray]:
        return features.copy(), labels.copy()

    def no_model() -> None:
        raise AssertionError("device_data must not build a model")

    return Task(
        name="synthetic",
        num_classes=4,
        input_shape=(2,),
        build_model=no_model,  # type: ignore[arg-type]
        load_pool=load,
        load_test=load,
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_device_data_slices_the_pool(scheme: str) -> None:
    task = synthetic_task()
    X_pool, y_pool = task.load_pool()
    rows = []
    for i in range(5):
        X, y = device_data(task, scheme=scheme, num_devices=5, device_index=i, seed=7)
        again = device_data(task, scheme=scheme, num_devices=5, device_index=i, seed=7)
        assert np.array_equal(X, again[0]) and np.array_equal(y, again[1])
        assert X.shape[1:] == (2,) and len(X) == len(y)
        # each feature row encodes its pool index, so labels must travel with it
        idx = (X[:, 0] // 2).astype(np.int64)
        assert np.array_equal(y, y_pool[idx])
        rows.append(idx)
    assert_disjoint_cover(rows, len(y_pool))


def test_device_data_index_out_of_range() -> None:
    task = synthetic_task()
    with pytest.raises(ValueError, match="device_index"):
        device_data(task, scheme="iid", num_devices=5, device_index=5)
    with pytest.raises(ValueError, match="num_devices"):
        device_data(task, scheme="iid", num_devices=0, device_index=0)

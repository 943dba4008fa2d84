"""Split a training pool's labels across devices: IID, FedAvg label shards, or Dirichlet skew.

Pure numpy, seeded with np.random.default_rng(seed), so an agent in any process computes
the same partition from the same arguments without anyone sending it the indices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedmq.tasks import Task

SCHEMES = ("iid", "shards", "dirichlet")
# the task's own split (Task.natural_split), for tasks whose data has one
NATURAL = "natural"
ALL_SCHEMES = (*SCHEMES, NATURAL)
MAX_DIRICHLET_ATTEMPTS = 1000


def _check(labels: np.ndarray, num_devices: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if num_devices > len(labels):
        raise ValueError(
            f"cannot give {num_devices} devices at least one sample each from "
            f"{len(labels)} samples; use fewer devices"
        )
    return labels


def partition_iid(labels: np.ndarray, num_devices: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the samples out evenly; sizes differ by at most one."""
    labels = _check(labels, num_devices)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_devices)]


def partition_shards(
    labels: np.ndarray, num_devices: int, *, shards_per_device: int = 2, seed: int
) -> list[np.ndarray]:
    """FedAvg's pathological non-IID split: sort by label, cut into shards, deal shards out."""
    labels = _check(labels, num_devices)
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be at least 1, got {shards_per_device}")
    num_shards = num_devices * shards_per_device
    if num_shards > len(labels):
        raise ValueError(
            f"{num_devices} devices x {shards_per_device} shards need {num_shards} shards, "
            f"but there are only {len(labels)} samples; use fewer devices or shards per device"
        )
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, num_shards)
    deal = np.random.default_rng(seed).permutation(num_shards).reshape(num_devices, -1)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


def partition_dirichlet(
    labels: np.ndarray, num_devices: int, *, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, split its samples by proportions drawn from Dir(alpha); smaller alpha skews more.

    Draws again until every device holds at least min_size samples.
    """
    labels = _check(labels, num_devices)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be non-negative, got {min_size}")
    if num_devices * min_size > len(labels):
        raise ValueError(
            f"{num_devices} devices x min_size {min_size} exceeds the {len(labels)} samples; "
            "use fewer devices or a smaller min_size"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    class_sizes = np.array([len(idx) for idx in by_class])
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        shares = rng.dirichlet(np.full(num_devices, alpha), size=len(by_class))
        if not np.isfinite(shares).all():  # older numpy can give NaN for tiny alpha
            continue
        # cut points into each class's samples; cheap to check before building any arrays
        ends = (np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
        ends[:, -1] = class_sizes
        counts = np.diff(ends, axis=1, prepend=0)
        if counts.sum(axis=0).min() < min_size:
            continue
        pieces = [
            np.split(rng.permutation(idx), row[:-1])
            for idx, row in zip(by_class, ends, strict=True)
        ]
        return [np.sort(np.concatenate(per_device)) for per_device in zip(*pieces, strict=True)]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_ATTEMPTS} attempts gave all "
        f"{num_devices} devices at least {min_size} samples; raise alpha, or lower "
        "num_devices or min_size"
    )


def partition(
    labels: np.ndarray,
    scheme: str,
    num_devices: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_device: int = 2,
) -> list[np.ndarray]:
    """Index arrays, one per device, for scheme 'iid', 'shards' or 'dirichlet'."""
    if scheme == "iid":
        return partition_iid(labels, num_devices, seed=seed)
    if scheme == "shards":
        return partition_shards(labels, num_devices, shards_per_device=shards_per_device, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_devices, alpha=alpha, seed=seed)
    if scheme == NATURAL:
        raise ValueError("the natural partition is the task's own: use device_data(task, ...)")
    raise ValueError(
        f"unknown partition scheme {scheme!r}; valid schemes are {', '.join(ALL_SCHEMES)}"
    )


def natural_parts(task: Task, num_devices: int, pool_size: int) -> list[np.ndarray]:
    """task.natural_split(num_devices), checked: one index array per device, disjoint, each
    non-empty and inside the pool."""
    if task.natural_split is None:
        raise ValueError(
            f"task {task.name!r} has no natural split; use --partition "
            f"{', '.join(SCHEMES[:-1])} or {SCHEMES[-1]}"
        )
    parts = [np.asarray(p, dtype=np.int64) for p in task.natural_split(num_devices)]
    if len(parts) != num_devices:
        raise ValueError(
            f"task {task.name!r}: its natural split gave {len(parts)} parts for {num_devices} "
            "devices"
        )
    every = np.concatenate(parts)
    if min(p.size for p in parts) == 0 or every.min() < 0 or every.max() >= pool_size:
        raise ValueError(f"task {task.name!r}: its natural split left a device empty or "
                         f"pointed outside the {pool_size}-sample pool")  # fmt: skip
    if np.unique(every).size != every.size:
        raise ValueError(f"task {task.name!r}: its natural split gave a sample to two devices")
    return parts


def device_data(
    task: Task,
    *,
    scheme: str,
    num_devices: int,
    device_index: int,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_device: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """One device's (X, y) share of task.load_pool(), the same in every process."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if not 0 <= device_index < num_devices:
        raise ValueError(
            f"device_index must be in 0..{num_devices - 1} for {num_devices} devices, "
            f"got {device_index}"
        )
    if task.load_pool is None:
        raise ValueError(f"task {task.name} has no bundled pool to share out; give each "
                         "device its own data (--data)")
    X, y = task.load_pool()
    if scheme == NATURAL:
        parts = natural_parts(task, num_devices, len(y))
    else:
        parts = partition(
            y, scheme, num_devices, seed=seed, alpha=alpha, shards_per_device=shards_per_device
        )
    idx = parts[device_index]
    return X[idx], y[idx]

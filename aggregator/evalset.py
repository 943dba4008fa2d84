"""The aggregator's central test set, which is optional (setting `eval_data`).

    ""      the task's bundled test set when it has one (the built-in tasks do)
    "none"  no central evaluation: devices evaluate each version (aggregator.fedeval)
    a path  a `.npz` file with arrays `x` (n, *input_shape) and `y` (n,) class indices

Without a central test set a version's metrics are empty; the aggregator still refuses a
model whose weights, or whose outputs on a probe input, are not finite (aggregator.globals).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmq.config import ConfigError

if TYPE_CHECKING:
    from fedmq.tasks import Task

Arrays = tuple[np.ndarray, np.ndarray]

NO_EVAL = "none"


def central_test_set(task: Task, eval_data: str) -> Arrays | None:
    """The arrays the aggregator evaluates each version on; None for no central evaluation.
    ConfigError (one line naming the file) when a given file cannot serve as the test set."""
    if eval_data.strip().lower() == NO_EVAL:
        return None
    if not eval_data:
        load = getattr(task, "load_test", None)
        return load() if callable(load) else None
    return read_npz_test_set(Path(eval_data), task)


def read_npz_test_set(path: Path, task: Task) -> Arrays:
    """x and y of an .npz file, checked against the task's input shape and labels."""
    if not path.is_file():
        raise ConfigError(f"eval_data {path}: no such file")
    # never pickle: loading pickled bytes runs code
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise ConfigError(f"eval_data {path}: needs arrays 'x' and 'y', has "
                                  f"{', '.join(sorted(data.files)) or 'none'}")  # fmt: skip
            x, y = data["x"], data["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"eval_data {path}: cannot read it as .npz ({err})") from None
    shape = tuple(task.input_shape)
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError(f"eval_data {path}: 'x' is empty")
    if x.shape[1:] != shape:
        raise ConfigError(f"eval_data {path}: 'x' has examples of shape {x.shape[1:]}, task "
                          f"{task.name} takes {shape}")  # fmt: skip
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ConfigError(f"eval_data {path}: 'x' must be numeric, is {x.dtype}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"eval_data {path}: 'y' must be {len(x)} integer class indices, is "
                          f"{y.dtype} of shape {y.shape}")  # fmt: skip
    if y.min() < 0 or y.max() >= task.num_classes:
        raise ConfigError(f"eval_data {path}: labels must be in [0, {task.num_classes - 1}], "
                          f"found {int(y.min())}..{int(y.max())}")  # fmt: skip
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"eval_data {path}: 'x' has non-finite values")
    return x, y.astype(np.int64)

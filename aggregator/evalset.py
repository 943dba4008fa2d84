"""The aggregator's central test set, which is optional (setting `eval_data`).

    ""      the task's bundled test set when it has one (the built-in tasks do)
    "none"  no central evaluation: devices evaluate each version (aggregator.fedeval)
    a path  any source a device's --data takes (fedmq.datasources): an .npz with x and y,
            a CSV with a `label` column, a folder of class subfolders of
            images, or a module:attr / file.py:attr data source

Without a central test set a version's metrics are empty; the aggregator still refuses a
model whose weights, or whose outputs on a probe input, are not finite (aggregator.globals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmq.config import ConfigError
from fedmq.datasources import load_data

if TYPE_CHECKING:
    from fedmq.tasks import Task

Arrays = tuple[np.ndarray, np.ndarray]

NO_EVAL = "none"


def central_test_set(task: Task, eval_data: str, *, label_column: str = "label") -> Arrays | None:
    """The arrays the aggregator evaluates each version on; None for no central evaluation.
    ConfigError (one line naming the file) when a given file cannot serve as the test set."""
    if eval_data.strip().lower() == NO_EVAL:
        return None
    if not eval_data:
        load = getattr(task, "load_test", None)
        return load() if callable(load) else None
    try:
        return load_data(eval_data, task=task, label_column=label_column)
    except ConfigError as err:  # the aggregator's setting is eval_data, not a device's data
        text = str(err)
        raise ConfigError("eval_" + text if text.startswith("data ") else text) from None

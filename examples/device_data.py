"""A device's own data as a Python data source: `--data examples/device_data.py:stream`.

fedmq reads .npz, CSV and image folders itself (docs/devices.md); for anything else (a
sensor read in batches, a database, a custom file format) point --data at a function. It
returns (x, y), or yields (x, y) batches as this one does; fedmq checks the examples
against the task (shape, finite numbers, labels in range) and reads a stream up to
fedmq.datasources.MAX_EXAMPLES examples.

Here the "sensor" is scikit-learn's 8x8 digits, dealt out by EXAMPLE_DEVICE (this
device's number, default 0) of EXAMPLE_DEVICES (default 4): not FEDMQ_* names, which
are fedmq's own settings (an unknown one is an error). Run it from the
repository root with the task next to it, from an installed `fedmq` console script:

    fedmq agent --task examples.digits_cnn:TASK --data examples/device_data.py:stream \\
        --insecure --device-id d0

(or --task examples/digits_cnn.py:TASK: a file path works from any directory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

BATCH = 50


def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This device's examples in batches of BATCH, as a sensor would deliver them."""
    from sklearn.datasets import load_digits

    device = int(os.environ.get("EXAMPLE_DEVICE", "0"))
    devices = int(os.environ.get("EXAMPLE_DEVICES", "4"))
    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float32) / 16.0)[device::devices]
    y = np.asarray(digits.target, dtype=np.int64)[device::devices]
    for first in range(0, len(x), BATCH):  # flat 64 values: fedmq reshapes them to 1x8x8
        yield x[first : first + BATCH], y[first : first + BATCH]

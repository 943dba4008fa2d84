"""A real sensor task: appliance recognition from plug-level current (PLAID, bundled with sktime).

PLAID1 (Gao et al., 2014) recorded the current drawn by 11 appliance types in 56 households in
Pittsburgh, sampled at 30 kHz; the UCR/UEA edit that sktime ships
(sktime/datasets/data/PLAID/PLAID_{TRAIN,TEST}.ts) keeps one current series per record,
537 records for training and 537 for testing, of lengths 100 to 1,344 samples, and the
appliance type as the label. It does not keep the household or the appliance unit: its
records are sorted by label and, inside a label, in the original recording order, where each
unit's 3 to 6 recordings follow one another (neighbours in that order are more alike than two
records of the same label picked at random: mean correlation 0.48 against 0.38).

So the natural split here is by recording order: each label's records, in file order, are
cut into one contiguous block per device, and device i takes block i of every label. A device
is a household's smart plug: it sees every kind of appliance, but its own units of each,
not a random sample of everyone's. (A split by household would be the truly natural one;
the bundled copy cannot give it, so this is the closest the data allows.)

Nothing here imports sktime: the .ts files are found through the installed package's
location and parsed by a small reader below (sktime's own loader needs pandas, and a
device does not). Preprocessing runs once per process and is cached: each series is
resampled to 256 points by linear interpolation and standardised on its own (zero mean,
unit variance), since amplitudes span six orders of magnitude across appliances.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmq.tasks import Arrays, Task, _import_torch, _readonly

if TYPE_CHECKING:
    import torch

PLAID_CLASSES = (
    "air conditioner", "compact fluorescent lamp", "fan", "fridge", "hairdryer", "heater",
    "incandescent light bulb", "laptop", "microwave", "vacuum", "washing machine",
)  # fmt: skip
PLAID_LENGTH = 256  # points per series after resampling
PLAID_WIDTH = 32  # channels of the CNN's first block (the later blocks have twice as many)
# the bundled files hold 537 + 537 series of at most 1,344 points; anything far beyond is
# not the file we expect
MAX_TS_SERIES = 10_000
MAX_TS_POINTS = 100_000


def _sktime_data_dir() -> Path:
    """Where the installed sktime keeps its bundled datasets, without importing sktime."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the plaid-cnn task reads PLAID from the sktime package; install it with "
            "`pip install fedmq[sensors]` (or fedmq[data])",
            name="sktime",  # fedmq/cli_errors.py turns this into one line and exit 5
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_ts(path: Path, num_classes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The univariate series and integer labels of a .ts file (sktime/UEA format).

    Comment lines start with '#', header lines with '@'; after '@data' each line is
    'v1,v2,...,vn:label'. Raises ValueError naming the file and line for anything else.
    """
    series: list[np.ndarray] = []
    labels: list[int] = []
    in_data = False
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower().startswith("@data")
                continue
            where = f"{path}:{lineno}"
            values, sep, label = line.rpartition(":")
            if not sep or ":" in values:
                raise ValueError(f"{where}: expected 'v1,v2,...:label' (one dimension)")
            try:
                x = np.array(values.split(","), dtype=np.float64)
                y = int(label)
            except ValueError as err:
                raise ValueError(f"{where}: not numbers: {err}") from err
            if not 2 <= x.size <= MAX_TS_POINTS or not np.isfinite(x).all():
                raise ValueError(f"{where}: a series needs 2..{MAX_TS_POINTS} finite values")
            if not 0 <= y < num_classes:
                raise ValueError(f"{where}: label {y} outside 0..{num_classes - 1}")
            if len(series) >= MAX_TS_SERIES:
                raise ValueError(f"{path}: more than {MAX_TS_SERIES} series")
            series.append(x)
            labels.append(y)
    if not series:
        raise ValueError(f"{path}: no series after '@data'")
    return series, np.asarray(labels, dtype=np.int64)


def to_fixed_length(series: list[np.ndarray], length: int) -> np.ndarray:
    """(n, 1, length) float32: each series resampled linearly and standardised on its own."""
    out = np.empty((len(series), 1, length), dtype=np.float32)
    for i, s in enumerate(series):
        r = np.interp(np.linspace(0.0, s.size - 1, length), np.arange(s.size), s)
        std = r.std()
        out[i, 0] = (r - r.mean()) / std if std > 0 else 0.0
    return out


@lru_cache(maxsize=1)
def _plaid() -> tuple[np.ndarray, ...]:
    root = _sktime_data_dir() / "PLAID"
    arrays: list[np.ndarray] = []
    for split in ("TRAIN", "TEST"):
        path = root / f"PLAID_{split}.ts"
        if not path.is_file():
            raise ImportError(f"{path} is missing: this sktime does not bundle PLAID")
        series, y = read_ts(path, len(PLAID_CLASSES))
        arrays += [to_fixed_length(series, PLAID_LENGTH), y]
    return _readonly(*arrays)


def _plaid_pool() -> Arrays:
    X, y, _, _ = _plaid()
    return X.copy(), y.copy()


def _plaid_test() -> Arrays:
    _, _, X, y = _plaid()
    return X.copy(), y.copy()


def split_by_order(labels: np.ndarray, num_devices: int) -> list[np.ndarray]:
    """Each label's indices, in order, cut into num_devices contiguous blocks; device i takes
    block i of every label. Deterministic (no seed): the order is the data's."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    blocks = [np.array_split(np.flatnonzero(labels == c), num_devices) for c in np.unique(labels)]
    parts = [np.sort(np.concatenate([b[i] for b in blocks])) for i in range(num_devices)]
    if min(p.size for p in parts) == 0:
        largest = max(int((labels == c).sum()) for c in np.unique(labels))
        raise ValueError(
            f"the natural split gives some of {num_devices} devices no records; it allows at "
            f"most {largest} devices"
        )
    return parts


def _plaid_natural(num_devices: int) -> list[np.ndarray]:
    _, y = _plaid_pool()
    return split_by_order(y, num_devices)


def plaid_cnn() -> torch.nn.Module:
    """A 1-D CNN for (1, 256) current series: 31,819 parameters, about 1.34 M multiply-adds
    per series (README, Tasks)."""
    nn = _import_torch().nn
    w = PLAID_WIDTH
    return nn.Sequential(
        nn.Conv1d(1, w, kernel_size=7, stride=2, padding=3),  # 256 -> 128
        nn.ReLU(),
        nn.MaxPool1d(2),  # 64
        nn.Conv1d(w, 2 * w, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),  # 32
        nn.Conv1d(2 * w, 2 * w, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(1),  # the strongest response anywhere in the series
        nn.Flatten(),
        nn.Linear(2 * w, len(PLAID_CLASSES)),
    )


PLAID_CNN = Task(
    name="plaid-cnn",
    num_classes=len(PLAID_CLASSES),
    input_shape=(1, PLAID_LENGTH),
    build_model=plaid_cnn,
    load_pool=_plaid_pool,
    load_test=_plaid_test,
    description="PLAID plug-level appliance current (sktime): 11 appliance types, 537 train / "
    "537 test series of 256 points; 1-D CNN, 32k parameters; natural split",
    head=("10.weight", "10.bias"),
    labels=PLAID_CLASSES,
    natural_split=_plaid_natural,
    demo_partition="natural",
    # `fedmq demo --task plaid-cnn` (10 devices, natural split less a 20% holdout each, 2
    # epochs of batch 10 at lr 0.05, compressed both ways) reached 0.70 at round 26, 28 and 23
    # of 60 (seeds 0-2) and peaked near 0.74 (README, Tasks); the largest class is 0.16
    demo_target=0.70,
)

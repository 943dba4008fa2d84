"""A device's own data: `load_data(spec, task=...)` -> (x float32 (n, *input_shape), y int64).

    data.npz            arrays x (or X) and y (or Y); never pickled objects
    data.csv            a header row, a label column (label_column, default "label") and
                        numeric feature columns, reshaped to the task's input shape
    images/             one subfolder per class, named by the task's labels; the images are
                        converted (grey or RGB) and resized to the input shape, scaled to
                        [0, 1]; needs Pillow
    module:attr         a Python data source for sensor streams and custom formats: (x, y), an
    file.py:attr        iterable of (x, y) batches, or a zero-argument callable returning one

Labels are class indices 0 .. num_classes - 1, or names in the task's label set (strings in
a CSV or npz, folder names). x may come flat or in any shape with the input shape's number
of values per example. Every fault (a missing or unreadable file, a wrong shape, non-numeric
or non-finite values, a label outside the task's, no examples, x and y of different lengths)
is a ConfigError: one line naming the file. Imports only numpy (and Pillow for images).
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.config import ConfigError
from fedmq.importspec import is_import_spec, resolve_spec

if TYPE_CHECKING:
    from fedmq.tasks import Task

__all__ = ["IMAGE_SUFFIXES", "MAX_EXAMPLES", "load_data"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff")
MAX_EXAMPLES = 1_000_000  # a data source (a stream) is read up to this many examples
Arrays = tuple[np.ndarray, np.ndarray]


def load_data(spec: str, *, task: Task, label_column: str = "label") -> Arrays:
    """The examples spec names, checked against the task; ConfigError naming the source."""
    if not spec:
        raise ConfigError("no data source given")
    path = Path(spec).expanduser()
    as_file = path.is_file() or not is_import_spec(spec)  # "/data/12:30.npz" is a file
    if path.is_dir():
        x, y = _load_image_folders(path, task)
    elif as_file and path.suffix.lower() == ".npz":
        x, y = _load_npz(path, task)
    elif as_file and path.suffix.lower() == ".csv":
        x, y = _load_csv(path, task, label_column)
    elif not as_file:
        x, y = _load_source(spec, task)
    elif not path.exists():
        raise ConfigError(f"data {spec}: no such file or directory")
    else:
        raise ConfigError(f"data {spec}: unknown format; give a .npz or .csv file, a folder of "
                          "class subfolders of images, or module:attr / file.py:attr")  # fmt: skip
    return check_examples(x, y, task=task, source=spec)


def check_examples(x: Any, y: Any, *, task: Task, source: str) -> Arrays:
    """(x, y) as float32 (n, *input_shape) and int64 class indices; ConfigError otherwise."""
    try:
        x = np.asarray(x)
        y = np.asarray(y)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"data {source}: not arrays of numbers: {err}") from err
    if x.ndim == 0 or y.ndim == 0:
        raise ConfigError(f"data {source}: x and y must be arrays with one row per example")
    if len(x) != len(y):
        raise ConfigError(f"data {source}: x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise ConfigError(f"data {source}: no examples")
    if x.dtype.kind not in "biuf":
        raise ConfigError(f"data {source}: x must be numeric, got dtype {x.dtype}")
    want = math.prod(task.input_shape)
    per_example = math.prod(x.shape[1:])
    if per_example != want:
        raise ConfigError(
            f"data {source}: each example has shape {x.shape[1:]} ({per_example} values) but "
            f"task {task.name} takes {task.input_shape} ({want} values)"
        )
    x = x.astype(np.float32).reshape(len(x), *task.input_shape)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise ConfigError(f"data {source}: example {bad} has a NaN or infinite value")
    return x, label_indices(y, task=task, source=source)


def label_indices(y: np.ndarray, *, task: Task, source: str) -> np.ndarray:
    """Labels as int64 class indices: names of the task's label set, or indices in range."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"data {source}: y must be one label per example, got shape {y.shape}")
    if y.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(task.labels)}
        out = np.empty(len(y), dtype=np.int64)
        for i, value in enumerate(y):
            name = str(value).strip()
            if name in index:
                out[i] = index[name]
            elif _is_int(name) and 0 <= int(name) < task.num_classes:
                out[i] = int(name)
            else:
                raise ConfigError(
                    f"data {source}: label {name!r} (example {i}) is not one of task "
                    f"{task.name}'s labels {_shown(task.labels)}"
                )
        return out
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise ConfigError(f"data {source}: labels must be whole numbers (class indices)")
    elif y.dtype.kind not in "biu":
        raise ConfigError(f"data {source}: labels must be class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    outside = np.flatnonzero((y < 0) | (y >= task.num_classes))
    if len(outside):
        i = int(outside[0])
        raise ConfigError(f"data {source}: label {int(y[i])} (example {i}) is outside task "
                          f"{task.name}'s classes 0..{task.num_classes - 1}")  # fmt: skip
    return y


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _shown(labels: Sequence[str]) -> str:
    return ", ".join(labels) if len(labels) <= 12 else ", ".join(labels[:12]) + ", ..."


def _require_file(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"data {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"data {path}: not a file")


def _load_npz(path: Path, task: Task) -> Arrays:
    _require_file(path)
    if not zipfile.is_zipfile(path):  # else np.load would take it for a pickle
        raise ConfigError(f"data {path}: not a .npz file (np.savez writes a zip archive)")
    try:
        # never pickle: loading pickled objects runs code
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            xk = "x" if "x" in names else "X" if "X" in names else None
            yk = "y" if "y" in names else "Y" if "Y" in names else None
            if xk is None or yk is None:
                raise ConfigError(f"data {path}: needs arrays 'x' and 'y', has "
                                  f"{sorted(names) or 'none'}")  # fmt: skip
            return npz[xk], npz[yk]
    except ConfigError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"data {path}: cannot read it as .npz: {err}") from err


def _load_csv(path: Path, task: Task, label_column: str) -> Arrays:
    _require_file(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                raise ConfigError(f"data {path}: empty file")
            header = [h.strip() for h in header]
            if label_column not in header:
                raise ConfigError(f"data {path}: no label column {label_column!r} in its header "
                                  "(set label_column)")  # fmt: skip
            at = header.index(label_column)
            labels: list[str] = []
            features: list[list[float]] = []
            for line, row in enumerate(rows, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise ConfigError(f"data {path}: line {line} has {len(row)} fields, the "
                                      f"header {len(header)}")  # fmt: skip
                labels.append(row[at].strip())
                try:
                    features.append([float(c) for i, c in enumerate(row) if i != at])
                except ValueError as err:
                    raise ConfigError(f"data {path}: line {line}: {err}") from err
                if len(labels) > MAX_EXAMPLES:
                    raise ConfigError(f"data {path}: more than {MAX_EXAMPLES} rows")
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"data {path}: cannot read it as CSV: {err}") from err
    x = np.asarray(features, dtype=np.float64).reshape(len(features), len(header) - 1)
    return x, np.asarray(labels, dtype=str)


def _image_mode(task: Task, folder: Path) -> tuple[str, tuple[int, int]]:
    shape = task.input_shape
    if len(shape) == 3 and shape[0] in (1, 3):
        return ("L" if shape[0] == 1 else "RGB"), (shape[2], shape[1])
    if len(shape) == 2:
        return "L", (shape[1], shape[0])
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    if side and side * side == shape[0]:
        return "L", (side, side)
    raise ConfigError(
        f"data {folder}: task {task.name}'s input shape {shape} is not an image "
        "(C x H x W with C 1 or 3, H x W, or a square number of grey pixels)"
    )


def _load_image_folders(folder: Path, task: Task) -> Arrays:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # the CLI names the extra (fedmq.cli_errors.EXTRAS): exit 5
        raise ImportError(f"reading the image folders of {folder} needs Pillow "
                          "(fedmq's 'images' extra)") from err  # fmt: skip
    mode, size = _image_mode(task, folder)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"data {folder}: no class subfolders (one per label, e.g. "
                          f"{folder}/{task.labels[0]}/)")  # fmt: skip
    index = {name: i for i, name in enumerate(task.labels)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for sub in classes:
        if sub.name not in index:
            raise ConfigError(f"data {sub}: folder name {sub.name!r} is not one of task "
                              f"{task.name}'s labels {_shown(task.labels)}")  # fmt: skip
        for file in sorted(sub.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    pixels = np.asarray(img.convert(mode).resize(size), dtype=np.float32)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise ConfigError(f"data {file}: cannot read the image: {err}") from err
            if pixels.ndim == 3:  # H x W x C -> C x H x W
                pixels = pixels.transpose(2, 0, 1)
            xs.append(pixels / 255.0)
            ys.append(index[sub.name])
            if len(xs) > MAX_EXAMPLES:
                raise ConfigError(f"data {folder}: more than {MAX_EXAMPLES} images")
    if not xs:
        raise ConfigError(f"data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its "
                          "class subfolders")  # fmt: skip
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _load_source(spec: str, task: Task) -> Arrays:
    try:
        obj = resolve_spec(spec, what="data source")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        if callable(obj):
            obj = obj()
        if _is_pair(obj):
            return obj[0], obj[1]
        if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, np.ndarray)):
            return _concat_batches(obj, spec)
    except ConfigError:
        raise
    except Exception as err:  # the user's code: whatever it raises, one line
        raise ConfigError(f"data {spec}: the data source failed: "
                          f"{type(err).__name__}: {err}") from err  # fmt: skip
    raise ConfigError(f"data {spec}: gave a {type(obj).__name__}; a data source gives (x, y), "
                      "an iterable of (x, y) batches, or a function returning one")  # fmt: skip


def _is_pair(obj: Any) -> bool:
    return (isinstance(obj, tuple) and len(obj) == 2
            and not isinstance(obj[0], tuple | list))  # fmt: skip


def _concat_batches(batches: Iterable[Any], spec: str) -> Arrays:
    xs, ys, n = [], [], 0
    for i, batch in enumerate(batches):
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise ConfigError(f"data {spec}: batch {i} is not an (x, y) pair")
        bx, by = np.asarray(batch[0]), np.asarray(batch[1])
        if bx.ndim == 0 or by.ndim == 0 or len(bx) != len(by):
            raise ConfigError(f"data {spec}: batch {i}: x and y must have one row per example "
                              "each, as many of each")  # fmt: skip
        xs.append(bx)
        ys.append(by)
        n += len(bx)
        if n >= MAX_EXAMPLES:  # an endless stream: what came so far is the data
            break
    if not xs:
        raise ConfigError(f"data {spec}: no examples")
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise ConfigError(f"data {spec}: batches of different example shapes {sorted(shapes)}")
    return np.concatenate(xs)[:MAX_EXAMPLES], np.concatenate(ys)[:MAX_EXAMPLES]

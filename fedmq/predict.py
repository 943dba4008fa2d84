"""`fedmq predict FILE`: the device's current verified model on a file's inputs.

Reads what the agent serves (<state_dir>/<device>/serving/, edge_agent/serving.py), checks
its sha256 and verifies it again on the file's inputs, and prints one prediction per example
(`--json`: one object). Needs numpy and onnxruntime only: no torch, no dataset, no broker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.cli_errors import EXIT_CONFIG, EXIT_NOT_READY, FatalError

BATCH = 256


def load_inputs(path: Path) -> np.ndarray:
    """The examples in a .npz (array `x` or `X`, or its only array; a `y` is ignored), .npy
    or numeric .csv (one example per row, an optional header line; a `label` column, as in
    --data files, is dropped); FatalError (exit 2) naming the file."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                key = next((k for k in ("x", "X") if k in names), None)
                if key is None and len(names) != 1:
                    raise ValueError(f"it holds {names}, no array named x")
                x = z[key or names[0]]
        elif path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            x = _load_csv(path)
        else:
            raise ValueError("expected a .npz (array x), .npy or .csv file")
        if not np.issubdtype(x.dtype, np.number) or x.ndim < 1 or len(x) == 0:
            raise ValueError(f"expected a non-empty numeric array, got {x.dtype} {x.shape}")
        return np.asarray(x, dtype=np.float32)
    except (OSError, ValueError) as err:
        raise FatalError(f"cannot read inputs from {path}: {err}", exit_code=EXIT_CONFIG) from err


def _load_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip().split(",")
    try:
        [float(v) for v in first]
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError:  # a header line
        keep = [i for i, name in enumerate(first) if name.strip() != "label"]
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, skiprows=1,
                          usecols=keep)  # fmt: skip


def predict_file(path: Path, *, state_dir: Path, device: str) -> dict[str, Any]:
    """Predictions of the device's served model for the file's examples."""
    from edge_agent.serving import Refused, ServingDir, Spec, verify_onnx

    root = state_dir / device / "serving"
    x = load_inputs(path)
    try:
        pointer = ServingDir(root).read_pointer()
        if pointer is None:
            raise FatalError(f"no verified model in {root}: run the agent (`fedmq agent "
                             f"--state-dir {state_dir} --device-id {device}`) until it serves "
                             "one", exit_code=EXIT_NOT_READY)  # fmt: skip
        spec = Spec(task=pointer["task"], input_shape=pointer["input_shape"],
                    num_classes=pointer["num_classes"])  # fmt: skip
        try:
            x = spec.batch(x, max_rows=len(x))
        except ValueError as err:
            raise FatalError(f"{path}: {err}", exit_code=EXIT_CONFIG) from err
        model = verify_onnx(ServingDir(root).read_model(pointer), spec, inputs=x)
    except Refused as err:
        raise FatalError(f"the model in {root} is not served: {err.reason}",
                         exit_code=EXIT_NOT_READY) from err  # fmt: skip
    from edge_agent.serving import Served

    served = Served(model, pointer["version"], pointer["sha256"], str(pointer.get("source")))
    out: dict[str, Any] = {"version": served.version, "source": served.source,
                           "sha256": served.sha256, "task": spec.task, "file": str(path),
                           "predictions": [], "probabilities": []}  # fmt: skip
    for first in range(0, len(x), BATCH):
        got = served.predict(x[first : first + BATCH])
        out["predictions"] += got["predictions"]
        out["probabilities"] += got["probabilities"]
    return out


def run_predict(file: Path, *, state_dir: Path, device: str, as_json: bool) -> int:
    out = predict_file(file, state_dir=state_dir, device=device)
    if as_json:
        print(json.dumps(out))
        return 0
    print(f"# {out['file']}: task {out['task']}, version {out['version']} ({out['source']}, "
          f"sha256 {out['sha256'][:12]})")  # fmt: skip
    print("index\tprediction\tprobability")
    for i, (p, probs) in enumerate(zip(out["predictions"], out["probabilities"], strict=True)):
        print(f"{i}\t{p}\t{probs[p]:.4f}")
    return 0

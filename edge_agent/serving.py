"""The model a device serves: verify an ONNX model with onnxruntime, swap it in atomically,
answer predictions from it (docs/devices.md, "Serving models").

An inference-only device serves each global version's published ONNX export (the manifest's
`onnx` payload, already checked against its sha256 by edge_agent/fetch.py). A training device
exports what it holds itself, with torch, after each new global version: its personal model
where it keeps one, else the global version (edge_agent/inference.serving_onnx) -- so it
serves the same version it trains on without fetching a second copy of it.

Before a model is served it must pass `verify_onnx`: it loads in onnxruntime; it has one
float input of rank 1 + len(input_shape) whose fixed dimensions are the task's and whose
batch dimension is free; on local inputs (the device's own data when it has some, else a
deterministic probe batch) its first output is (n, num_classes) and finite. A model that
fails keeps the previous one serving (`Refused`, code `bad_onnx`).

The swap, on disk under <state>/<device>/serving/: the model's bytes to
`<version>-<sha256[:12]>.onnx` (write_atomic; verified from that file, and removed if it is
refused), then the pointer `current.json` (write_atomic: os.replace), then older model
files are removed. A crash before the pointer's rename leaves
the old pointer naming the old file, which is still there; after it, the new one. A model
file the pointer does not name is garbage, removed at the next swap. At a start the pointer's
model is read back, its sha256 compared and verified again before it is served.

Nothing here imports torch, scikit-learn or a dataset: an inference-only device needs only
numpy and onnxruntime.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.inference import OnnxModel
from fedmq.atomicfile import write_atomic

POINTER = "current.json"
MAX_POINTER_BYTES = 64 * 1024
MAX_MODEL_BYTES = 256 * 1024 * 1024  # a model file read back at a start (the wire bounds fetches)
VERIFY_ROWS = 64  # local examples a new model is checked on
PROBE_ROWS = 8  # rows of the probe batch when the device has no data
_MODEL_FILE = re.compile(r"^[0-9]{1,12}-[0-9a-f]{12}\.onnx$")


class Refused(Exception):
    """A model that must not be served; the previous one stays. code: a counter key."""

    def __init__(self, reason: str, code: str = "bad_onnx") -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Spec:
    """What a served model must accept and return (from the task)."""

    task: str
    input_shape: tuple[int, ...]
    num_classes: int

    def batch(self, inputs: Any, *, max_rows: int) -> np.ndarray:
        """Inputs as a float32 batch (n, *input_shape): one example, a batch of them, or a
        batch of flat rows. ValueError (a message for the caller) when it is none of those."""
        try:
            x = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"inputs must be a numeric array: {err}") from None
        shape, flat = self.input_shape, int(np.prod(self.input_shape))
        if x.shape == shape:
            x = x[None]
        elif x.ndim == 2 and x.shape[1] == flat and len(shape) > 1:
            x = x.reshape((len(x), *shape))
        if x.shape[1:] != shape:
            raise ValueError(f"inputs of shape {list(x.shape)} fit neither one example "
                             f"{list(shape)} nor a batch of them")  # fmt: skip
        if not 0 < len(x) <= max_rows:
            raise ValueError(f"a batch holds 1 to {max_rows} examples, got {len(x)}")
        if not np.isfinite(x).all():
            raise ValueError("inputs must be finite numbers")
        return x

    def probe(self, rows: int = PROBE_ROWS) -> np.ndarray:
        """A deterministic batch in [0, 1): the check of a device that has no data. A
        golden-ratio sequence, not numpy.random, whose import an inference-only device
        would otherwise pay for (docs/devices.md, "Footprint")."""
        n = rows * int(np.prod(self.input_shape))
        values = (np.arange(n, dtype=np.float64) + 0.5) * 0.6180339887498949 % 1.0
        return values.astype(np.float32).reshape((rows, *self.input_shape))


def verify_onnx(data: bytes | Path, spec: Spec, *, inputs: np.ndarray | None = None,
                threads: int = 1) -> OnnxModel:  # fmt: skip
    """The model (its bytes or its file) loaded, if it may be served on this device;
    Refused says why not."""
    try:
        model = OnnxModel(onnx_bytes=data, threads=threads)
    except ValueError as err:
        raise Refused(str(err)) from None
    declared = model.session.get_inputs()
    if len(declared) != 1:
        raise Refused(f"the model takes {len(declared)} inputs; it must take one")
    dims, want = list(declared[0].shape), spec.input_shape
    if declared[0].type != "tensor(float)":
        raise Refused(f"the model's input is {declared[0].type}; it must be tensor(float)")
    if len(dims) != 1 + len(want):
        raise Refused(f"the model's input has rank {len(dims)}; task {spec.task} needs "
                      f"{1 + len(want)} (batch, {', '.join(map(str, want))})")  # fmt: skip
    if isinstance(dims[0], int):
        raise Refused(f"the model's batch dimension is fixed at {dims[0]}; it must be free")
    for got, need in zip(dims[1:], want, strict=True):
        if isinstance(got, int) and got != need:
            raise Refused(f"the model's input shape {dims} does not fit task {spec.task}'s "
                          f"{list(want)}")  # fmt: skip
    x = spec.probe() if inputs is None or len(inputs) == 0 else inputs[:VERIFY_ROWS]
    try:
        out = np.asarray(model.logits(x))
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise Refused(f"the model fails on local inputs: {str(err)[:200]}") from None
    if out.shape != (len(x), spec.num_classes):
        raise Refused(f"the model's output is {list(out.shape)} on {len(x)} inputs; task "
                      f"{spec.task} needs [{len(x)}, {spec.num_classes}]")  # fmt: skip
    if not np.issubdtype(out.dtype, np.floating) or not np.isfinite(out).all():
        raise Refused("the model's outputs on local inputs are not finite numbers")
    return model


def release_freed_memory() -> None:
    """Give the heap the last session left back to the system (glibc's malloc_trim; a
    no-op elsewhere), so that swaps do not ratchet the device's memory up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Served:
    """The model being served and which one it is."""

    model: OnnxModel
    version: int
    sha256: str
    source: str  # "global" or "personal"

    def predict(self, x: np.ndarray) -> dict[str, Any]:
        probs = softmax(np.asarray(self.model.logits(x)))
        return {"version": self.version, "source": self.source, "sha256": self.sha256,
                "predictions": probs.argmax(axis=1).tolist(),
                "probabilities": np.round(probs, 6).tolist()}  # fmt: skip


class ServingDir:
    """<state>/<device>/serving/: the served model's file and the pointer that names it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read_pointer(self) -> dict[str, Any] | None:
        """The pointer, checked; None when there is none; Refused when it cannot be trusted."""
        path = self.root / POINTER
        if not path.exists():
            return None
        try:
            raw = path.read_bytes()[: MAX_POINTER_BYTES + 1]
            p: Any = json.loads(raw) if len(raw) <= MAX_POINTER_BYTES else None
            if not isinstance(p, dict) or not _MODEL_FILE.match(str(p.get("file", ""))):
                raise ValueError("not a pointer")
            p["version"], p["num_classes"] = int(p["version"]), int(p["num_classes"])
            p["epoch"] = int(p.get("epoch", 0))
            p["input_shape"] = tuple(int(d) for d in p["input_shape"])
            if not isinstance(p.get("sha256"), str) or not isinstance(p.get("task"), str):
                raise ValueError("not a pointer")
        except (OSError, ValueError, TypeError, KeyError):
            raise Refused(f"{path} cannot be read as a serving pointer") from None
        return dict(p)

    def read_model(self, pointer: dict[str, Any]) -> Path:
        """The file the pointer names, if its bytes match its sha256; Refused otherwise."""
        path = self.root / pointer["file"]
        try:
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise Refused(f"the served model {path} is over {MAX_MODEL_BYTES} bytes")
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            digest = h.hexdigest()
        except OSError as err:
            raise Refused(f"the served model {path} cannot be read: {err.strerror}") from None
        if digest != pointer["sha256"]:
            raise Refused(f"the served model {path} does not match its sha256", "bad_payload")
        return path

    def stage(self, data: bytes, *, version: int) -> tuple[Path, str]:
        """Write a candidate's file (served only once commit names it); its path and sha256."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / f"{version}-{sha[:12]}.onnx"
        write_atomic(path, data)
        return path, sha

    def discard(self, path: Path) -> None:
        """Remove a refused candidate's file, unless the pointer names it."""
        try:
            named = (self.read_pointer() or {}).get("file")
        except Refused:
            named = None
        if path.name != named:
            path.unlink(missing_ok=True)

    def commit(self, path: Path, sha: str, spec: Spec, *, version: int, source: str,
               epoch: int = 0) -> None:  # fmt: skip
        """Point at a staged file: the swap (see the module's docstring)."""
        pointer = {"version": version, "sha256": sha, "file": path.name, "source": source,
                   "epoch": epoch,
                   "task": spec.task, "input_shape": list(spec.input_shape),
                   "num_classes": spec.num_classes, "installed_at": time.time()}  # fmt: skip
        write_atomic(self.root / POINTER, json.dumps(pointer).encode())
        for old in self.root.glob("*.onnx"):  # what no pointer names any more
            if old.name != path.name:
                old.unlink(missing_ok=True)


class Serving:
    """The served model of one device, swapped under a lock; the local API reads it."""

    def __init__(self, *, root: Path, spec: Spec, threads: int = 1) -> None:
        self.dir = ServingDir(root)
        self.spec, self.threads = spec, threads
        self._lock = threading.Lock()
        self._current: Served | None = None
        self.served = 0  # predictions answered since this start

    @property
    def current(self) -> Served | None:
        with self._lock:
            return self._current

    @property
    def version(self) -> int:
        c = self.current
        return c.version if c is not None else -1

    def restore(self, inputs: np.ndarray | None = None) -> dict[str, Any] | None:
        """Serve what the pointer names, checked again, and return the pointer; None when
        there is none; Refused says why not (nothing served)."""
        p = self.dir.read_pointer()
        if p is None:
            return None
        if (p["task"], p["input_shape"], p["num_classes"]) != (
            self.spec.task, self.spec.input_shape, self.spec.num_classes,
        ):  # fmt: skip
            raise Refused(f"the served model was for task {p['task']}, not {self.spec.task}",
                          "wrong_task")  # fmt: skip
        model = verify_onnx(self.dir.read_model(p), self.spec, inputs=inputs, threads=self.threads)
        with self._lock:
            self._current = Served(model, p["version"], p["sha256"], str(p.get("source", "")))
        return p

    def offer(self, data: bytes, *, version: int, source: str, epoch: int = 0,
              inputs: np.ndarray | None = None) -> Served:  # fmt: skip
        """Verify data and make it the served model; Refused keeps the previous one. The
        candidate is verified from its staged file (onnxruntime then keeps no copy of the
        bytes), which is removed if it is refused."""
        path, sha = self.dir.stage(data, version=version)
        try:
            model = verify_onnx(path, self.spec, inputs=inputs, threads=self.threads)
        except Refused:
            self.dir.discard(path)
            raise
        self.dir.commit(path, sha, self.spec, version=version, source=source, epoch=epoch)
        served = Served(model, version, sha, source)
        with self._lock:
            self._current = served
        del model
        release_freed_memory()
        return served

    def predict(self, x: np.ndarray) -> dict[str, Any] | None:
        """Predictions of the served model for a checked batch; None when nothing is served."""
        current = self.current
        if current is None:
            return None
        out = current.predict(x)
        with self._lock:
            self.served += len(x)
        return out

    def health(self) -> dict[str, Any]:
        c = self.current
        if c is None:
            return {"status": "no_model", "task": self.spec.task}
        return {"status": "serving", "task": self.spec.task, "version": c.version,
                "source": c.source, "sha256": c.sha256, "served": self.served,
                "input_shape": list(self.spec.input_shape),
                "num_classes": self.spec.num_classes}  # fmt: skip

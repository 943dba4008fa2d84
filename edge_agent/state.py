"""What an agent keeps on disk between runs: its current global model, its progress, its
outbox, its error-feedback residual and, with SCAFFOLD, its control variate c_i and the
server's c of the held version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.fetch import same_specs
from edge_agent.outbox import Outbox
from fedmq.atomicfile import write_atomic
from fedmq.errors import ProtocolError
from fedmq.wire import TensorSpec, decode_weights, encode_weights, specs_of


@dataclass(frozen=True, eq=False)
class HeldModel:
    """The global version a device kept on disk."""

    version: int
    sha256: str
    weights: dict[str, np.ndarray]


class DeviceStore:
    """<root>/model.weights, agent.json, residual.weights, outbox/ and the personal model
    (personal.weights, personal.json: never sent) of one device."""

    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(root=self.root / "outbox")

    def load(self) -> dict[str, Any]:
        """The saved progress (model version, last round trained), {} when new."""
        path = self.root / "agent.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save(self, progress: dict[str, Any]) -> None:
        """Save progress atomically."""
        write_atomic(self.root / "agent.json", json.dumps(progress).encode())

    def load_model(self) -> bytes | None:
        """The weights blob of the held global version, if any."""
        path = self.root / "model.weights"
        return path.read_bytes() if path.exists() else None

    def load_held(self, specs: Sequence[TensorSpec] | None) -> HeldModel | None:
        """The held version, if it is whole and has these specs; ValueError says why not."""
        progress = self.load()
        version, sha = int(progress.get("version", -1)), str(progress.get("model_sha", ""))
        blob = self.load_model()
        if blob is None or version < 0:
            return None
        if hashlib.sha256(blob).hexdigest() != sha:
            raise ValueError(f"the saved global version {version} does not match its sha256")
        try:
            weights = decode_weights(blob)
        except ProtocolError as err:
            raise ValueError(f"the saved global version {version}: {err.reason}") from err
        if specs is not None and not same_specs(specs_of(weights), specs):
            raise ValueError(f"the saved global version {version} does not fit this model")
        return HeldModel(version=version, sha256=sha, weights=weights)

    def save_model(self, blob: bytes) -> None:
        """Keep the held global version's weights blob."""
        write_atomic(self.root / "model.weights", blob)

    def load_residual(self) -> dict[str, np.ndarray] | None:
        """What earlier sparse updates did not send (float32), or None."""
        path = self.root / "residual.weights"
        return decode_weights(path.read_bytes()) if path.exists() else None

    def save_residual(self, residual: dict[str, np.ndarray] | None) -> None:
        """Keep the residual for the next update (None forgets it)."""
        path = self.root / "residual.weights"
        if residual is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, encode_weights(residual))

    def load_personal(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """The personal model kept on this device (its note and weights), or None when
        there is none or it is not whole (a crash between its two files, a foreign file)."""
        note_path, blob_path = self.root / "personal.json", self.root / "personal.weights"
        if not (note_path.exists() and blob_path.exists()):
            return None
        try:
            note = json.loads(note_path.read_text())
            blob = blob_path.read_bytes()
            if not isinstance(note, dict) or hashlib.sha256(blob).hexdigest() != note.get("sha256"):
                return None
            return note, decode_weights(blob)
        except (ValueError, ProtocolError):
            return None

    def save_personal(self, note: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        """Keep the personal model: the weights first, then the note naming their sha256
        (a crash between the two leaves a pair load_personal refuses: the old note's sha)."""
        blob = encode_weights(weights)
        write_atomic(self.root / "personal.weights", blob)
        write_atomic(self.root / "personal.json",
                     json.dumps({**note, "sha256": hashlib.sha256(blob).hexdigest()}).encode())
    def load_tensors(self, name: str, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray] | None:
        """A kept tensor file (`control.weights`: SCAFFOLD's c_i; `server_control.weights`:
        the held version's c), or None when missing or when it does not fit the model
        (a file that does not decode or fit is not fatal: c_i starts again at zero)."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            tensors = decode_weights(path.read_bytes())
        except ProtocolError:
            return None
        if not same_specs(specs_of(tensors), specs) or not all(
                np.isfinite(a).all() for a in tensors.values()):  # fmt: skip
            return None
        return tensors

    def save_tensors(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        """Keep a tensor file atomically (see load_tensors)."""
        write_atomic(self.root / name, encode_weights(tensors))

"""The aggregator's state directory: global versions, round history, service state.

Every file is written atomically (temp file, fsync, rename, fsync of the directory), so
a crash leaves either the old file or the new one, never half of one.

    <state_dir>/versions/000007.full      its full payload in the downlink codec, as published
    <state_dir>/versions/000007.weights   float32 weights blob of the version (what devices
                                          rebuild from its payloads), only where it differs
                                          from .full (under float32 they are the same bytes)
    <state_dir>/versions/000007.delta     its delta from version 6, as published (if any)
    <state_dir>/versions/000007.server    the aggregator's own weights at version 7, when a
                                          sparse delta makes them differ from the published
    <state_dir>/versions/000007.onnx      ONNX export of that version
    <state_dir>/versions/000007.opt       the server optimiser's state that made version 7
                                          (aggregator.server_opt; not with plain sgd)
    <state_dir>/versions/000007.manifest  the manifest that announced it (its chunk layout),
                                          written once it was published: it marks the
                                          version complete
    <state_dir>/history.jsonl             one JSON line per closed round (metrics,
                                          participants, bytes), appended
    <state_dir>/state.json                current version, next round id, counters
    <state_dir>/journal.sqlite, journal/  accepted updates and verdicts (aggregator.journal)

state.json is the commit point: a restart trusts the version and round it names, and a
version file, history line or journal round that is newer than it is the trace of an
unfinished step. Only the newest `keep_versions` versions are kept (0 keeps all).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.atomicfile import move_aside, write_atomic
from fedmq.report import read_history
from fedmq.wire import decode_weights


class Store:
    """Reads and writes one job's state directory."""

    def __init__(self, *, root: Path, keep_versions: int = 10) -> None:
        if keep_versions < 0:
            raise ValueError(f"keep_versions must be >= 0 (0 keeps all), got {keep_versions}")
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions

    def _version_path(self, version: int, ext: str) -> Path:
        return self.versions_dir / f"{version:06d}.{ext}"

    def save_version(
        self,
        version: int,
        *,
        weights: bytes,
        full: bytes,
        onnx: bytes | None = None,
        delta: bytes | None = None,
        server: bytes | None = None,
    ) -> None:
        """Keep one global version's payloads (save_manifest completes it)."""
        self._version_path(version, "manifest").unlink(missing_ok=True)  # not complete yet
        kept = {"full": full, "weights": None if weights == full else weights, "onnx": onnx,
                "delta": delta, "server": server, "opt": None, "ctl": None}  # fmt: skip
        for ext, blob in kept.items():
            path = self._version_path(version, ext)
            if blob is None:
                path.unlink(missing_ok=True)  # a leftover of an earlier try at this version
            else:
                write_atomic(path, blob)

    def _prune(self) -> None:
        if self.keep_versions:
            for old in self.versions()[: -self.keep_versions]:
                self._version_path(old, "manifest").unlink(missing_ok=True)  # first: incomplete
                for ext in ("weights", "onnx", "full", "delta", "server", "opt", "ctl"):
                    self._version_path(old, ext).unlink(missing_ok=True)

    def quarantine_version(self, version: int, into: Path) -> list[Path]:
        """Move every file of a stored version that does not load into `into`."""
        manifest = self._version_path(version, "manifest")
        moved = [move_aside(manifest, into)] if manifest.exists() else []  # first: incomplete
        for ext in ("weights", "onnx", "full", "delta", "server", "opt", "ctl"):
            path = self._version_path(version, ext)
            if path.exists():
                moved.append(move_aside(path, into))
        return moved

    def load_payloads(self, version: int) -> tuple[bytes | None, bytes | None]:
        """(full payload, delta payload) a stored version was published with, if kept."""
        full, delta = self._version_path(version, "full"), self._version_path(version, "delta")
        return (
            full.read_bytes() if full.exists() else None,
            delta.read_bytes() if delta.exists() else None,
        )

    def save_manifest(self, version: int, manifest: bytes) -> None:
        """Keep the manifest a version was published with (once per layout); this marks the
        version complete and lets the oldest versions go."""
        path = self._version_path(version, "manifest")
        if path.exists() and path.read_bytes() == manifest:
            return
        write_atomic(path, manifest)
        self._prune()

    def versions(self) -> list[int]:
        """Complete versions on disk, oldest first."""
        return sorted(int(p.stem) for p in self.versions_dir.glob("*.manifest"))

    def load_version(self, version: int) -> tuple[bytes, bytes, bytes | None]:
        """(weights blob, manifest blob, onnx bytes or None) of a stored version."""
        onnx, weights = self._version_path(version, "onnx"), self._version_path(version, "weights")
        return (
            (weights if weights.exists() else self._version_path(version, "full")).read_bytes(),
            self._version_path(version, "manifest").read_bytes(),
            onnx.read_bytes() if onnx.exists() else None,
        )

    def load_server_weights(self, version: int) -> dict[str, np.ndarray] | None:
        """The aggregator's own weights at a stored version, if they were kept."""
        path = self._version_path(version, "server")
        return decode_weights(path.read_bytes()) if path.exists() else None

    def save_optimizer(self, version: int, blob: bytes) -> None:
        """Keep the server optimiser's state that made a version (after save_version)."""
        write_atomic(self._version_path(version, "opt"), blob)

    def load_optimizer(self, version: int) -> bytes | None:
        """The server optimiser's state saved with a version, if there is one."""
        path = self._version_path(version, "opt")
        return path.read_bytes() if path.exists() else None

    def quarantine_optimizer(self, version: int, into: Path) -> Path:
        """Move a version's server optimiser state that cannot be trusted into `into`."""
        return move_aside(self._version_path(version, "opt"), into)

    def save_extra(self, version: int, ext: str, blob: bytes) -> None:
        """Keep another per-version state file (e.g. SCAFFOLD's `.ctl`), after save_version."""
        write_atomic(self._version_path(version, ext), blob)

    def load_extra(self, version: int, ext: str) -> bytes | None:
        """A per-version state file saved with save_extra, if there is one."""
        path = self._version_path(version, ext)
        return path.read_bytes() if path.exists() else None

    def quarantine_extra(self, version: int, ext: str, into: Path) -> Path:
        """Move a per-version state file that cannot be trusted into `into`."""
        return move_aside(self._version_path(version, ext), into)

    def history(self) -> list[dict[str, Any]]:
        """Round records, oldest first."""
        return read_history(self.root)

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round's record to the history (a later record of a round wins)."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        with open(self.root / "history.jsonl", "ab+") as fh:
            if fh.tell():  # a line a crash cut short must not swallow this one
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = b"\n" + line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def load_state(self) -> dict[str, Any] | None:
        """The service state saved last, or None for a fresh directory."""
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_state(self, state: dict[str, Any]) -> None:
        """Save the service state."""
        write_atomic(self.root / "state.json", json.dumps(state, indent=1).encode())


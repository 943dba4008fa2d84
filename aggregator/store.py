"""The aggregator's state directory: global versions, round history, service state.

Every file is written atomically (temp file, fsync, rename, fsync of the directory), so
a crash leaves either the old file or the new one, never half of one.

    <state_dir>/versions/000007.weights   float32 weights blob of the version (what devices
                                          rebuild from its payloads)
    <state_dir>/versions/000007.full      its full payload in the downlink codec, as published
    <state_dir>/versions/000007.delta     its delta from version 6, as published (if any)
    <state_dir>/versions/000007.server    the aggregator's own weights at version 7, when a
                                          sparse delta makes them differ from the published
    <state_dir>/versions/000007.onnx      ONNX export of that version
    <state_dir>/versions/000007.manifest  the manifest that announced it (its chunk layout)
    <state_dir>/history.json              one record per round (metrics, participants, bytes)
    <state_dir>/open_round.msgpack        the open round: its devices, accepted update ids
                                          and the running sum, rewritten on every accept
    <state_dir>/state.json                current version, next round id, counted update ids

state.json is the commit point: a restart trusts the version and round it names, and a
version file or open round that is newer than it is the trace of an unfinished step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.atomicfile import write_atomic
from fedmq.wire import decode_weights


class Store:
    """Reads and writes one job's state directory."""

    def __init__(self, *, root: Path, keep_versions: int = 0) -> None:
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
        manifest: bytes,
        onnx: bytes | None = None,
        full: bytes | None = None,
        delta: bytes | None = None,
        server: bytes | None = None,
    ) -> None:
        """Keep one global version; the manifest is written last, so it marks completeness."""
        write_atomic(self._version_path(version, "weights"), weights)
        for ext, blob in (("onnx", onnx), ("full", full), ("delta", delta), ("server", server)):
            if blob is not None:
                write_atomic(self._version_path(version, ext), blob)
        write_atomic(self._version_path(version, "manifest"), manifest)
        if self.keep_versions:
            for old in self.versions()[: -self.keep_versions]:
                for ext in ("weights", "onnx", "full", "delta", "server", "manifest"):
                    self._version_path(old, ext).unlink(missing_ok=True)

    def load_payloads(self, version: int) -> tuple[bytes | None, bytes | None]:
        """(full payload, delta payload) a stored version was published with, if kept."""
        full, delta = self._version_path(version, "full"), self._version_path(version, "delta")
        return (
            full.read_bytes() if full.exists() else None,
            delta.read_bytes() if delta.exists() else None,
        )

    def save_manifest(self, version: int, manifest: bytes) -> None:
        """Replace a stored version's manifest with the one actually published."""
        write_atomic(self._version_path(version, "manifest"), manifest)

    def versions(self) -> list[int]:
        """Complete versions on disk, oldest first."""
        return sorted(int(p.stem) for p in self.versions_dir.glob("*.manifest"))

    def load_version(self, version: int) -> tuple[bytes, bytes, bytes | None]:
        """(weights blob, manifest blob, onnx bytes or None) of a stored version."""
        onnx = self._version_path(version, "onnx")
        return (
            self._version_path(version, "weights").read_bytes(),
            self._version_path(version, "manifest").read_bytes(),
            onnx.read_bytes() if onnx.exists() else None,
        )

    def load_server_weights(self, version: int) -> dict[str, np.ndarray] | None:
        """The aggregator's own weights at a stored version, if they were kept."""
        path = self._version_path(version, "server")
        return decode_weights(path.read_bytes()) if path.exists() else None

    def history(self) -> list[dict[str, Any]]:
        """Round records, oldest first."""
        path = self.root / "history.json"
        return json.loads(path.read_text()) if path.exists() else []

    def append_round(self, record: dict[str, Any]) -> None:
        """Add one round's record to the history, replacing an earlier record of that round."""
        rounds = [r for r in self.history() if r.get("round") != record.get("round")]
        rounds.append(record)
        write_atomic(self.root / "history.json", json.dumps(rounds, indent=1).encode())

    def save_open_round(self, blob: bytes) -> None:
        """Keep the open round (encoded by the service) so a restart resumes it."""
        write_atomic(self.root / "open_round.msgpack", blob)

    def load_open_round(self) -> bytes | None:
        """The open round saved last, or None."""
        path = self.root / "open_round.msgpack"
        return path.read_bytes() if path.exists() else None

    def clear_open_round(self) -> None:
        """Forget the open round once it is closed and committed."""
        (self.root / "open_round.msgpack").unlink(missing_ok=True)

    def load_state(self) -> dict[str, Any] | None:
        """The service state saved last, or None for a fresh directory."""
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_state(self, state: dict[str, Any]) -> None:
        """Save the service state."""
        write_atomic(self.root / "state.json", json.dumps(state, indent=1).encode())

"""What an agent keeps on disk between runs: its current global model and its progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_agent.outbox import Outbox
from fedmq.atomicfile import write_atomic


class DeviceStore:
    """<root>/model.weights, <root>/agent.json and <root>/outbox/ of one device."""

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

    def save_model(self, blob: bytes) -> None:
        """Keep the held global version's weights blob."""
        write_atomic(self.root / "model.weights", blob)

"""Updates that were published but not yet acknowledged, kept on disk until they are."""

from __future__ import annotations

import re
from pathlib import Path

from fedmq.atomicfile import write_atomic

_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class Outbox:
    """One file per unacknowledged update: the encoded update payload, written atomically."""

    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, update_id: str) -> Path:
        if not _ID.match(update_id):
            raise ValueError(f"update id {update_id!r} is not a safe file name")
        return self.root / f"{update_id}.update"

    def put(self, update_id: str, payload: bytes) -> None:
        """Keep an update until it is acknowledged; survives a crash once this returns."""
        write_atomic(self._path(update_id), payload)

    def remove(self, update_id: str) -> bool:
        """Forget an acknowledged update; False if it was not in the outbox."""
        try:
            self._path(update_id).unlink()
            return True
        except (FileNotFoundError, ValueError):
            return False

    def pending(self) -> list[tuple[str, bytes]]:
        """Every unacknowledged (update id, payload), oldest first."""
        files = sorted(self.root.glob("*.update"), key=lambda p: p.stat().st_mtime)
        return [(p.stem, p.read_bytes()) for p in files]

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.update"))

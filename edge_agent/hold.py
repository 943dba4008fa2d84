"""A test and benchmark hook: hold trained updates back until a file releases them.

A straggler made deterministic: with `hold_dir` set, the agent keeps each trained update in
its outbox, writes `<hold_dir>/<device>.held` (JSON: update_id, round_id) and sends nothing
it holds until `<hold_dir>/<device>.release` exists. A release is used up: the agent sends
what it holds then, deletes the release file, and holds its next update again. Not for
production fleets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedmq.atomicfile import write_atomic


class UpdateHold:
    """Which updates of one device are held back, and whether they may go now."""

    def __init__(self, *, hold_dir: Path, device: str, outbox_ids: Iterable[str] = ()) -> None:
        self.held_path = Path(hold_dir) / f"{device}.held"
        self.release_path = Path(hold_dir) / f"{device}.release"
        self.held: set[str] = set()
        try:  # after a restart: the update still held, if it was not acknowledged
            held = str(json.loads(self.held_path.read_text())["update_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.held = {held} & set(outbox_ids)

    def hold(self, update_id: str, round_id: int) -> None:
        """Keep update_id back and say so in <device>.held."""
        record = {"update_id": update_id, "round_id": round_id}
        write_atomic(self.held_path, json.dumps(record).encode())
        self.held.add(update_id)

    def release(self) -> set[str]:
        """The held updates that may be sent now (forgotten here): all of them once the
        release file exists, which this uses up."""
        if not self.held or not self.release_path.exists():
            return set()
        self.release_path.unlink(missing_ok=True)
        released, self.held = self.held, set()
        return released

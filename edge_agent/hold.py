"""A test and benchmark hook: hold trained updates back until a file releases them.

A straggler made deterministic: with `hold_dir` set, the agent keeps each trained update in
its outbox, writes `<hold_dir>/<device>.held` (JSON: update_id, round_id of the newest) and
sends nothing it holds until `<hold_dir>/<device>.release` exists. The release file may
name the newest round to let go (JSON `{"up_to_round": N}`); empty, it lets go of all. A
release is used up: the agent sends what it lets go, deletes the release file, and holds
its next updates again. Not for production fleets.
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
        self.held: dict[str, int] = {}  # update id -> the round it trained for
        try:  # after a restart: the update still held, if it was not acknowledged
            record = json.loads(self.held_path.read_text())
            held, round_id = str(record["update_id"]), int(record["round_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if held in set(outbox_ids):
            self.held = {held: round_id}

    def hold(self, update_id: str, round_id: int) -> None:
        """Keep update_id back and say so in <device>.held."""
        record = {"update_id": update_id, "round_id": round_id}
        write_atomic(self.held_path, json.dumps(record).encode())
        self.held[update_id] = round_id

    def release(self) -> set[str]:
        """The held updates that may be sent now (forgotten here), once the release file
        exists, which this uses up: those up to its round, or all."""
        if not self.held or not self.release_path.exists():
            return set()
        try:
            up_to = int(json.loads(self.release_path.read_text())["up_to_round"])
        except (OSError, ValueError, KeyError, TypeError):
            up_to = None  # an empty (or unreadable) release lets go of everything
        self.release_path.unlink(missing_ok=True)
        released = {u for u, r in self.held.items() if up_to is None or r <= up_to}
        for update_id in released:
            del self.held[update_id]
        return released

"""The hold_dir hook on its own: what it writes, when it releases, what a restart keeps."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.hold import UpdateHold


def test_held_until_the_release_file_exists_then_all_at_once_and_held_again(tmp_path: Path) -> None:
    hold = UpdateHold(hold_dir=tmp_path / "h", device="d1")
    hold.hold("u1", 1)
    hold.hold("u2", 2)
    assert json.loads((tmp_path / "h" / "d1.held").read_text()) == {"update_id": "u2",
                                                                    "round_id": 2}  # fmt: skip
    assert hold.release() == set() and set(hold.held) == {"u1", "u2"}
    (tmp_path / "h" / "d1.release").touch()
    assert hold.release() == {"u1", "u2"} and hold.release() == set()
    assert not (tmp_path / "h" / "d1.release").exists()  # used up: the next one is held
    hold.hold("u3", 3)
    assert hold.release() == set() and set(hold.held) == {"u3"}


def test_a_restart_keeps_holding_the_update_still_in_the_outbox(tmp_path: Path) -> None:
    UpdateHold(hold_dir=tmp_path, device="d1").hold("u1", 4)
    assert UpdateHold(hold_dir=tmp_path, device="d1", outbox_ids=["u1", "u0"]).held == {"u1": 4}
    assert UpdateHold(hold_dir=tmp_path, device="d1", outbox_ids=["u0"]).held == {}  # acked
    (tmp_path / "d1.held").write_text("not json")
    assert UpdateHold(hold_dir=tmp_path, device="d1", outbox_ids=["u1"]).held == {}


def test_a_release_up_to_a_round_keeps_the_newer_ones(tmp_path: Path) -> None:
    hold = UpdateHold(hold_dir=tmp_path, device="d1")
    hold.hold("u3", 3)
    hold.hold("u4", 4)
    (tmp_path / "d1.release").write_text(json.dumps({"up_to_round": 3}))
    assert hold.release() == {"u3"} and hold.held == {"u4": 4}
    assert not (tmp_path / "d1.release").exists()

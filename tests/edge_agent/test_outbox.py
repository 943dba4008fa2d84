"""The agent's outbox and progress survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from edge_agent.state import DeviceStore


def test_outbox_keeps_until_removed(tmp_path: Path) -> None:
    box = Outbox(root=tmp_path)
    box.put("u1", b"one")
    box.put("u2", b"two")
    again = Outbox(root=tmp_path)  # a restarted agent
    assert sorted(again.pending()) == [("u1", b"one"), ("u2", b"two")] and len(again) == 2
    assert again.remove("u1") and not again.remove("u1")
    assert again.pending() == [("u2", b"two")]
    assert not again.remove("../etc/passwd")
    with pytest.raises(ValueError, match="safe file name"):
        box.put("../x", b"")


def test_device_store_round_trip(tmp_path: Path) -> None:
    s = DeviceStore(root=tmp_path / "d1")
    assert s.load() == {} and s.load_model() is None
    s.save({"version": 3, "last_round": 2})
    s.save_model(b"blob")
    s2 = DeviceStore(root=tmp_path / "d1")
    assert s2.load() == {"version": 3, "last_round": 2} and s2.load_model() == b"blob"

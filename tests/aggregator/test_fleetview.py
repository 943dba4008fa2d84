"""The fleet mirror's bookkeeping (pure): one JSON document per device of the table,
published on change only, cleared when a device leaves the table."""

from __future__ import annotations

import json

from aggregator.fleetview import FleetView
from aggregator.presence import Presence
from fedmq.topics import Topics
from fedmq.wire import Ack, DeviceState

T = Topics(job="j", prefix="p")


def _state(device: str, status: str = "online", job: str = "j", version: int = 3) -> DeviceState:
    return DeviceState(device=device, status=status, job=job, profile="rpi4",
                       agent_version="0.1.0", model_version=version, ts=1.0)  # fmt: skip


def _docs(out: list[tuple[str, bytes]]) -> dict[str, dict | None]:  # type: ignore[type-arg]
    return {t.rsplit("/", 1)[1]: (json.loads(p) if p else None) for t, p in out}


def _see(view: FleetView, table: Presence, state: DeviceState, now: float) -> None:
    table.observe(state.device, state, now)
    view.observe(state.device, state, table.devices, now)


def test_documents_say_who_what_and_the_verdicts_and_change_only_when_something_did() -> None:
    table, view = Presence(job="j"), FleetView(topics=T, every_s=1.0)
    _see(view, table, _state("a"), 100.0)
    _see(view, table, _state("b"), 100.0)
    first = view.due(100.0)
    assert [t for t, _ in first] == [T.fleet_device("a"), T.fleet_device("b")]
    a = _docs(first)["a"]
    assert a is not None
    assert (a["device"], a["job"], a["class"], a["status"], a["model_version"]) == (
        "a", "j", "rpi4", "online", 3)
    assert a["last_seen"] == 100.0 and a["last_seen_iso"].startswith("1970-01-01T00:01:40")
    assert (a["accepted"], a["rejected"], a["bytes_up"], a["last_verdict"]) == (0, 0, 0, "")
    view.sent("a", 1000, 100.2)
    view.sent("a", 500, 100.2)
    view.verdict("a", Ack("u1", 4, "accepted"), 100.5)
    view.verdict("b", Ack("u2", 4, "rejected", "shape_mismatch: 0.weight"), 100.5)
    assert view.due(100.6) == []  # not yet: at most once a second
    docs = _docs(view.due(101.0))
    assert docs["a"] is not None and docs["b"] is not None
    assert (docs["a"]["accepted"], docs["a"]["bytes_up"], docs["a"]["last_round"]) == (1, 1500, 4)
    assert (docs["b"]["rejected"], docs["b"]["last_verdict"]) == (1, "rejected")
    assert docs["b"]["last_reason"] == "shape_mismatch: 0.weight"
    # a resend acknowledged again is a duplicate, not a second acceptance
    view.verdict("a", Ack("u1", 4, "accepted", "duplicate: already counted in round 4"), 103.0)
    again = _docs(view.due(103.0))["a"]
    assert again is not None and (again["accepted"], again["duplicates"]) == (1, 1)
    # the same state again changes nothing: nothing is published
    _see(view, table, _state("b"), 102.0)
    b_only = view.due(104.0)
    assert [t for t, _ in b_only] == [T.fleet_device("b")]  # last_seen moved
    assert view.due(110.0) == []
    view.republish()  # after a reconnect: everything again
    assert len(view.due(111.0)) == 2


def test_devices_outside_the_table_have_no_record_and_leavers_are_cleared() -> None:
    table, view = Presence(job="j", max_devices=2), FleetView(topics=T, every_s=0.0)
    # hostile or unknown senders: no record, nothing published, nothing grows
    view.sent("nobody", 10**9, 1.0)
    view.verdict("nobody", Ack("x", 1, "rejected", "r"), 1.0)
    view.refused("?", "decode_error: not msgpack", 1.0)
    assert view.due(1.0) == [] and len(view) == 0
    _see(view, table, _state("a"), 1.0)
    _see(view, table, _state("b", "offline"), 1.0)  # an unknown device's Will: not taken
    _see(view, table, _state("b"), 2.0)
    _see(view, table, _state("b", "offline"), 3.0)
    view.due(3.0)
    # the table is full: c takes b's place (offline), so b's mirror is cleared
    _see(view, table, _state("c"), 4.0)
    docs = _docs(view.due(4.0))
    assert docs["b"] is None and docs["c"] is not None and "a" not in docs
    assert view.document("b") is None and len(view) == len(table.devices) == 2
    # a device that moves to another job leaves the table and its mirror
    _see(view, table, _state("a", job="other"), 5.0)
    out = view.due(5.0)
    assert (T.fleet_device("a"), b"") in out and len(view) == 1


def test_leaving_clears_exactly_once_and_a_returning_device_is_published_again() -> None:
    table, view = Presence(job="j", max_devices=1), FleetView(topics=T, every_s=0.0)
    _see(view, table, _state("a"), 1.0)
    _see(view, table, _state("a", "offline"), 2.0)
    view.due(2.0)
    _see(view, table, _state("b"), 3.0)  # a gives way
    out = view.due(3.0)
    assert (T.fleet_device("a"), b"") in out
    assert [p for t, p in out if t == T.fleet_device("b")] and len(view) == 1
    assert view.due(4.0) == []
    _see(view, table, _state("b", "offline"), 5.0)
    _see(view, table, _state("a"), 6.0)  # back: b gives way, a is published afresh
    docs = _docs(view.due(6.0))
    assert docs["b"] is None and docs["a"] is not None and docs["a"]["status"] == "online"


def test_reasons_are_bounded() -> None:
    table, view = Presence(job="j"), FleetView(topics=T, every_s=0.0)
    _see(view, table, _state("a"), 1.0)
    view.refused("a", "x" * 10_000, 2.0)
    doc = view.document("a")
    assert doc is not None and len(doc["last_reason"]) == 512 and doc["rejected"] == 1

"""Eligibility and declines, pure: who a round may select (online and idle, can train,
ready, within its bundled profile's budget), a decliner replaced when the round would
otherwise miss its target, the decline kept through the journal's meta, and the fleet
by class for the status."""

from __future__ import annotations

import json

from aggregator.eligibility import by_class, decline, eligible, why_not
from aggregator.fleetview import FleetView, mirror_document
from aggregator.presence import Presence
from aggregator.rounds import OpenRound
from fedmq.fleetstate import FleetState, parse_status
from fedmq.statusview import summary_lines
from fedmq.topics import Topics
from fedmq.wire import DeviceState, TrainConfig

TRAIN = TrainConfig(epochs=2, batch_size=10, lr=0.05)


def state(device: str, **kw: object) -> DeviceState:
    return DeviceState(**{"device": device, "status": "online", "job": "j", "profile": "rpi4",
                          **kw})  # type: ignore[arg-type]  # fmt: skip


def test_only_idle_ready_trainers_within_budget_are_eligible() -> None:
    table = Presence(job="j")
    states = {
        "ok": state("ok"),
        "old": state("old", profile="home-made"),  # an unknown class: the device checks itself
        "busy": state("busy", status="training"),
        "gone": state("gone", status="offline"),
        "sensor": state("sensor", trains=False),
        "hot": state("hot", ready=False, not_ready="thermal: 83.0 C at or over the limit"),
        "zero": state("zero", profile="rpi-zero-2w"),  # max_epochs 5
        "liar": state("liar", profile="sensor-infer"),  # says it trains, its class cannot
    }
    for d, s in states.items():
        table.observe(d, s, now=0.0)
    assert eligible(table, TRAIN) == ["ok", "old", "zero"]
    assert why_not(states["busy"], TRAIN) == "busy: training"
    assert why_not(states["hot"], TRAIN) == "not ready: thermal: 83.0 C at or over the limit"
    assert why_not(states["liar"], TRAIN) == "inference only (profile sensor-infer)"
    many = TrainConfig(epochs=8, batch_size=10, lr=0.05)
    assert why_not(states["zero"], many).startswith("budget: the round asks 8 epochs")
    assert eligible(table, many) == ["ok", "old"]


def _round(selected: set[str], target: int = 2) -> OpenRound:
    return OpenRound(round_id=3, model_version=2, selected=frozenset(selected), opened_at=0.0,
                     deadline=60.0, target=target, min_devices=target)  # fmt: skip


def test_a_decliner_is_replaced_only_when_the_target_is_out_of_reach() -> None:
    r = _round({"a", "b"})
    changed, pick = decline(r, "a", "thermal: 83.0 C", candidates=["a", "b", "c", "d"],
                            seed=0, replace=True)  # fmt: skip
    assert changed and pick in {"c", "d"} and r.selected == {"a", "b", pick}
    assert r.declined == {"a": "thermal: 83.0 C"} and r.waiting_for == {"b", pick}
    # the same decline again (a state republished) changes nothing
    assert decline(r, "a", "thermal: 84.0 C", candidates=["c", "d"], seed=0,
                   replace=True) == (False, None)  # fmt: skip
    # over-selected: one decliner leaves the target reachable, nobody is added
    spare = _round({"a", "b", "c"})
    assert decline(spare, "a", "x", candidates=["d"], seed=0, replace=True) == (True, None)
    # no one left to ask, async (replace=False), the message cap, not selected, or delivered
    assert decline(_round({"a", "b"}), "a", "x", candidates=["a", "b"], seed=0,
                   replace=True) == (True, None)  # fmt: skip
    assert decline(_round({"a", "b"}), "a", "x", candidates=["c"], seed=0,
                   replace=False) == (True, None)  # fmt: skip
    assert decline(_round({"a", "b"}), "a", "x", candidates=["c"], seed=0, replace=True,
                   max_selected=2) == (True, None)  # fmt: skip
    assert decline(_round({"a", "b"}), "z", "x", candidates=["c"], seed=0,
                   replace=True) == (False, None)  # fmt: skip
    done = _round({"a", "b"})
    done.record("u1", "a")
    assert decline(done, "a", "x", candidates=["c"], seed=0, replace=True) == (False, None)


def test_the_replacement_is_seeded_and_survives_the_journal() -> None:
    picks = set()
    for _ in range(3):
        r = _round({"a", "b"})
        picks.add(decline(r, "a", "hot", candidates=list("abcdefgh"), seed=7, replace=True)[1])
    assert len(picks) == 1  # the same choice every time (and after a restart)
    back = OpenRound.from_meta(r.meta())
    assert back.selected == r.selected and back.declined == {"a": "hot"}
    assert back.waiting_for == r.waiting_for
    record = r.history_record("complete", 10.0)
    assert record["declined"] == {"a": "hot"} and "a" in record["selected"]
    old = {k: v for k, v in r.meta().items() if k != "declined"}  # a journal from before
    assert OpenRound.from_meta(old).declined == {}


def test_status_shows_the_fleet_by_class() -> None:
    table = Presence(job="j")
    for s in (state("a"), state("b", status="training"),
              state("c", ready=False, not_ready="thermal: 90.0 C at or over"),
              state("d", profile="rpi-zero-2w", ready=False, not_ready="battery: 20%"),
              state("e", profile="sensor-infer", trains=False),
              state("f", status="offline")):  # fmt: skip
        table.observe(s.device, s, now=0.0)
    assert by_class(table) == {
        "rpi-zero-2w": {"online": 1, "ready": 0, "training": 0, "not_ready": {"battery": 1}},
        "rpi4": {"online": 3, "ready": 2, "training": 1, "not_ready": {"thermal": 1}},
        "sensor-infer": {"online": 1, "ready": 0, "training": 0, "not_ready": {}},
    }


def test_the_last_rounds_devices_are_idle_though_their_state_lags() -> None:
    table = Presence(job="j")
    table.observe("a", state("a", status="training"), now=0.0)
    table.observe("b", state("b", status="training"), now=0.0)
    assert eligible(table, TRAIN) == []
    assert eligible(table, TRAIN, idle=frozenset({"a"})) == ["a"]


def test_fedmq_status_prints_a_line_per_class() -> None:
    classes = {"rpi4": {"online": 3, "ready": 2, "training": 1, "not_ready": {"thermal": 1}},
               "bad": "not a class", "x" * 500: {"online": "many"}}  # fmt: skip
    doc = {
        "job": "j",
        "phase": "training",
        "aggregator": "online",
        "devices": {"online": 3, "trainers_online": 3, "known": 3, "classes": classes},
    }
    status = parse_status(json.dumps(doc).encode())
    assert status is not None and status.classes[0] == ("rpi4", 3, 2, 1, {"thermal": 1})
    assert len(status.classes) == 2 and len(status.classes[1][0]) <= 64  # hostile: bounded
    st = FleetState(topics=Topics(job="j", prefix="p"))
    st.on_message(Topics(job="j", prefix="p").status(), json.dumps(doc).encode(),
                  retained=True, now=0.0)  # fmt: skip
    assert "  class     rpi4: 3 online, 2 ready, 1 training, not ready: thermal 1" in (
        summary_lines(st, 1.0))  # fmt: skip


def test_the_fleet_mirror_says_why_a_device_is_not_ready() -> None:
    table = Presence(job="j")
    hot = state("h", ready=False, not_ready="thermal: 90.0 C at or over the limit")
    table.observe("h", hot, now=0.0)
    table.observe("c", state("c"), now=0.0)
    view = FleetView(topics=Topics(job="j", prefix="p"))
    for d, s in table.devices.items():
        view.observe(d, s, table.devices, now=0.0)
    docs = {d: mirror_document(d, view._devices[d]) for d in ("h", "c")}
    assert docs["h"]["not_ready"] == "thermal: 90.0 C at or over the limit"
    assert docs["c"]["not_ready"] == ""


def test_presence_knows_when_a_device_last_came_online() -> None:
    """The service opens a round only once the burst of retained states after a connection
    is over: no device has come online for a moment (service.SETTLE_S)."""
    p = Presence(job="j")

    def seen(device: str, status: str, now: float) -> float:
        p.observe(device, DeviceState(device=device, status=status, job="j"), now)
        return p.arrived_at

    assert seen("a", "online", 1.0) == 1.0  # a new device
    assert seen("b", "online", 2.0) == 2.0
    assert seen("a", "training", 3.0) == 2.0  # busy is no arrival
    assert seen("a", "online", 4.0) == 2.0
    assert seen("b", "offline", 5.0) == 2.0  # a Will is none either
    assert seen("b", "online", 6.0) == 6.0  # back from offline
    assert seen("c", "offline", 7.0) == 6.0  # an unknown device's Will enters nothing

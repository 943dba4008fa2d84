"""Profiles that decide, through a real broker: a device that got hot between its last
state and the round declines it with the reason and the aggregator selects another; a
training-time budget cuts a device's training and its update weighs as documented
(docs/devices.md, "Profiles and eligibility": the FedAvg weight is min(n, examples
processed), in the history's participants)."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.selection import Candidates, Participation, RandomSelection
from tests.integration.fleet import Fleet, Watcher

DEVICES = ("d0", "d1", "d2")


def _temp(root: Path, celsius: float) -> None:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "temp.tmp").write_text(f"{int(celsius * 1000)}\n")
    (zone / "temp.tmp").replace(zone / "temp")


def test_hot_device_declines_and_a_budget_cut_update_weighs_its_work(
        fleet: Fleet, mosquitto: object, tmp_path: Path) -> None:  # fmt: skip
    # round 2's selection among all three (seed 0, random policy): its first device will
    # be hot when round 2 reaches it, its second trains under a tiny time budget, and the
    # third is the one the aggregator must select in the hot one's place
    hot, cut = RandomSelection().select(
        Candidates(online=DEVICES, round_id=2, seed=0, target=2), Participation()
    )
    (spare,) = set(DEVICES) - {hot, cut}
    budget = tmp_path / "tiny-budget.toml"
    budget.write_text("max_train_seconds = 0.000001\nmax_temp_c = 80\n")
    hold = tmp_path / "hold"
    hold.mkdir()
    watcher = Watcher(mosquitto, fleet.topics.status())
    try:
        fleet.aggregator(rounds=2, devices_per_round=2, min_devices=2, round_timeout_s=90,
                         seed=0)  # fmt: skip
        for i, device in enumerate(DEVICES):
            _temp(tmp_path / device, 45.0)
            # the timer reads sysfs once an hour: only the read before a round sees the heat
            fleet.agent(
                i,
                3,
                sysfs_root=tmp_path / device,
                readiness_interval_s=3600,
                hold_dir=hold,
                **({"profile": budget} if device == cut else {}),
            )

        def three_online_and_round_1_trained() -> bool:
            docs = [json.loads(p) for _, p in watcher.messages if p]
            online = docs and docs[-1].get("devices", {}).get("online") == 3
            return bool(online) and len(list(hold.glob("*.held"))) >= 2

        fleet.wait_for("3 devices online, round 1's two updates held",
                       three_online_and_round_1_trained, timeout=90)  # fmt: skip
        _temp(tmp_path / hot, 90.0)  # hot now, while its last state still says ready
        for device in DEVICES:
            (hold / f"{device}.release").write_text("")
        fleet.wait_for("round 1 closed", lambda: fleet.history(), timeout=60)
        for device in DEVICES:  # round 2's updates (a release is used up by each)
            (hold / f"{device}.release").write_text("")
        rounds = fleet.wait_rounds(2, timeout=90)
    finally:
        watcher.close()
    r2 = rounds[1]
    assert r2["outcome"] == "complete", r2
    assert r2["declined"] == {hot: "thermal: 90.0 C at or over the profile's 80 C limit"}
    assert r2["selected"] == sorted(DEVICES)  # the spare was added to the round
    parts = {p["device"]: p for p in r2["participants"]}
    assert set(parts) == {cut, spare}
    # the cut device stopped after one batch (batch_size 10): it weighs the 10 examples it
    # processed; the full one weighs its local dataset (one epoch planned, one done)
    short, full = parts[cut], parts[spare]
    assert short["metrics"]["budget_stopped"] == 1.0 and short["metrics"]["local_steps"] == 1
    assert short["examples"] == 10 and short["metrics"]["epochs_done"] < 1
    assert full["metrics"]["budget_stopped"] == 0.0 and full["metrics"]["epochs_done"] == 1.0
    assert short["metrics"]["epochs_planned"] == full["metrics"]["epochs_planned"] == 1
    assert full["examples"] > 100
    assert fleet.state()["counters"].get("declined") == 1

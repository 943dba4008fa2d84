"""Readiness from a fake sysfs tree: thermal zones and batteries decide, with a reason;
missing or broken files are no gate; the state is published again on a flip at once and
on a changed reason at most every republish_s."""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.readiness import ReadinessWatch, Reading, decide, read_sysfs
from firmware_profiles import Profile

PI = Profile(name="pi", max_temp_c=80.0, min_battery_pct=30.0, train_on_battery=True)


def zone(root: Path, n: int, millideg: str) -> None:
    d = root / "sys/class/thermal" / f"thermal_zone{n}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "temp").write_text(millideg + "\n")


def supply(root: Path, name: str, **files: str) -> None:
    d = root / "sys/class/power_supply" / name
    d.mkdir(parents=True, exist_ok=True)
    for key, value in files.items():
        (d / key).write_text(value + "\n")


def test_no_sysfs_is_no_gate(tmp_path: Path) -> None:
    assert read_sysfs(tmp_path) == Reading()
    assert decide(Reading(), PI).ready


def test_hottest_zone_over_the_limit_is_not_ready(tmp_path: Path) -> None:
    zone(tmp_path, 0, "45000")
    zone(tmp_path, 1, "83000")
    zone(tmp_path, 2, "garbage")  # broken sensors are ignored, not fatal
    zone(tmp_path, 3, "999999999")
    r = read_sysfs(tmp_path)
    assert r.temp_c == 83.0 and r.battery_pct is None and r.discharging is None
    d = decide(r, PI)
    assert not d.ready and d.reason == "thermal: 83.0 C at or over the profile's 80 C limit"
    assert decide(r, Profile(name="cool", max_temp_c=0)).ready  # 0: no thermal gate
    assert decide(r, Profile(name="s", can_train=False)).ready  # gates guard training only


def test_battery_gates(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="25", status="Discharging")
    r = read_sysfs(tmp_path)
    assert r == Reading(temp_c=None, battery_pct=25.0, discharging=True)
    d = decide(r, PI)
    assert not d.ready and d.reason == "battery: 25% on battery, under the profile's 30% minimum"
    mains_only = Profile(name="j", train_on_battery=False)
    assert decide(r, mains_only).reason.startswith("battery: discharging")
    supply(tmp_path, "AC", type="Mains", online="1")  # plugged in: charging is fine
    supply(tmp_path, "BAT0", type="Battery", capacity="25", status="Charging")
    r = read_sysfs(tmp_path)
    assert r.discharging is False and decide(r, PI).ready and decide(r, mains_only).ready


def test_watch_rereads_on_its_timer_and_when_forced(tmp_path: Path) -> None:
    zone(tmp_path, 0, "40000")
    w = ReadinessWatch(root=tmp_path, profile=PI, interval_s=10.0, republish_s=60.0)
    w.published(0.0)
    assert w.now.ready and not w.tick(1.0)
    zone(tmp_path, 0, "90000")
    assert not w.tick(5.0) and w.now.ready  # not due yet: no read
    log = logging.LoggerAdapter(logging.getLogger("t"), {})
    assert w.declines(7, 6.0, log) and w.declined == 7  # forced: reads at once
    assert not w.declines(7, 6.1, log)  # declined once: not again
    assert w.now.reason.startswith("thermal: 90.0 C") and w.tick(6.5)  # a flip: publish
    w.published(6.5)
    zone(tmp_path, 0, "91000")
    assert not w.tick(20.0) and w.now.reason.startswith("thermal: 91.0 C")  # rate-limited
    assert w.tick(70.0)  # the changed reason, once republish_s passed
    w.published(70.0)
    zone(tmp_path, 0, "50000")
    assert w.tick(80.0) and w.now.ready and not w.declines(8, 81.0, log)

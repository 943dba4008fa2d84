"""The operator views' state model, the text of `fedmq status` and the monitor's screen,
fed with messages as the broker delivers them (pure: no broker, no terminal)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from fedmq.fleetstate import FleetState, ago, clean_text, human_bytes
from fedmq.monitor import render, sparkline
from fedmq.statusview import device_lines, render_json, summary_lines
from fedmq.topics import Topics
from fedmq.wire import DeviceState, RoundAnnouncement, TrainConfig, encode_round, encode_state

T = Topics(job="j", prefix="p")
NOW = 1_800_000_000.0


def _status(**over: Any) -> bytes:
    doc = {"job": "j", "task": "digits-mlp", "mode": "sync", "phase": "training",
           "aggregator": "online", "done_reason": "", "model_version": 3, "accuracy": 0.8,
           "loss": 0.6, "rounds_closed": 3,
           "round": {"id": 4, "selected": 3, "received": 1, "target": 3, "dropped": ["c"],
                     "deadline_in_s": 12.0},
           "devices": {"online": 2, "trainers_online": 2, "known": 3},
           "counters": {"accepted": 9, "rejected_shape_mismatch": 1},
           "recent_rounds": [{"round": i, "accuracy": 0.5 + i / 10, "loss": 1 - i / 10}
                             for i in (1, 2, 3)],
           "updated_at": NOW - 12, "updated": "x"}  # fmt: skip
    doc.update(over)
    return json.dumps(doc).encode()


def _mirror(device: str, **over: Any) -> bytes:
    doc = {"device": device, "job": "j", "class": "rpi4", "status": "online", "trains": True,
           "model_version": 3, "last_seen": NOW - 5, "last_verdict": "accepted",
           "last_reason": "", "last_round": 4, "accepted": 3, "rejected": 0, "late": 0,
           "duplicates": 0, "bytes_up": 123_456}  # fmt: skip
    doc.update(over)
    return json.dumps(doc).encode()


def _state(device: str, status: str, job: str = "j", version: int = 3) -> bytes:
    return encode_state(DeviceState(device=device, status=status, job=job, profile="jetson",
                                    model_version=version))  # fmt: skip


def _round(selected: tuple[str, ...], rid: int = 4, job: str = "j") -> bytes:
    return encode_round(RoundAnnouncement(
        job=job, round_id=rid, model_version=3, state="open", opened_at=NOW - 20,
        deadline=NOW + 12, selected=selected, target=3, min_devices=2,
        train=TrainConfig(epochs=1, batch_size=10, lr=0.1)))  # fmt: skip


def _fleet() -> FleetState:
    st = FleetState(topics=T)
    for d in ("a", "b", "c"):
        st.on_message(T.fleet_device(d), _mirror(d), retained=True, now=NOW)
    st.on_message(T.fleet_device("b"), _mirror("b", last_verdict="rejected", accepted=2,
                  rejected=1, last_reason="shape_mismatch: 0.weight"), retained=False,
                  now=NOW)  # fmt: skip
    st.on_message(T.round(), _round(("a", "b", "c")), retained=True, now=NOW)
    st.on_message(T.status(), _status(), retained=True, now=NOW)
    return st


def _screen(st: FleetState, now: float = NOW) -> str:
    console = Console(file=io.StringIO(), width=160, height=50, color_system=None)
    console.print(render(st, now, height=50))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def device_row(screen: str, device: str) -> list[str]:
    """The cells of device's row in the monitor's device table (split on blanks); [] when
    it has none (also used on tmux captures: tests/integration/test_operator_views.py)."""
    lines = screen.splitlines()
    start = next((i for i, line in enumerate(lines) if " devices (" in line), len(lines))
    for line in lines[start:]:
        cells = line.strip("│ ").split()
        if len(cells) >= 6 and cells[0] == device:
            return cells
    return []


def test_status_mirror_and_round_make_the_summary_the_table_and_the_progress() -> None:
    st = _fleet()
    text = "\n".join(summary_lines(st, NOW))
    assert "training" in text and "aggregator online" in text and "version 3" in text
    assert "12 s ago" in text and "1 of 3 updates" in text and "2 online of 3 known" in text
    table = device_lines(st, NOW)
    assert [line.split()[0] for line in table] == ["device", "a", "b", "c"]
    assert "shape_mismatch: 0.weight" in table[2] and "123.5 kB" in table[1]
    assert {(p.device, p.stage) for p in st.progress()} == {
        ("a", "delivered"), ("b", "rejected"), ("c", "dropped")}
    doc = json.loads(render_json(st, devices=True))
    assert doc["phase"] == "training" and [d["device"] for d in doc["fleet"]] == ["a", "b", "c"]
    assert "fleet" not in json.loads(render_json(st, devices=False))
    assert [r for r, _, _ in st.series()] == [1, 2, 3]
    screen = _screen(st)
    for word in ("version 3", "round 4", "a delivered", "b rejected", "c dropped", "rpi4",
                 "shape_mismatch", "rejected_shape_mismatch 1", "no alerts"):  # fmt: skip
        assert word in screen, (word, screen)


def test_own_states_decide_presence_and_the_mirror_the_verdicts() -> None:
    st = _fleet()
    # a retained state is old news: it says how the device is, not that it was seen now
    st.on_message(T.device_state("b"), _state("b", "online"), retained=True, now=NOW + 1)
    assert st.devices["b"].last_seen == NOW - 5 and st.devices["b"].cls == "jetson"
    # a Will, built when the device started: the version it holds is the one seen before
    st.on_message(T.device_state("a"), _state("a", "offline", version=-1), retained=False,
                  now=NOW + 1)  # fmt: skip
    # a late mirror saying online does not bring it back: its own state is newer news
    st.on_message(T.fleet_device("a"), _mirror("a", accepted=4), retained=False, now=NOW + 2)
    a = st.devices["a"]
    assert (a.status, a.cls, a.accepted, a.model_version) == ("offline", "jetson", 4, 3)
    assert device_row(_screen(st), "a")[:3] == ["a", "jetson", "offline"]
    # a device of another job is not this job's: gone from the table
    st.on_message(T.device_state("b"), _state("b", "online", job="other"), retained=False,
                  now=NOW + 3)  # fmt: skip
    assert "b" not in st.devices
    # the aggregator forgot c: its mirror is cleared, its row goes
    st.on_message(T.fleet_device("c"), b"", retained=False, now=NOW + 4)
    assert sorted(st.devices) == ["a"]


def test_aggregator_offline_flapping_and_rejection_spikes_raise_alerts() -> None:
    st = _fleet()
    assert st.alerts(NOW) == []
    will = json.dumps({"job": "j", "phase": "offline", "aggregator": "offline",
                       "updated_at": None}).encode()  # fmt: skip
    st.on_message(T.status(), will, retained=False, now=NOW + 10)  # the broker fired it now
    # what the last live status said of the model stands; no round is open any more
    assert st.status is not None and st.status.model_version == 3 and st.status.round is None
    alerts = [a.text for a in st.alerts(NOW + 40)]
    assert alerts and alerts[0].startswith("aggregator offline since") and "30 s ago" in alerts[0]
    assert "aggregator offline since" in "\n".join(summary_lines(st, NOW + 40))
    assert "OFFLINE" in _screen(st, NOW + 40)
    # found retained (the monitor started after it died): when is unknown, said so
    late = FleetState(topics=T)
    late.on_message(T.status(), will, retained=True, now=NOW)
    assert "connection was lost" in late.alerts(NOW)[0].text
    # the aggregator back: no alert
    st.on_message(T.status(), _status(updated_at=NOW + 50), retained=False, now=NOW + 50)
    assert not st.aggregator_offline and st.alerts(NOW + 50) == []
    # a device going offline and online three times within a minute flaps
    for i, status in enumerate(["online", "offline", "online", "offline"]):
        st.on_message(T.device_state("a"), _state("a", status), retained=False,
                      now=NOW + 60 + i)  # fmt: skip
    assert st.flapping(NOW + 70) == [("a", 3)]
    assert any("device a flapping" in a.text for a in st.alerts(NOW + 70))
    assert st.flapping(NOW + 200) == []
    # rejections: +6 in a minute is a spike; the same total a minute later is not
    st.on_message(T.status(), _status(counters={"rejected_decode_error": 7}), retained=False,
                  now=NOW + 80)  # fmt: skip
    assert any("rejections spiking: 6" in a.text for a in st.alerts(NOW + 80))
    st.on_message(T.status(), _status(counters={"rejected_decode_error": 7}), retained=False,
                  now=NOW + 200)  # fmt: skip
    assert not any("spiking" in a.text for a in st.alerts(NOW + 200))


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1, 2]", b"\xff\xfe", b'{"round": {"id": "x"}, "counters": [1]}',
    b"[" * 100_000, b'{"phase": 5, "model_version": 1e300, "accuracy": "NaN"}',
    b'{"a": "' + b"x" * (600 * 1024) + b'"}',
])  # fmt: skip
def test_hostile_status_payloads_never_raise(payload: bytes) -> None:
    st = FleetState(topics=T)
    st.on_message(T.status(), payload, retained=False, now=NOW)
    summary_lines(st, NOW)
    _screen(st)
    render_json(st, devices=True)


def test_hostile_text_cannot_drive_the_terminal_or_grow_the_tables() -> None:
    st = FleetState(topics=T, max_devices=3)
    evil = "\x1b[2J\x1b]0;pwned\x07[bold red]boom[/]" + "x" * 5000
    st.on_message(T.fleet_device("a"), _mirror("a", last_reason=evil, **{"class": evil}),
                  retained=False, now=NOW)  # fmt: skip
    st.on_message(T.status(), _status(phase=evil, counters={evil: 1}), retained=False, now=NOW)
    screen = _screen(st)
    assert "\x1b" not in screen and "\x07" not in screen
    assert "[bold red]boom" in screen  # shown as text, not taken as markup
    assert all(len(c) <= 160 for c in (st.devices["a"].last_reason, st.devices["a"].cls))
    # a mirror on another device's topic, junk, oversize: ignored
    st.on_message(T.fleet_device("b"), _mirror("a"), retained=False, now=NOW)
    st.on_message(T.fleet_device("b"), b"\x00" * 100, retained=False, now=NOW)
    st.on_message(T.fleet_device("b"), _mirror("b", pad="x" * 20_000), retained=False, now=NOW)
    st.on_message(T.device_state("b"), b"\xc1junk", retained=False, now=NOW)
    st.on_message(T.round(), b"\xc1junk", retained=False, now=NOW)
    assert sorted(st.devices) == ["a"] and st.ignored == 5
    for d in "bcdefg":  # bounded: the rest is counted, not kept
        st.on_message(T.fleet_device(d), _mirror(d), retained=False, now=NOW)
    assert len(st.devices) == 3 and st.overflow == 4
    assert any("not shown" in a.text for a in st.alerts(NOW))
    assert clean_text("a\nb\tc") == "a?b?c"


def test_human_helpers() -> None:
    assert ago(NOW - 12, NOW) == "12 s ago" and ago(NOW - 600, NOW) == "10 min ago"
    assert ago(NOW - 3 * 3600, NOW) == "3 h ago" and ago(None, NOW) == "never"
    assert human_bytes(950) == "950 B" and human_bytes(4_100_000) == "4.1 MB"
    assert sparkline([0.1, 0.5, 0.9]) == "▁▅█" and sparkline([None, 1.0]) == " ▁"
    assert sparkline([]) == ""

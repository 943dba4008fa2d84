"""An operator watching a running fleet: `fedmq status` over MQTT 5 and 3.1.1, the fleet
mirror read by a plain MQTT client, and `fedmq monitor` driven in a real terminal (tmux)
while a device and then the aggregator are killed.

One fleet for the whole module (a broker with its fleet directory, an aggregator over MQTT
3.1.1, three agents, d1 over 3.1.1): d2 holds its updates (edge_agent.hold), so the test
decides when rounds close and the fleet sits idle, with a round open, while it is watched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.mosquitto import BrokerSettings, MosquittoBroker, mosquitto_path
from broker.provision import FleetDir, operator_identity
from tests.conftest import TEST_DEVICES, TEST_JOB
from tests.edge_agent.test_agent import wait_until
from tests.fedmq.test_fleetstate import device_row
from tests.integration.fleet import Fleet

DEVICES = ("d0", "d1", "d2")
CLOSED_ROUNDS = 2  # rounds released before the fleet is watched; the next one stays open
KEEPALIVE_S = 30  # fedmq's (link.BrokerAddress.keepalive): a Will fires within 1.5 x


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The module's fleet, after CLOSED_ROUNDS rounds, with round CLOSED_ROUNDS + 1 open."""
    if mosquitto_path() is None:
        pytest.fail("Mosquitto is not installed: apt-get install mosquitto", pytrace=False)
    root = tmp_path_factory.mktemp("operator")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    fleet_dir = FleetDir.init(root / "fleet", job=TEST_JOB, prefix=prefix, devices=TEST_DEVICES)
    broker = MosquittoBroker(settings=BrokerSettings(data_dir=root / "mosquitto",
                                                     fleet_dir=fleet_dir.root)).start()  # fmt: skip
    fleet = Fleet(broker=broker, root=root, prefix=prefix)
    hold = root / "hold"
    hold.mkdir()
    try:
        fleet.aggregator(rounds=50, devices_per_round=3, min_devices=3, round_timeout_s=600,
                         mqtt_version="3.1.1")  # fmt: skip
        fleet.agent(0, 3)
        fleet.agent(1, 3, mqtt_version="3.1.1")
        fleet.agent(2, 3, hold_dir=hold)
        for r in range(1, CLOSED_ROUNDS + 1):
            fleet.wait_for(f"d2 holding its round {r} update",
                           partial(_holds, hold, r), timeout=120)  # fmt: skip
            (hold / "d2.release").write_text(json.dumps({"up_to_round": r}))
            fleet.wait_rounds(r, timeout=60)
        fleet.wait_for("d2 holding its next update", partial(_holds, hold, CLOSED_ROUNDS + 1),
                       timeout=60)  # fmt: skip
        mirror = Mirror(fleet)
        try:  # the mirror follows the acks by up to a second
            want = {"d0": CLOSED_ROUNDS + 1, "d1": CLOSED_ROUNDS + 1, "d2": CLOSED_ROUNDS}
            fleet.wait_for("d0 and d1 counted in the open round, in the mirror",
                           lambda: {d: doc["accepted"] for d, doc in mirror.docs().items()}
                           == want, timeout=60)  # fmt: skip
        finally:
            mirror.close()
        yield fleet
    finally:
        fleet.stop()
        broker.stop()


def _holds(hold: Path, round_id: int) -> bool:
    """Whether d2 holds its update for round_id (edge_agent.hold's record)."""
    try:
        return int(json.loads((hold / "d2.held").read_text())["round_id"]) == round_id
    except (OSError, ValueError, KeyError):
        return False


def _operator_flags(fleet: Fleet, mqtt_version: str) -> list[str]:
    """Connection flags of the read-only operator: its bundle's operator.toml (as `fedmq
    fleet init` makes it), with this test broker's port and the protocol asked for."""
    fleet_dir = fleet.fleet_dir
    assert fleet_dir is not None
    config = fleet_dir.bundle(operator_identity(fleet.job)).root / "operator.toml"
    return ["--config", str(config), "--host", fleet.broker.host,
            "--port", str(fleet.broker.port), "--mqtt-version", mqtt_version]  # fmt: skip


def _fedmq(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # the child imports this tree: it inherits PYTHONPATH, as fedmq.processes' children do
    return subprocess.run([sys.executable, "-m", "fedmq", *argv], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_status_lists_each_device_as_json_and_for_people(running: Fleet, mqtt_version: str) -> None:
    flags = _operator_flags(running, mqtt_version)
    proc = _fedmq("status", *flags, "--json", "--devices")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["aggregator"] == "online" and doc["phase"] == "training"
    assert doc["round"]["id"] == CLOSED_ROUNDS + 1 and doc["round"]["received"] == 2
    assert [p["round"] for p in doc["recent_rounds"]] == list(range(1, CLOSED_ROUNDS + 1))
    fleet = {d["device"]: d for d in doc["fleet"]}
    assert sorted(fleet) == list(DEVICES)
    for device, d in fleet.items():
        assert d["status"] in ("online", "training") and d["trains"] is True
        assert d["accepted"] == (CLOSED_ROUNDS if device == "d2" else CLOSED_ROUNDS + 1)
        assert d["last_verdict"] == "accepted" and d["bytes_up"] > 0
        assert d["model_version"] == CLOSED_ROUNDS and d["class"]
    human = _fedmq("status", *flags, "--devices")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert "aggregator online" in lines[0] and "training" in lines[0]
    rows = {cells[0]: cells for cells in map(str.split, lines) if cells[:1] in (["d0"],
            ["d1"], ["d2"])}  # fmt: skip
    assert sorted(rows) == list(DEVICES)
    assert all(r[2] in ("online", "training") for r in rows.values())


def test_the_fleet_mirror_is_json_that_a_plain_mqtt_client_reads(running: Fleet) -> None:
    """What `mosquitto_sub -v -t '<p>/t/fleet/#'` shows: one retained JSON per device."""
    mirror = Mirror(running)  # a fresh subscriber: what it gets is what the broker retained
    try:
        wait_until("the mirror of every device", lambda: set(DEVICES) <= set(mirror.docs()),
                   timeout=10)  # fmt: skip
        for device, doc in mirror.docs().items():
            assert doc["device"] == device and doc["job"] == running.job
            assert doc["status"] in ("online", "training")
            assert {"class", "trains", "model_version", "last_seen", "last_seen_iso",
                    "last_verdict", "last_reason", "accepted", "rejected", "bytes_up"} <= set(doc)
    finally:
        mirror.close()


class Mirror:
    """A plain paho client (MQTT 3.1.1, the operator's certificate) on <p>/<job>/fleet/#."""

    def __init__(self, fleet: Fleet) -> None:
        fleet_dir = fleet.fleet_dir
        assert fleet_dir is not None
        bundle = fleet_dir.bundle(operator_identity(fleet.job))
        self._got: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(bundle.ca_file), certfile=str(bundle.cert_file),
                            keyfile=str(bundle.key_file))  # fmt: skip
        topic = f"{fleet.prefix}/{fleet.job}/fleet/#"
        self.client.on_connect = lambda c, *_: c.subscribe(topic, 1)
        self.client.on_message = self._on_message
        self.client.connect(fleet.broker.host, fleet.broker.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self._got[msg.topic.rsplit("/", 1)[1]] = bytes(msg.payload)

    def docs(self) -> dict[str, dict[str, Any]]:
        """device -> its mirror document, as last received (cleared ones left out)."""
        with self._lock:
            return {d: json.loads(p) for d, p in self._got.items() if p}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Terminal:
    """A tmux server of its own (its own socket) with one 160x50 window running a command."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.tmux = shutil.which("tmux")
        if self.tmux is None:
            pytest.fail("tmux is not installed: apt-get install tmux", pytrace=False)
        self.socket = f"fedmq-test-{uuid.uuid4().hex[:8]}"
        shell = " ".join(shlex.quote(a) for a in ["env", *(f"{k}={v}" for k, v in env.items()),
                                                   *command])  # fmt: skip
        # the pane outlives the command, so a crash stays on screen for the failure message
        self._run("new-session", "-d", "-x", "160", "-y", "50", "-s", "monitor",
                  f"{shell}; echo; echo \"[exited $?]\"; sleep 3600")  # fmt: skip

    def _run(self, *args: str) -> str:
        assert self.tmux is not None
        return subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout  # fmt: skip

    def screen(self) -> str:
        """The text on the screen now (tmux capture-pane)."""
        return self._run("capture-pane", "-p", "-t", "monitor")

    def close(self) -> None:
        assert self.tmux is not None
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)  # fmt: skip


def test_the_monitor_in_a_terminal_shows_devices_and_who_went_offline(running: Fleet) -> None:
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "TERM": "xterm-256color",
           "COLUMNS": "160", "LINES": "50"}  # fmt: skip
    term = Terminal([sys.executable, "-m", "fedmq", "monitor",
                     *_operator_flags(running, "5")], env)  # fmt: skip
    try:
        def rows(status: tuple[str, ...]) -> str | None:
            screen = term.screen()
            ok = all(device_row(screen, d)[2:3] in ([s] for s in status) for d in DEVICES)
            return screen if ok and "aggregator online" in screen else None

        def says(text: str) -> str | None:
            screen = term.screen()
            return screen if text in screen else None

        screen = _wait_screen(term, "each device online in the table",
                              lambda: rows(("online", "training")), 30)  # fmt: skip
        assert f"round {CLOSED_ROUNDS + 1}" in screen and "d0 delivered" in screen
        print(f"\n--- the monitor, fleet running ---\n{screen}")
        running.kill("agent-2")  # d2: kill -9, its Will fires at once
        screen = _wait_screen(term, "d2 offline", lambda: device_row(term.screen(), "d2")[2:3]
                              == ["offline"] and term.screen(), 30)  # fmt: skip
        assert device_row(screen, "d0")[2] in ("online", "training")
        watch = StatusWatch(_operator_flags(running, "3.1.1"))
        try:
            wait_until("fedmq status --watch printing", watch.docs, timeout=15)
            running.kill("aggregator")
            screen = _wait_screen(term, "the aggregator offline", lambda: says("OFFLINE"),
                                  1.5 * KEEPALIVE_S + 5)  # fmt: skip
            assert "ALERT aggregator offline since" in screen
            print(f"\n--- the monitor, d2 and the aggregator killed ---\n{screen}")
            wait_until("--watch printing the aggregator offline",
                       lambda: watch.docs()[-1]["aggregator"] == "offline", timeout=10)  # fmt: skip
            assert watch.interrupt() == 0  # Ctrl-C ends a watch as asked: exit 0
        finally:
            watch.close()
        proc = _fedmq("status", *_operator_flags(running, "3.1.1"), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["aggregator"] == "offline"
        # restarted, the aggregator overwrites its Will with its live status
        running.aggregator(rounds=50, devices_per_round=3, min_devices=3, round_timeout_s=600,
                           mqtt_version="3.1.1")  # fmt: skip
        _wait_screen(term, "the aggregator back online", lambda: says("aggregator online"), 60)
        counters = json.loads(_fedmq("status", *_operator_flags(running, "5"), "--json").stdout)
        assert counters["counters"].get("foreign_downlink", 0) == 0  # its own Will is no forgery
    finally:
        term.close()


class StatusWatch:
    """`fedmq status --watch --json` in the background, its lines collected as they come."""

    def __init__(self, flags: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fedmq", "status", *flags,
                                      "--watch", "--json"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    def docs(self) -> list[dict[str, Any]]:
        """Every document printed so far (one a line)."""
        return [json.loads(line) for line in list(self._lines)]

    def interrupt(self) -> int:
        """Ctrl-C; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _wait_screen(term: Terminal, what: str, check: Any, timeout: float) -> str:
    """Poll check() (a few times a second: each look is a tmux capture) until it returns
    the screen; fail with the screen as it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            assert isinstance(got, str)
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n--- screen "
                         f"---\n{term.screen()}")  # fmt: skip

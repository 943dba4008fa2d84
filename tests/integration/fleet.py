"""Start a real aggregator and real agents as processes against a test broker."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from aggregator.journal import read_ledger
from broker.provision import FleetDir, aggregator_identity, operator_identity
from fedmq import processes
from fedmq.report import read_history
from fedmq.topics import Topics
from fedmq.wire import Ack, decode_ack


class Fleet:
    """An aggregator and agents for one job under one topic prefix; stops them all."""

    def __init__(self, *, broker: Any, root: Path, prefix: str, job: str = "t",
                 task: str = "digits-mlp") -> None:  # fmt: skip
        self.broker = broker
        self.root = root
        self.prefix = prefix
        self.job = job
        self.task = task
        self.topics = Topics(job=job, prefix=prefix)
        self.procs: dict[str, processes.Child] = {}
        self.killed: set[str] = set()  # killed on purpose, not yet restarted
        self.state_dir = root / "aggregator"

    def _common(self) -> list[str]:
        return ["--host", self.broker.host, "--port", str(self.broker.port),
                "--mqtt-version", self.broker.mqtt_version, "--job", self.job,
                "--prefix", self.prefix, "--task", self.task]  # fmt: skip

    @property
    def fleet_dir(self) -> FleetDir | None:
        """The broker's fleet directory (certificates, ACL, bundles); None when insecure."""
        return fleet_dir_of(self.broker)

    def credentials(self, identity: str) -> dict[str, Any]:
        """Flags that make a process connect as identity (a device id or the aggregator)."""
        fleet = self.fleet_dir
        if fleet is None:
            return {"insecure": True}
        info = fleet.read()
        assert (info.prefix, info.job) == (self.prefix, self.job), (
            f"the broker's fleet is {info.prefix}/{info.job}, this Fleet {self.prefix}/{self.job}")
        bundle = fleet.bundle(identity)
        creds = {"ca_file": bundle.ca_file, "cert_file": bundle.cert_file,
                 "key_file": bundle.key_file}  # fmt: skip
        if identity == aggregator_identity(self.job):
            return {**creds, "signing_key": fleet.signing_key, "fleet_file": fleet.fleet_file}
        return {**creds, "server_key": fleet.signing_pub}

    def _spawn(self, name: str, argv: list[str]) -> processes.Child:
        # a restarted process appends to the log of the one it replaces
        proc = processes.spawn_fedmq(argv, self.root / f"{name}.log")
        self.procs[name] = proc
        self.killed.discard(name)
        return proc

    def aggregator(self, **flags: Any) -> processes.Child:
        """Start the aggregator with --flag value pairs from keyword arguments."""
        opts = {"state_dir": self.state_dir, "rounds": 3, "round_timeout_s": 30,
                "start_wait_s": 30, "epochs": 1, "batch_size": 10, "lr": 0.05,
                **self.credentials(aggregator_identity(self.job)), **flags}  # fmt: skip
        return self._spawn("aggregator", ["aggregator", *self._common(), *_flags(opts)])

    def agent(self, index: int, num_devices: int, **flags: Any) -> processes.Child:
        """Start agent number index of num_devices (device id d<index>)."""
        device = flags.get("device_id", f"d{index}")
        # idle when the job is done: tests restart aggregators with more rounds after it
        opts = {"device_id": device, "device_index": index, "num_devices": num_devices,
                "partition": "iid", "state_dir": self.root / "agents", "on_done": "idle",
                # readiness from a tree of the test's own, not the host's sensors
                "sysfs_root": self.root / "sysfs",
                **self.credentials(device), **flags}  # fmt: skip
        return self._spawn(f"agent-{index}", ["agent", *self._common(), *_flags(opts)])

    def history(self) -> list[dict[str, Any]]:
        """The aggregator's round records so far."""
        return read_history(self.state_dir)

    def ledger(self) -> list[dict[str, Any]]:
        """Every verdict the aggregator committed (update id, device, round, verdict, reason)."""
        return read_ledger(self.state_dir)

    def counted(self) -> list[str]:
        """Ids of the updates the aggregator accepted into a sum, in order."""
        return [v["update_id"] for v in self.ledger() if v["verdict"] == "accepted"]

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll check() until it returns something truthy; fail with the logs otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            agg = self.procs.get("aggregator")
            if agg is not None and agg.poll() not in (None, 0) and "aggregator" not in self.killed:
                break
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def wait_rounds(self, n: int, timeout: float = 120) -> list[dict[str, Any]]:
        """Wait until n rounds are in the history."""
        return self.wait_for(f"{n} rounds", lambda: len(self.history()) >= n and self.history(),
                             timeout)  # fmt: skip

    def log_text(self, name: str) -> str:
        """The whole log of one process ('aggregator', 'agent-3'); '' before it wrote any."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, name: str, text: str, timeout: float, count: int = 1) -> str:
        """Wait until a process's log holds text at least count times; return the log."""
        return self.wait_for(f"{text!r} x{count} in {name}.log",
                             lambda: self.log_text(name).count(text) >= count
                             and self.log_text(name), timeout)  # fmt: skip

    def outbox(self, index: int) -> list[Path]:
        """Updates agent index (device d<index>) still keeps unacknowledged in its outbox."""
        path = self.root / "agents" / f"d{index}" / "outbox"
        return sorted(path.glob("*.update")) if path.exists() else []

    def logs(self, tail: int = 25) -> str:
        out = []
        for name in self.procs:
            path = self.root / f"{name}.log"
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def kill(self, name: str) -> None:
        """SIGKILL one process (no clean shutdown, no offline message: its Will fires)."""
        self.killed.add(name)
        processes.kill(self.procs[name])

    def stop(self) -> None:
        """SIGTERM every process still running, SIGKILL those still running 10 s later."""
        processes.stop_all(self.procs.values(), grace_s=10)


def fleet_dir_of(broker: Any) -> FleetDir | None:
    """The fleet directory a test broker was started with, None for a plain one."""
    path = getattr(getattr(broker, "settings", None), "fleet_dir", None)
    return FleetDir(path) if path is not None else None


def paho_client(broker: Any, identity: str | None = None,
                client_id: str = "") -> mqtt.Client:  # fmt: skip
    """A paho client (not connected) for broker; on a secured broker it presents identity's
    certificate (default: one of the read-only operators', each watcher its own)."""
    version = mqtt.MQTTv5 if broker.mqtt_version == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
    fleet = fleet_dir_of(broker)
    if fleet is not None:
        bundle = fleet.bundle(identity or _watcher_identity(fleet))
        client.tls_set(ca_certs=str(bundle.ca_file), certfile=str(bundle.cert_file),
                       keyfile=str(bundle.key_file))  # fmt: skip
    return client


_watchers = itertools.count()


def _watcher_identity(fleet: FleetDir) -> str:
    """A read-only identity for one more watcher: the fleet's added operators in turn (the
    broker fixture adds eight), else the operator's own."""
    info = fleet.read()
    names = [o.id for o in info.operators.values() if not o.revoked]
    return names[next(_watchers) % len(names)] if names else operator_identity(info.job)


def _flags(opts: dict[str, Any]) -> list[str]:
    out = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


class Watcher:
    """A plain paho client that records messages on a topic filter (acks, updates)."""

    def __init__(self, broker: Any, topic_filter: str, identity: str | None = None) -> None:
        """Subscribe to topic_filter as identity (default: a read-only operator of its own)."""
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho_client(broker, identity)
        self.client.on_connect = lambda c, *_: c.subscribe(topic_filter, 1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def acks(self) -> list[tuple[str, Ack]]:
        with self._lock:
            return [(t, decode_ack(p)) for t, p in self.messages]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

"""The fleet's broker, as an attacker meets it: generated mTLS listener, ACL and CRL.

Every test talks to a real Mosquitto started with a fleet directory that `fedmq fleet`
code made (tests/conftest.py's broker_factory). Refusals are read from what the broker
answers (CONNACK, PUBACK reason codes, SUBACK) and from what a legitimate subscriber
receives, never from logs.
"""

from __future__ import annotations

import shutil
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.provision import FleetDir, aggregator_identity, operator_identity
from fedmq.fleetfile import read_fleet
from fedmq.topics import Topics
from tests.conftest import TEST_JOB
from tests.integration.fleet import fleet_dir_of

WAIT = 10.0


def wait_until(check: Any, what: str) -> Any:
    """check()'s first truthy value, polled for up to WAIT seconds; fails naming what."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Client:
    """A paho client recording what the broker answers: connect result, PUBACK reasons,
    granted subscriptions and messages."""

    def __init__(self, broker: Any, *, bundle: Any = None, ca: Path | None = None,
                 version: int = mqtt.MQTTv5) -> None:  # fmt: skip
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"c-{uuid.uuid4().hex[:8]}", protocol=version)
        if bundle is not None:
            self.client.tls_set(ca_certs=str(bundle.ca_file), certfile=str(bundle.cert_file),
                                keyfile=str(bundle.key_file))  # fmt: skip
        elif ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.connack: str | None = None
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.pubacks: dict[int, str] = {}
        self.subacks: list[list[str]] = []
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.error: Exception | None = None
        try:
            self.client.connect(broker.host, broker.port)
        except (OSError, ssl.SSLError) as err:  # the TLS handshake itself was refused
            self.error = err
            return
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connack = str(reason_code)
        if not reason_code.is_failure:
            self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._lock:
            self.pubacks[mid] = str(reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._lock:
            self.subacks.append([str(rc) for rc in reason_codes])

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def refused(self) -> bool:
        """True once the broker refused or dropped this client without a session."""
        if self.error is not None:
            return True
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return False
            if self.disconnected.is_set() or (self.connack and self.connack != "Success"):
                return True
            time.sleep(0.02)
        return True  # no CONNACK at all: the TLS handshake failed

    def publish(self, topic: str, payload: bytes) -> str:
        """Publish at QoS 1 and return the PUBACK's reason (MQTT 5)."""
        info = self.client.publish(topic, payload, qos=1)
        return str(wait_until(lambda: self._locked(lambda: self.pubacks.get(info.mid)),
                              f"a PUBACK for {topic}"))  # fmt: skip

    def subscribe(self, topic: str) -> list[str]:
        count = len(self.subacks)
        self.client.subscribe(topic, 1)
        return list(wait_until(lambda: self._locked(
            lambda: self.subacks[-1] if len(self.subacks) > count else None),
            f"a SUBACK for {topic}"))  # fmt: skip

    def _locked(self, read: Any) -> Any:
        with self._lock:
            return read()

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def secured(mosquitto: Any) -> tuple[Any, FleetDir, Topics]:
    fleet = fleet_dir_of(mosquitto)
    assert fleet is not None
    info = fleet.read()
    return mosquitto, fleet, Topics(job=info.job, prefix=info.prefix)


def test_generated_config_has_no_anonymous_access_and_one_identity_per_cert(
    secured: tuple[Any, FleetDir, Topics],
) -> None:
    broker, _, _ = secured
    lines = broker.config_path.read_text().splitlines()
    assert "allow_anonymous false" in lines and "allow_anonymous true" not in lines
    for line in ("require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true"):  # fmt: skip
        assert line in lines
    assert any(line.startswith("acl_file ") for line in lines)
    assert any(line.startswith("crlfile ") for line in lines)


def test_plain_and_anonymous_and_foreign_connections_are_refused(
    secured: tuple[Any, FleetDir, Topics], tmp_path: Path
) -> None:
    broker, fleet, _ = secured
    plain = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    refused = threading.Event()
    plain.on_connect = lambda c, u, f, rc, p: rc.is_failure and refused.set()
    plain.on_disconnect = lambda *_: refused.set()
    plain.connect(broker.host, broker.port)  # TCP without TLS: the broker drops it
    plain.loop_start()
    try:
        assert refused.wait(WAIT)
    finally:
        plain.loop_stop()
    no_cert = Client(broker, ca=fleet.ca_cert)  # TLS, but no client certificate
    assert no_cert.refused()
    other = FleetDir.init(tmp_path / "other", job=TEST_JOB, prefix="x", devices=["d0"])
    foreign = Client(broker, bundle=_with_ca(other.bundle("d0"), fleet.ca_cert))
    assert foreign.refused()  # same CN "d0", certificate from another CA
    good = Client(broker, bundle=fleet.bundle("d0"))
    assert not good.refused()
    good.close()


def _with_ca(bundle: Any, ca: Path) -> Any:
    """bundle's certificate and key, trusting ca (so that the client accepts our broker)."""

    class Mixed:
        ca_file, cert_file, key_file = ca, bundle.cert_file, bundle.key_file

    return Mixed


def test_device_may_publish_only_its_own_topics(secured: tuple[Any, FleetDir, Topics]) -> None:
    broker, fleet, t = secured
    aggregator = Client(broker, bundle=fleet.bundle(aggregator_identity(TEST_JOB)))
    assert not aggregator.refused()
    aggregator.subscribe(t.updates_filter())
    operator = Client(broker, bundle=fleet.bundle(operator_identity(TEST_JOB)))
    assert not operator.refused()
    operator.subscribe(f"{t.base}/#")
    d0 = Client(broker, bundle=fleet.bundle("d0"))
    assert not d0.refused()
    try:
        for topic in (t.update("d1"), t.global_manifest(), t.global_chunk(1, 0), t.round(),
                      t.status(), t.ack("d1"), t.device_state("d1"), t.metrics("d1"),
                      t.fleet_device("d0")):  # fmt: skip
            assert d0.publish(topic, b"forged") == "Not authorized", topic
        assert d0.publish(t.update("d0"), b"mine") == "Success"
        # the aggregator got d0's own update and none of the forgeries
        wait_until(aggregator.received, "d0's own update at the aggregator")
        assert aggregator.received() == [(t.update("d0"), b"mine")]
        assert all(payload != b"forged" for _, payload in operator.received())
        # the read-only operator may not publish anything
        assert operator.publish(t.status(), b"done, 0.99") == "Not authorized"
        assert operator.publish(t.fleet_device("d0"), b"{}") == "Not authorized"
        # the fleet mirror is the aggregator's to write, and the operator reads it
        assert aggregator.publish(t.fleet_device("d0"), b'{"device": "d0"}') == "Success"
        wait_until(lambda: (t.fleet_device("d0"), b'{"device": "d0"}') in operator.received(),
                   "the mirror at the operator")  # fmt: skip
    finally:
        for c in (aggregator, operator, d0):
            c.close()


def test_device_reads_only_the_downlink_and_its_own_acks(
    secured: tuple[Any, FleetDir, Topics],
) -> None:
    broker, fleet, t = secured
    aggregator = Client(broker, bundle=fleet.bundle(aggregator_identity(TEST_JOB)))
    d0 = Client(broker, bundle=fleet.bundle("d0"))
    assert not aggregator.refused() and not d0.refused()
    try:
        d0.subscribe(f"{t.base}/#")
        d0.subscribe(t.device_states_filter())
        for topic in (t.ack("d1"), t.ack("d0"), t.round()):
            sent = aggregator.publish(topic, topic.encode())
            assert sent in ("Success", "No matching subscribers")
        wait_until(lambda: len(d0.received()) >= 2, "d0's ack and the round")
        topics = sorted(topic for topic, _ in d0.received())
        assert topics == sorted([t.ack("d0"), t.round()])  # never d1's ack
    finally:
        aggregator.close()
        d0.close()


def test_mqtt311_forgery_is_silently_dropped(secured: tuple[Any, FleetDir, Topics]) -> None:
    broker, fleet, t = secured
    aggregator = Client(broker, bundle=fleet.bundle(aggregator_identity(TEST_JOB)))
    d0 = Client(broker, bundle=fleet.bundle("d0"), version=mqtt.MQTTv311)
    assert not aggregator.refused() and not d0.refused()
    try:
        aggregator.subscribe(t.updates_filter())
        d0.publish(t.update("d1"), b"forged")  # 3.1.1 has no reason code: PUBACK, dropped
        d0.publish(t.update("d0"), b"mine")  # after the forgery: once it arrives, both were
        wait_until(aggregator.received, "d0's own update at the aggregator")
        assert aggregator.received() == [(t.update("d0"), b"mine")]
    finally:
        aggregator.close()
        d0.close()


def test_enrol_live_and_revoke(secured: tuple[Any, FleetDir, Topics]) -> None:
    broker, fleet, t = secured
    before = {d: fleet.bundle(d).cert_file.read_bytes() for d in ("d0", "d1")}
    bundle = fleet.add("newcomer", device_class="rpi4")
    assert {d: fleet.bundle(d).cert_file.read_bytes() for d in before} == before  # not re-issued
    broker.reload()  # SIGHUP: the ACL now has the newcomer, no restart
    aggregator = Client(broker, bundle=fleet.bundle(aggregator_identity(TEST_JOB)))
    assert not aggregator.refused()
    aggregator.subscribe(t.updates_filter())
    newcomer = Client(broker, bundle=bundle)
    assert not newcomer.refused()
    wait_until(lambda: newcomer.publish(t.update("newcomer"), b"hello") == "Success",
               "the reloaded ACL to let the newcomer publish")  # fmt: skip
    newcomer.close()

    revoked_bundle = fleet.bundle("d1")
    kept = {name: (revoked_bundle.root / name).read_bytes()
            for name in ("ca.crt", "client.crt", "client.key")}  # fmt: skip
    fleet.revoke("d1")
    assert read_fleet(fleet.fleet_file).enrolled("d1") is None
    broker.reload()  # at once: no more ACL for d1
    stolen = revoked_bundle.root.parent / "stolen-d1"
    stolen.mkdir()
    for name, data in kept.items():
        (stolen / name).write_bytes(data)

    class Stolen:
        ca_file, cert_file = stolen / "ca.crt", stolen / "client.crt"
        key_file = stolen / "client.key"

    d1 = Client(broker, bundle=Stolen)
    if not d1.refused():
        wait_until(lambda: d1.publish(t.update("d1"), b"revoked") == "Not authorized",
                   "the revoked device to lose its ACL after SIGHUP")  # fmt: skip
        d1.close()
    broker.restart()  # from its next start the CRL refuses the certificate itself
    assert Client(broker, bundle=Stolen).refused()
    d0 = Client(broker, bundle=fleet.bundle("d0"))
    assert not d0.refused()  # everyone else is unaffected
    d0.close()
    aggregator.close()


def test_added_operators_watch_side_by_side_and_lose_their_reads_when_revoked(
    secured: tuple[Any, FleetDir, Topics],
) -> None:
    # one certificate is one client id: a second tool on operator.<job>'s bundle would take
    # its session over; an added operator is an identity of its own, read-only like it
    broker, fleet, t = secured
    alice = fleet.add_operator("alice")
    broker.reload()
    aggregator = Client(broker, bundle=fleet.bundle(aggregator_identity(TEST_JOB)))
    operator = Client(broker, bundle=fleet.bundle(operator_identity(TEST_JOB)))
    watcher = Client(broker, bundle=alice)
    try:
        assert not (aggregator.refused() or operator.refused() or watcher.refused())
        for c in (operator, watcher):
            c.subscribe(t.status())
        assert watcher.publish(t.status(), b"forged") == "Not authorized"  # read-only
        aggregator.publish(t.status(), b"1")
        wait_until(lambda: operator.received() and watcher.received(), "the status at both")
        assert not operator.disconnected.is_set() and not watcher.disconnected.is_set()
        stolen = alice.root.parent / "stolen-alice"  # revoke deletes the bundle: keep a copy
        shutil.copytree(alice.root, stolen)
        fleet.revoke(operator_identity(TEST_JOB, "alice"))
        broker.reload()
        assert operator_identity(TEST_JOB, "alice") not in fleet.acl.read_text()
        # its certificate stays valid until the broker's restart reads the CRL: no reads
        # (alice's first client goes first: one certificate, one client id, one session)
        watcher.close()
        late = Client(broker, bundle=type(alice)(stolen))
        try:
            # Mosquitto may refuse it outright (nothing to read, then) or let it connect
            # without reads; a subscription waits for CONNACK (paho drops one sent before)
            if not late.refused():
                late.subscribe(t.status())
            aggregator.publish(t.status(), b"2")
            wait_until(lambda: len(operator.received()) >= 2, "the second status")
            assert late.received() == []
        finally:
            late.close()
    finally:
        for c in (aggregator, operator, watcher):
            c.close()

"""Broker package: generated configs, and real paho round trips through Mosquitto and amqtt."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

import broker.launch
import broker.mosquitto
from broker import (
    BrokerSettings,
    EmbeddedBroker,
    MosquittoBroker,
    free_port,
    render_config,
    start_broker,
)

pytestmark = pytest.mark.timeout(60)

BrokerFactory = Callable[..., MosquittoBroker]

WAIT = 5.0  # seconds any single broker interaction may take


class PahoClient:
    """A connected paho client whose callbacks only hand results to events and queues."""

    def __init__(
        self,
        server: MosquittoBroker | EmbeddedBroker,
        *,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        client_id: str = "",
        persistent: bool = False,
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else not persistent,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.acks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put((rc, props))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.put((mid, rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(mid)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        kwargs: dict[str, Any] = {}
        if protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = not persistent
            if persistent:
                props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
                kwargs["properties"] = props
        self.client.connect(server.host, server.port, keepalive=30, **kwargs)
        self.client.loop_start()
        rc, self.connack_properties = self.connack.get(timeout=WAIT)
        assert not rc.is_failure, f"CONNACK refused: {rc}"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""
        result, mid = self.client.subscribe(topic, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert self.subacks.get(timeout=WAIT) == mid

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        """Publish and wait for the broker's acknowledgement; return its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()
        mid, rc = self.acks.get(timeout=WAIT)
        assert mid == info.mid
        return rc

    def next_message(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        """Return the next delivered message, failing the test after timeout."""
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def connected(server: MosquittoBroker | EmbeddedBroker, **kwargs: Any) -> Iterator[PahoClient]:
    """Yield a connected PahoClient, closing it afterwards."""
    client = PahoClient(server, **kwargs)
    try:
        yield client
    finally:
        client.close()


# --- generated config ---------------------------------------------------------------


def config_lines(settings: BrokerSettings, port: int = 1883) -> list[str]:
    return render_config(settings, port=port).splitlines()


def test_config_runs_as_root_only_when_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = BrokerSettings(data_dir=tmp_path)
    monkeypatch.setattr(broker.mosquitto.os, "geteuid", lambda: 0)
    assert "user root" in config_lines(settings)
    monkeypatch.setattr(broker.mosquitto.os, "geteuid", lambda: 1000)
    assert not any(line.startswith("user ") for line in config_lines(settings))


def test_config_listener_logging_and_queue(tmp_path: Path) -> None:
    lines = config_lines(BrokerSettings(data_dir=tmp_path, host="127.0.0.1"), port=4242)
    assert lines[1:4] == [
        "per_listener_settings false",
        "listener 4242 127.0.0.1",
        "allow_anonymous true",
    ]
    assert f"log_dest file {tmp_path.resolve() / 'mosquitto.log'}" in lines
    assert {"log_type error", "log_type warning", "log_type notice"} <= set(lines)
    assert "max_queued_messages 10000" in lines


def test_config_size_limits_only_when_set(tmp_path: Path) -> None:
    default = config_lines(BrokerSettings(data_dir=tmp_path))
    assert not any(line.startswith(("message_size_limit", "max_packet_size")) for line in default)
    limited = config_lines(
        BrokerSettings(data_dir=tmp_path, message_size_limit=131072, max_packet_size=131200)
    )
    assert "message_size_limit 131072" in limited
    assert "max_packet_size 131200" in limited


def test_config_persistence(tmp_path: Path) -> None:
    on = config_lines(BrokerSettings(data_dir=tmp_path))
    assert "persistence true" in on
    assert f"persistence_location {tmp_path.resolve()}/" in on
    assert "autosave_interval 1" in on
    off = config_lines(BrokerSettings(data_dir=tmp_path, persistence=False))
    assert "persistence false" in off
    assert not any(line.startswith(("persistence_location", "autosave")) for line in off)


def test_config_auth_files_and_extra_lines(tmp_path: Path) -> None:
    settings = BrokerSettings(
        data_dir=tmp_path,
        allow_anonymous=False,
        password_file=tmp_path / "passwd",
        acl_file=tmp_path / "acl",
        extra_lines=("max_inflight_messages 40",),
    )
    lines = config_lines(settings)
    assert "allow_anonymous false" in lines
    assert f"password_file {(tmp_path / 'passwd').resolve()}" in lines
    assert f"acl_file {(tmp_path / 'acl').resolve()}" in lines
    assert lines[-1] == "max_inflight_messages 40"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 70000}, "port must be"),
        ({"max_packet_size": 10}, "max_packet_size must be"),
        ({"message_size_limit": -1}, "message_size_limit must be"),
        ({"host": ""}, "host must be"),
        ({"extra_lines": ["a"]}, "extra_lines"),
        ({"extra_lines": ("a\nb",)}, "extra_lines"),
    ],
)
def test_settings_reject_bad_values(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        BrokerSettings(data_dir=tmp_path, **overrides)


# --- Mosquitto ------------------------------------------------------------------------


def test_mosquitto_qos1_and_retained_round_trip(
    plain_broker: MosquittoBroker, topic_prefix: str
) -> None:
    assert plain_broker.running and plain_broker.kind == "mosquitto"
    assert plain_broker.mqtt_version == "5"
    with connected(plain_broker) as publisher:
        assert not publisher.publish(f"{topic_prefix}/global", b"manifest", retain=True).is_failure
        with connected(plain_broker) as subscriber:
            subscriber.subscribe(f"{topic_prefix}/#")
            retained = subscriber.next_message()
            assert (retained.topic, retained.payload, retained.retain) == (
                f"{topic_prefix}/global",
                b"manifest",
                True,
            )
            publisher.publish(f"{topic_prefix}/update/dev1", b"chunk-0")
            live = subscriber.next_message()
            assert (live.topic, live.payload, live.qos, live.retain) == (
                f"{topic_prefix}/update/dev1",
                b"chunk-0",
                1,
                False,
            )


def wait_for_autosave(server: MosquittoBroker, after: float) -> None:
    """Wait until Mosquitto has saved its database at least once after the given time."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if server.db_path.exists() and server.db_path.stat().st_mtime > after + 0.05:
            return
        time.sleep(0.05)
    pytest.fail(f"no autosave after {after}; log:\n{server.log_tail()}")


def test_sigkill_and_restart_keep_retained_messages_sessions_and_port(
    plain_broker: MosquittoBroker, topic_prefix: str
) -> None:
    device = f"{topic_prefix}-dev"
    with connected(plain_broker, client_id=device, persistent=True) as offline:
        offline.subscribe(f"{topic_prefix}/ack/dev")
    with connected(plain_broker) as publisher:
        publisher.publish(f"{topic_prefix}/global", b"v7", retain=True)
        publisher.publish(f"{topic_prefix}/ack/dev", b"accepted")
    wait_for_autosave(plain_broker, after=time.time())
    port, old_pid = plain_broker.port, plain_broker.pid

    plain_broker.kill()
    assert not plain_broker.running and plain_broker.pid is None
    plain_broker.restart()

    assert plain_broker.running and plain_broker.port == port and plain_broker.pid != old_pid
    with connected(plain_broker) as late:
        late.subscribe(f"{topic_prefix}/global")
        message = late.next_message()
        assert (message.payload, message.retain) == (b"v7", True)
    # the persistent session kept its subscription and the QoS 1 message queued while offline
    with connected(plain_broker, client_id=device, persistent=True) as back:
        assert back.next_message().payload == b"accepted"


def test_payload_over_message_size_limit_is_not_delivered(
    broker_factory: BrokerFactory, topic_prefix: str
) -> None:
    server = broker_factory(insecure=True, message_size_limit=1024)
    with (
        connected(server) as subscriber,
        connected(server, protocol=mqtt.MQTTv311) as publisher,
    ):
        subscriber.subscribe(f"{topic_prefix}/#")
        # MQTT 3.1.1: the QoS 1 flow completes normally and the broker drops the message
        publisher.publish(f"{topic_prefix}/big", b"x" * 1025)
        publisher.publish(f"{topic_prefix}/small", b"y" * 1024)
        # the small message came after the big one, so the big one is not merely late
        assert subscriber.next_message().topic == f"{topic_prefix}/small"
        assert subscriber.messages.empty()


def test_mqtt5_publish_over_message_size_limit_drops_the_paho_connection(
    broker_factory: BrokerFactory, topic_prefix: str
) -> None:
    """Mosquitto 2.0 answers with PUBACK reason 0x95, which paho 2.2 rejects as malformed.

    paho then disconnects, reconnects and resends the message forever: an MQTT 5 client must
    never publish above the limit, which is why fedmq chunks below it.
    """
    server = broker_factory(insecure=True, message_size_limit=1024)
    with connected(server) as subscriber, connected(server) as publisher:
        subscriber.subscribe(f"{topic_prefix}/#")
        publisher.client.publish(f"{topic_prefix}/big", b"x" * 2048, qos=1)
        assert publisher.disconnects.get(timeout=WAIT).is_failure
        with pytest.raises(queue.Empty):
            subscriber.next_message(timeout=0.5)


def test_connack_announces_max_packet_size(broker_factory: BrokerFactory) -> None:
    server = broker_factory(insecure=True, max_packet_size=4096)
    with connected(server) as client:
        assert getattr(client.connack_properties, "MaximumPacketSize", None) == 4096
    with connected(broker_factory(insecure=True)) as unlimited:
        # paho only sets the attribute when the property is present
        assert not hasattr(unlimited.connack_properties, "MaximumPacketSize")


def test_start_failure_reports_the_log(broker_factory: BrokerFactory) -> None:
    with pytest.raises(RuntimeError, match="bogus_option"):
        broker_factory(insecure=True, extra_lines=("bogus_option 1",))


def test_context_manager_stops_and_fixed_port_is_used(tmp_path: Path) -> None:
    port = free_port()
    server = MosquittoBroker(settings=BrokerSettings(data_dir=tmp_path, port=port))
    with server:
        assert server.running and server.port == port
    assert not server.running


# --- launcher and embedded broker -----------------------------------------------------


def test_auto_picks_mosquitto_when_installed(tmp_path: Path) -> None:
    server = start_broker(data_dir=tmp_path)
    try:
        assert isinstance(server, MosquittoBroker) and server.running
    finally:
        server.stop()


def test_forced_mosquitto_without_it_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.launch, "mosquitto_path", lambda: None)
    with pytest.raises(RuntimeError, match="apt-get install mosquitto, or use --broker embedded"):
        start_broker(prefer="mosquitto", data_dir=tmp_path)


def test_unknown_broker_choice_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auto, mosquitto, embedded"):
        start_broker(prefer="hivemq", data_dir=tmp_path)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    server = start_broker(prefer="embedded", data_dir=tmp_path / "embedded")
    assert isinstance(server, EmbeddedBroker)
    yield server
    server.stop()


def test_embedded_round_trip_mqtt311(embedded: EmbeddedBroker, topic_prefix: str) -> None:
    assert embedded.kind == "embedded (amqtt)" and embedded.mqtt_version == "3.1.1"
    big = bytes(range(256)) * 1200  # ~300 KB: larger than many managed brokers allow
    v311 = {"protocol": mqtt.MQTTv311}
    with connected(embedded, **v311) as publisher:
        publisher.publish(f"{topic_prefix}/global", b"manifest", retain=True)
        with connected(embedded, **v311) as subscriber:
            subscriber.subscribe(f"{topic_prefix}/#")
            retained = subscriber.next_message()
            assert (retained.topic, retained.payload, retained.retain) == (
                f"{topic_prefix}/global",
                b"manifest",
                True,
            )
            publisher.publish(f"{topic_prefix}/update/dev1", big)
            live = subscriber.next_message()
            assert (live.payload, live.qos) == (big, 1)


def test_embedded_queues_qos1_for_offline_persistent_session_and_keeps_port(
    embedded: EmbeddedBroker, topic_prefix: str
) -> None:
    device = f"{topic_prefix}-dev"
    v311 = {"protocol": mqtt.MQTTv311}
    with connected(embedded, client_id=device, persistent=True, **v311) as offline:
        offline.subscribe(f"{topic_prefix}/ack/dev")
    with connected(embedded, **v311) as publisher:
        publisher.publish(f"{topic_prefix}/ack/dev", b"accepted")
    with connected(embedded, client_id=device, persistent=True, **v311) as back:
        assert back.next_message().payload == b"accepted"
    port = embedded.port
    embedded.kill()
    embedded.restart()
    assert embedded.running and embedded.port == port

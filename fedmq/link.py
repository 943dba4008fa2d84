"""The one MQTT connection both shells use: paho in, our own event types out.

paho re-raises exceptions from callbacks into its network loop, so the callbacks here do
nothing but turn what arrived into a small immutable event and put it on a bounded
queue; the shell's own loop does the work. Subscriptions are (re)made in on_connect, so
a reconnect renews them. paho lives here (it is a core dependency of every install) so
that neither shell repeats connection, Will, session and packet-size handling.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.chunks import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger("fedmq.link")

MQTT_VERSIONS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# Bytes of a PUBLISH packet that are not payload: fixed header, topic, packet id, properties.
PUBLISH_OVERHEAD = 64
# Reconnect backoff: paho waits min_delay after a lost connection and doubles the wait per
# failed attempt up to max_delay, with no jitter, so a fleet that lost its broker would
# come back in lockstep. Each client therefore scales the whole schedule by its own factor
# in [1, 2) (reconnect_delays): a thousand devices spread their first attempt over 1-2 s,
# the next over 2-4 s, and so on, and retry at the cap every 15-30 s, each with a period
# of its own, so they drift apart instead of hitting a restarted broker together.
RECONNECT_MIN_DELAY_S = 1.0
RECONNECT_MAX_DELAY_S = 15.0


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to speak to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    mqtt_version: str = "5"
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    # TLS: the CA that signed the broker's certificate; with cert_file/key_file this client
    # authenticates with its own certificate (mTLS, certificate CN = device id)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.mqtt_version not in MQTT_VERSIONS:
            raise ValueError(
                f"mqtt_version must be one of {sorted(MQTT_VERSIONS)}, got {self.mqtt_version!r}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port must be 1-65535, got {self.port}")
        if self.keepalive < 5:
            raise ValueError(f"keepalive must be at least 5 seconds, got {self.keepalive}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: a client certificate, its key")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("a client certificate needs ca_file (the broker's CA) as well")

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


def require_credentials(address: BrokerAddress, *, insecure: bool, bundle: str) -> None:
    """ValueError unless the connection authenticates (TLS files or a user name) or the
    operator asked for plain MQTT; bundle says where this role's credentials come from."""
    if not insecure and address.ca_file is None and address.username is None:
        raise ValueError(
            f"no broker credentials: give ca_file, cert_file and key_file ({bundle}) or, on a "
            "network you trust, --insecure"
        )


@dataclass(frozen=True)
class Connected:
    """The broker accepted the connection."""

    session_present: bool
    max_packet_size: int | None  # from CONNACK (MQTT 5), None when the broker sent none


@dataclass(frozen=True)
class Disconnected:
    """The connection dropped; paho reconnects with backoff by itself."""

    reason: str


@dataclass(frozen=True)
class Message:
    """One PUBLISH that arrived."""

    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0


Event = Connected | Disconnected | Message


def reconnect_delays(client_id: str) -> tuple[float, float]:
    """(min, max) reconnect delay for this client: 1 s and 15 s scaled by a jitter in [1, 2)."""
    # seeded by the client id (random.Random hashes a str seed with SHA-512, the same in
    # every process): a device always backs off the same way, different devices differently
    factor = random.Random(client_id).uniform(1.0, 2.0)
    return RECONNECT_MIN_DELAY_S * factor, RECONNECT_MAX_DELAY_S * factor


class Link:
    """A paho client with a Will, a persistent session, renewed subscriptions and an inbox."""

    def __init__(
        self,
        *,
        client_id: str,
        address: BrokerAddress,
        subscriptions: Iterable[tuple[str, int]] = (),
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        session_expiry_s: int = 3600,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        inbox_size: int = 10000,
        manual_ack: bool = False,
        receive_maximum: int = 128,
    ) -> None:
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        self.client_id = client_id
        self.address = address
        self.inbox: Inbox = Inbox(maxsize=inbox_size)
        self.configured_max_message_bytes = max_message_bytes
        self.broker_max_packet_size: int | None = None
        self.dropped_events = 0
        # why the last connection attempt failed, for people ("" until one failed), and
        # how many have failed (an outage with failed attempts was the broker's)
        self.last_error = ""
        self.connect_failures = 0
        self._in_flight: list[mqtt.MQTTMessageInfo] = []
        self._manual_ack = manual_ack
        self.receive_maximum = receive_maximum
        self._subs: dict[str, int] = dict(subscriptions)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        protocol = MQTT_VERSIONS[address.mqtt_version]
        self._v5 = protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            # MQTT 3.1.1 only; MQTT 5 says clean start at connect time
            clean_session=None if self._v5 else not persistent,
            # with manual_ack the PUBACK goes out only after the shell called ack(): a QoS 1
            # message the shell had not handled when it crashed is redelivered
            manual_ack=manual_ack,
        )
        min_delay, max_delay = reconnect_delays(client_id)
        self.client.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)  # type: ignore[arg-type]
        self.client.max_inflight_messages_set(64)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.ca_file is not None:
            self.client.tls_set(
                ca_certs=str(address.ca_file),
                certfile=str(address.cert_file) if address.cert_file else None,
                keyfile=str(address.key_file) if address.key_file else None,
            )
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self._persistent = persistent
        self._session_expiry_s = session_expiry_s
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_socket_open = _no_delay

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff until stop()."""
        props = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            if self._manual_ack:  # unacknowledged messages the broker may have in flight
                props.ReceiveMaximum = self.receive_maximum
            if self._persistent:
                props.SessionExpiryInterval = self._session_expiry_s
                clean_start = False
            else:
                clean_start = True
        self.client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self.address.keepalive,
            clean_start=clean_start,
            properties=props,
        )
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or timeout; True when connected."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, final: tuple[str, bytes] | None = None, flush_s: float = 10.0) -> None:
        """Publish a last retained message (e.g. offline state), let queued QoS 1 messages
        reach the broker (up to flush_s), then disconnect and stop the loop."""
        if final is not None and self.connected:
            self.publish(final[0], final[1], qos=1, retain=True)
        deadline = time.monotonic() + flush_s
        with self._lock:
            pending = list(self._in_flight)
        for info in pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self.connected:
                break
            if not _settled(info):
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=left)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------ use

    @property
    def max_message_bytes(self) -> int:
        """Largest payload we may publish: configured, capped by the broker's CONNACK."""
        limit = self.configured_max_message_bytes
        if self.broker_max_packet_size:
            limit = min(limit, self.broker_max_packet_size - PUBLISH_OVERHEAD - 256)
        return limit

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""
        with self._lock:
            self._subs[topic] = qos
        if self.connected:
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Stop a subscription and do not renew it."""
        with self._lock:
            present = self._subs.pop(topic, None) is not None
        if present and self.connected:
            self.client.unsubscribe(topic)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Publish; with QoS 1 paho keeps the message and sends it once reconnected."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            with self._lock:
                self._in_flight = [i for i in self._in_flight if not _settled(i)]
                self._in_flight.append(info)
        return info

    def ack(self, msg: Message) -> None:
        """Acknowledge a handled QoS 1 message (only with manual_ack=True)."""
        if msg.qos > 0 and self._manual_ack:
            self.client.ack(msg.mid, msg.qos)

    def next_event(self, timeout: float) -> Event | None:
        """The next event from the network thread, or None after timeout."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def next_events(self, timeout: float, *, max_events: int = 256) -> list[Event]:
        """Every event waiting (up to max_events), waiting up to timeout for the first."""
        first = self.next_event(timeout)
        if first is None:
            return []
        events = [first]
        while len(events) < max_events:
            try:
                events.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return events

    # ------------------------------------------------------------ paho callbacks

    def _put(self, event: Event) -> None:
        # never block paho's network thread. With manual_ack, a QoS 1 message is not lost
        # by queueing it: the broker sends at most `receive_maximum` unacknowledged ones
        # (MQTT 5 Receive Maximum; Mosquitto's max_inflight_messages under 3.1.1), which
        # bounds the inbox, and holds back the rest until we acknowledge: back-pressure
        # that keeps its redelivery guarantee. Anything else is dropped when full, counted.
        if isinstance(event, Message) and event.qos > 0 and self._manual_ack:
            self.inbox.queue_unbounded(event)
            return
        try:
            self.inbox.put_nowait(event)
        except queue.Full:
            self.dropped_events += 1
            log.error("%s: inbox full, dropped %s", self.client_id, type(event).__name__)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            self.last_error = f"the broker refused the connection: {reason_code}"
            self.connect_failures += 1
            return
        size = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.broker_max_packet_size = int(size) if size else None
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        self._connected.set()
        self._put(Connected(bool(flags.session_present), self.broker_max_packet_size))

    def _on_connect_fail(self, client, userdata) -> None:  # noqa: ANN001
        # paho calls this from inside its `except OSError` around the connect: the error
        # (refused, unknown host, TLS handshake) is the one being handled
        err = sys.exc_info()[1]
        self.connect_failures += 1
        self.last_error = _describe(err) if err is not None else "the connection failed"
        if self.address.tls and isinstance(err, (ConnectionResetError, ssl.SSLError)):
            self.last_error = (f"TLS handshake failed ({self.last_error}): is port "
                               f"{self.address.port} the broker's TLS listener, and ca_file "
                               "the CA that signed its certificate?")  # fmt: skip

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        self._put(Disconnected(str(reason_code)))

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        self._put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos))


class Inbox(queue.Queue["Event"]):
    """A bounded queue that can also take an item past its bound (for flow-controlled
    messages, which the broker already bounds)."""

    def queue_unbounded(self, item: Event) -> None:
        """Add item without blocking, whatever the bound."""
        with self.mutex:
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    """Send each packet at once (TCP_NODELAY). Over TLS a large packet leaves as several
    records, one write each; with Nagle's algorithm the second waits for the ACK of the
    first, which the receiver delays by up to 40 ms: measured, +80 ms on a 0.26 s round."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


def _describe(err: BaseException) -> str:
    """An OSError from connecting, for people: 'connection refused', not '[Errno 111] ...'."""
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror})"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err).lower().replace("_", " ")
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower() if err.strerror[0].isupper() else err.strerror
    return str(err) or type(err).__name__


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """True once the broker acknowledged the message, or paho gave up tracking it."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # published while disconnected: paho resends it
        return True

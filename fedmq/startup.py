"""What a service tells its operator about the broker connection, and when it gives up.

`BrokerWatch` is pure (time comes in as `now`): the shells feed it the link's Connected and
Disconnected events and a tick, and log the lines it returns. It says

- while the first connection has not come: "still no broker at host:port after 10 s:
  <why>" at 10, 30 and 60 s, then every 5 minutes; after connect_timeout_s it gives up
  (FatalError, exit 4);
- when a connection is lost: at once, then at growing intervals while paho keeps retrying
  (10 s, 30 s, 60 s, then every 5 minutes), and when it is back, after how long;
- when another client connects with this one's identity (two agents with one device id):
  the broker hands the session to the newcomer and drops the old connection; an MQTT 5
  broker may say why ("Session taken over", 0x8E), Mosquitto 2.0 and MQTT 3.1.1 brokers
  just drop it. The old one reconnects after its backoff (1-2 s) and takes the session
  back, and so on. A client taken over within TAKEOVER_WINDOW_S of connecting, or dropped
  that fast SHORT_CONNECTIONS times in a row with the broker up all along (every reconnect
  succeeded at once: a broker that crashes refuses some), is the newcomer and
  gives up (FatalError, exit 6); the one that was there first is dropped once, reconnects
  and keeps running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmq.cli_errors import EXIT_IDENTITY_IN_USE, EXIT_NO_BROKER, FatalError

REPORT_AFTER_S = (10.0, 30.0, 60.0)  # then every REPORT_EVERY_S
REPORT_EVERY_S = 300.0
TAKEOVER_WINDOW_S = 5.0
SHORT_CONNECTIONS = 3
SESSION_TAKEN_OVER = "Session taken over"  # MQTT 5 reason code 0x8E, as paho names it


def report_due(elapsed: float, reported: int) -> bool:
    """Whether the next report (reports made so far: `reported`) is due after elapsed s."""
    if reported < len(REPORT_AFTER_S):
        return elapsed >= REPORT_AFTER_S[reported]
    extra = reported - len(REPORT_AFTER_S) + 1
    return elapsed >= REPORT_AFTER_S[-1] + extra * REPORT_EVERY_S


def duration(seconds: float) -> str:
    """A wait for people: '42 s', '5 min', '1 h 5 min'."""
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


@dataclass
class BrokerWatch:
    """The connection's story for the operator; methods return the lines to log."""

    where: str  # host:port
    identity: str  # who this client is, for people: "device d3", "the aggregator of job t"
    connect_timeout_s: float
    started: float
    v5: bool = True
    connected_at: float | None = None  # the current connection, None while down
    lost_at: float | None = None  # when the current outage began, None while up
    ever_connected: bool = False
    reported: int = 0  # reports made about the current wait
    short_in_a_row: int = 0
    last_reason: str = ""

    def connected(self, now: float, *, failed_attempts: int = 0) -> list[str]:
        """A connection came up; a line when it ends an outage. failed_attempts: connects
        that failed during the outage: the broker was down, nobody took this one's place."""
        out = []
        if failed_attempts:
            self.short_in_a_row = 0
        if self.lost_at is not None:
            out.append(f"broker at {self.where} is back after {duration(now - self.lost_at)}")
        self.connected_at, self.lost_at, self.reported = now, None, 0
        self.ever_connected = True
        return out

    def disconnected(self, reason: str, now: float) -> list[str]:
        """The connection dropped; FatalError when it was taken over by a newer client of
        this identity (or, under 3.1.1, keeps dropping right after connecting)."""
        age = now - self.connected_at if self.connected_at is not None else None
        self.connected_at, self.last_reason, self.reported = None, reason, 0
        if self.lost_at is None:
            self.lost_at = now
        short = age is not None and age < TAKEOVER_WINDOW_S
        self.short_in_a_row = self.short_in_a_row + 1 if short else 0
        fix = f"give every client its own identity; this one ({self.identity}) stops"
        if reason == SESSION_TAKEN_OVER:
            if short:
                raise FatalError(
                    f"another client is connected to {self.where} as {self.identity}: the "
                    f"broker gave it this session ({SESSION_TAKEN_OVER}); {fix}",
                    exit_code=EXIT_IDENTITY_IN_USE,
                )
            return [f"another client connected to {self.where} as {self.identity} and took "
                    "over this session; reconnecting (the newcomer should stop)"]  # fmt: skip
        if self.short_in_a_row >= SHORT_CONNECTIONS:
            raise FatalError(
                f"the broker at {self.where} dropped this connection right after accepting "
                f"it {self.short_in_a_row} times in a row ({reason}): another client is "
                f"probably connected as {self.identity}; {fix}",
                exit_code=EXIT_IDENTITY_IN_USE,
            )
        return [f"broker connection lost ({reason}); reconnecting to {self.where}"]

    def tick(self, now: float, why: str = "") -> list[str]:
        """Progress while there is no connection; FatalError once the first connection
        has not come within connect_timeout_s. why: the last reason paho gave."""
        if self.connected_at is not None:
            return []
        why = why or self.last_reason or "no answer"
        if not self.ever_connected:
            waited = now - self.started
            if self.connect_timeout_s and waited >= self.connect_timeout_s:
                raise FatalError(
                    f"no broker at {self.where} after {duration(waited)}: {why}; check that "
                    "the broker runs, the host and port, and the TLS settings "
                    "(connect_timeout_s waits longer)",
                    exit_code=EXIT_NO_BROKER,
                )
            if report_due(waited, self.reported):
                self.reported += 1
                return [f"still no broker at {self.where} after {duration(waited)}: {why}"]
            return []
        assert self.lost_at is not None
        if report_due(now - self.lost_at, self.reported):
            self.reported += 1
            return [f"still no broker at {self.where}, {duration(now - self.lost_at)} after "
                    f"losing it: {why}; retrying"]  # fmt: skip
        return []


class LinkWatch:
    """A BrokerWatch on one Link, logging what it says (the shells' adapter)."""

    def __init__(self, *, link: Any, identity: str, connect_timeout_s: float,
                 log: logging.Logger | logging.LoggerAdapter[Any]) -> None:  # fmt: skip
        a = link.address
        self.link = link
        self.log = log
        self.failures_at_loss = 0
        self.watch = BrokerWatch(where=f"{a.host}:{a.port}", identity=identity,
                                 connect_timeout_s=connect_timeout_s, started=time.monotonic(),
                                 v5=a.mqtt_version == "5")  # fmt: skip

    def on_event(self, event: Any) -> None:
        """Feed a link event (Connected / Disconnected; others are ignored)."""
        from fedmq.link import Connected, Disconnected

        now, failures = time.monotonic(), self.link.connect_failures
        if isinstance(event, Connected):
            lines = self.watch.connected(now, failed_attempts=failures - self.failures_at_loss)
            level = logging.INFO
        elif isinstance(event, Disconnected):
            self.failures_at_loss = failures
            lines, level = self.watch.disconnected(event.reason, now), logging.WARNING
        else:
            return
        for line in lines:
            self.log.log(level, "%s", line)

    def tick(self) -> None:
        """Report a long wait; FatalError when the first connection never came."""
        for line in self.watch.tick(time.monotonic(), self.link.last_error):
            self.log.warning("%s", line)

    def wait_connected(self, stop: Any = None, poll_s: float = 0.2,
                       on_give_up: Callable[[], None] | None = None) -> bool:  # fmt: skip
        """Block until the first connection (True), or stop is set (False); progress lines
        meanwhile, FatalError after connect_timeout_s; the link is stopped unless it
        connected, and on_give_up called. The Connected event stays queued for the loop."""
        self.watch.started = time.monotonic()  # the wait starts now, not at construction
        try:
            while not self.link.wait_connected(poll_s):
                if stop is not None and stop.is_set():
                    self._give_up(on_give_up)
                    return False
                self.tick()
        except FatalError:
            self._give_up(on_give_up)
            raise
        self.watch.connected(time.monotonic())
        return True

    def _give_up(self, also: Callable[[], None] | None) -> None:
        self.link.stop(flush_s=0)
        if also is not None:
            also()


def preflight_agent(settings: Any) -> Any:
    """The agent's checks before it starts anything: a usable state directory and the
    package it needs (onnxruntime for inference only; torch is imported as it starts).
    Returns settings; FatalError (exit 5) naming the fix otherwise."""
    from fedmq.cli_errors import check_state_dir, require
    from firmware_profiles import load_profile

    check_state_dir(settings.state_dir / settings.device_id, what="the agent's state directory")
    if settings.infer_only or not load_profile(settings.profile).can_train:
        require("onnxruntime")
    return settings


def preflight_aggregator(settings: Any) -> Any:
    """The aggregator's checks before it starts anything: a usable state directory."""
    from fedmq.cli_errors import check_state_dir

    check_state_dir(settings.state_dir, what="the aggregator's state directory")
    return settings

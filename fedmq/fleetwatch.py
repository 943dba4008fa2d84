"""The shells of `fedmq status` and `fedmq monitor`: one throw-away, read-only MQTT
session (MQTT 5 or 3.1.1, TLS, credentials: the settings of `fedmq status`) feeding a
FleetState, then text (fedmq.statusview) or a live screen (fedmq.monitor)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from fedmq.fleetstate import FleetState
from fedmq.link import Connected, Disconnected, Link, Message
from fedmq.topics import Topics

EXIT_OK, EXIT_NO_STATUS, EXIT_CONFIG, EXIT_NO_BROKER = 0, 1, 2, 4
QUIET_S = 0.3  # after the status: how long more retained messages may still be arriving
REDRAW_S = 0.25


def open_link(settings: Any, topics: Topics, *, devices: bool, states: bool,
              tag: str) -> Link:  # fmt: skip
    """A started, non-persistent session subscribed to what the view reads.

    The status comes last: Mosquitto sends a subscription's retained messages in the order
    of the filters, so once the status is there the fleet mirror has arrived too."""
    subs = []
    if devices:
        subs.append((topics.fleet_filter(), 1))
    if states:
        subs += [(topics.device_states_filter(), 1), (topics.round(), 1)]
    subs.append((topics.status(), 1))
    link = Link(client_id=f"fedmq-{tag}-{os.getpid()}", address=settings.address,
                subscriptions=subs, persistent=False)  # fmt: skip
    link.start()
    return link


def _connected(link: Link, settings: Any) -> bool:
    """Whether the session came up within the timeout; else the one line saying so."""
    if link.wait_connected(settings.timeout):
        return True
    print(f"fedmq: no broker at {settings.host}:{settings.port} after {settings.timeout:g} s",
          file=sys.stderr)  # fmt: skip
    return False


def _feed(state: FleetState, events: list[Any], now: float) -> tuple[bool, bool | None]:
    """Take events; (anything changed, connected now or None when unchanged)."""
    changed, connected = False, None
    for event in events:
        if isinstance(event, Message):
            changed |= state.on_message(event.topic, event.payload, retained=event.retain,
                                        now=now)  # fmt: skip
        elif isinstance(event, Connected):
            connected = True
        elif isinstance(event, Disconnected):
            connected = False
    return changed, connected


def run_status(settings: Any, *, as_json: bool, devices: bool, watch: bool,
               out: TextIO = sys.stdout) -> int:  # fmt: skip
    """`fedmq status`: print the job's status (and devices) once, or on every change."""
    from fedmq.statusview import render_json, render_text

    topics = Topics(job=settings.job, prefix=settings.prefix)
    state = FleetState(topics=topics)
    link = open_link(settings, topics, devices=devices, states=False, tag="status")
    try:
        if not _connected(link, settings):
            return EXIT_NO_BROKER
        deadline = time.monotonic() + settings.timeout
        while state.status is None and time.monotonic() < deadline:
            _feed(state, link.next_events(min(0.2, settings.timeout)), time.time())
        quiet_until = time.monotonic() + QUIET_S  # anything retained still on its way
        while time.monotonic() < quiet_until and state.status is not None:
            if _feed(state, link.next_events(0.05), time.time())[0]:
                quiet_until = time.monotonic() + QUIET_S
        if state.status is None and not watch:
            print(f"fedmq: no status for job {settings.job!r} under prefix "
                  f"{settings.prefix!r} after {settings.timeout:g} s", file=sys.stderr)  # fmt: skip
            return EXIT_NO_STATUS

        def show() -> None:
            if as_json:
                print(render_json(state, devices=devices, compact=watch), file=out, flush=True)
            else:
                if watch:
                    print(f"--- {time.strftime('%H:%M:%S UTC', time.gmtime())}", file=out)
                print(render_text(state, time.time(), devices=devices), file=out, flush=True)

        if state.status is not None:
            show()
        if not watch:
            return EXIT_OK
        try:
            while True:
                changed, connected = _feed(state, link.next_events(1.0), time.time())
                if connected is False:
                    print("fedmq: broker connection lost; reconnecting", file=sys.stderr)
                if changed and state.status is not None:
                    # one print for a burst of changes
                    while (more := link.next_events(0.2)):
                        _feed(state, more, time.time())
                    show()
        except KeyboardInterrupt:
            return EXIT_OK
    finally:
        link.stop(flush_s=0)


def run_monitor(settings: Any) -> int:
    """`fedmq monitor`: a live view of the job until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    from fedmq.monitor import render

    console = Console()
    if not console.is_terminal:  # a live screen in a pipe or a file is nothing to read
        print("fedmq: fedmq monitor needs a terminal; for a log of changes use fedmq status "
              "--watch (--json for one document a line)", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    topics = Topics(job=settings.job, prefix=settings.prefix)
    state = FleetState(topics=topics)
    link = open_link(settings, topics, devices=True, states=True, tag="monitor")
    try:
        if not _connected(link, settings):
            return EXIT_NO_BROKER
        connected = True

        def frame() -> Any:
            return render(state, time.time(), height=console.size.height, connected=connected)

        with Live(frame(), console=console, screen=True, auto_refresh=False,
                  redirect_stderr=False) as live:  # fmt: skip
            drawn = 0.0
            while True:
                _, now_connected = _feed(state, link.next_events(0.25), time.time())
                if now_connected is not None:
                    connected = now_connected
                if time.monotonic() - drawn >= REDRAW_S:  # a busy fleet: at most 4 frames/s
                    live.update(frame(), refresh=True)
                    drawn = time.monotonic()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        link.stop(flush_s=0)

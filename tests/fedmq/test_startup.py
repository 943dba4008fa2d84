"""What a service says about its broker connection, and when it gives up (pure: no broker,
time passed in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.cli_errors import EXIT_IDENTITY_IN_USE, EXIT_NO_BROKER, FatalError
from fedmq.startup import (
    SESSION_TAKEN_OVER,
    TAKEOVER_WINDOW_S,
    BrokerWatch,
    duration,
    report_due,
)


def _watch(v5: bool = True, timeout: float = 60.0) -> BrokerWatch:
    return BrokerWatch(where="mqtt.lan:8883", identity="device d3", connect_timeout_s=timeout,
                       started=0.0, v5=v5)  # fmt: skip


def _reports(w: BrokerWatch, until: float, why: str = "connection refused") -> list[str]:
    return [line for t in range(int(until) + 1) for line in w.tick(float(t), why)]


def test_reports_grow_apart_10_30_60_s_then_every_5_minutes() -> None:
    times, reported = [], 0
    for t in range(0, 1000):
        if report_due(float(t), reported):
            times.append(t)
            reported += 1
    assert times == [10, 30, 60, 360, 660, 960]
    assert (duration(42), duration(300), duration(3900)) == ("42 s", "5 min", "1 h 5 min")


def test_first_connection_progress_then_exit_4_with_the_reason() -> None:
    w = _watch()
    lines = _reports(w, 59)
    assert lines == ["still no broker at mqtt.lan:8883 after 10 s: connection refused",
                     "still no broker at mqtt.lan:8883 after 30 s: connection refused"]
    with pytest.raises(FatalError) as err:
        w.tick(60.0, "connection refused")
    assert err.value.exit_code == EXIT_NO_BROKER
    assert err.value.message.startswith("no broker at mqtt.lan:8883 after 60 s: connection "
                                        "refused")  # fmt: skip
    forever = _watch(timeout=0)  # 0: wait for ever, still saying so
    assert len(_reports(forever, 3600)) == 3 + 11


def test_a_lost_broker_is_retried_for_ever_and_reported_until_it_is_back() -> None:
    w = _watch()
    w.connected(1.0)
    assert w.disconnected("Unspecified error", 100.0) == [
        "broker connection lost (Unspecified error); reconnecting to mqtt.lan:8883"]
    lines = [line for t in range(100, 100 + 4000) for line in w.tick(float(t))]
    assert len(lines) == 3 + 13 and "10 s after losing it: Unspecified error" in lines[0]
    assert w.connected(4200.0) == ["broker at mqtt.lan:8883 is back after 1 h 8 min"]
    assert w.tick(9999.0) == []


def test_a_session_taken_over_right_after_connecting_means_another_client_has_the_id() -> None:
    first = _watch()
    first.connected(0.0)
    # the newcomer connected: the one that was there long enough reconnects and stays
    assert "took over this session" in first.disconnected(SESSION_TAKEN_OVER, 600.0)[0]
    newcomer = _watch()
    newcomer.connected(600.0)
    with pytest.raises(FatalError) as err:  # ... and takes the session back: it stops
        newcomer.disconnected(SESSION_TAKEN_OVER, 601.5)
    assert err.value.exit_code == EXIT_IDENTITY_IN_USE
    assert "another client is connected to mqtt.lan:8883 as device d3" in err.value.message


def test_three_connections_dropped_at_once_mean_another_client_has_the_id() -> None:
    # Mosquitto 2.0 and MQTT 3.1.1 brokers do not say why they drop the old connection
    for v5 in (False, True):
        w = _watch(v5=v5)
        w.connected(0.0)
        w.disconnected("Unspecified error", 500.0)  # a long connection: a broker restart
        for t in (502.0, 505.0):
            w.connected(t)
            w.disconnected("Unspecified error", t + 1.0)
        w.connected(510.0)
        with pytest.raises(FatalError, match="dropped this connection right after accepting "
                                             "it 3 times in a row") as err:  # fmt: skip
            w.disconnected("Unspecified error", 511.0)
        assert err.value.exit_code == EXIT_IDENTITY_IN_USE
    crashing = _watch()  # a broker that crashes right after each connect refuses some
    for t in (0.0, 10.0, 20.0, 30.0):
        crashing.connected(t, failed_attempts=1 if t else 0)
        crashing.disconnected("Unspecified error", t + 1.0)
    patient = _watch()  # connections that lasted a while are no verdict, however many
    for t in (0.0, 10.0, 20.0, 30.0):
        patient.connected(t)
        patient.disconnected("Unspecified error", t + TAKEOVER_WINDOW_S + 1)


def test_a_missing_package_names_its_extra_and_the_pip_command(tmp_path: Path) -> None:
    from fedmq.cli_errors import EXIT_NOT_READY, install_command, missing_package

    try:
        try:
            import torch_not_here  # type: ignore[import-not-found]  # noqa: F401
        except ModuleNotFoundError as err:  # as fedmq.tasks re-raises it, with a cause
            err.name = "torch.nn"
            raise ImportError("building a model needs torch") from err
    except ImportError as outer:
        fatal = missing_package(outer)
    assert fatal is not None and fatal.exit_code == EXIT_NOT_READY
    assert fatal.message.startswith("torch is not installed (it comes with fedmq's 'train' ")
    assert missing_package(ImportError("cannot import name 'x' from 'y'")) is None  # a bug
    # from a checkout: its own path; from a wheel: the wheel, with the constraints for torch
    (tmp_path / "pyproject.toml").write_text("")
    assert install_command("infer", tmp_path) == f"pip install -e '{tmp_path}[infer]'"
    from_wheel = install_command("train", tmp_path / "elsewhere")
    assert from_wheel.startswith("pip install -c constraints.txt 'fedmq-")

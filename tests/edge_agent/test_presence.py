"""The reason a device gives on its state topic: optional on the wire, and capped."""

from __future__ import annotations

import msgpack
import pytest

from fedmq.errors import SchemaError
from fedmq.wire import DeviceState, decode_state, encode_state
from fedmq.wire.presence import MAX_REASON_CHARS


def test_the_reason_round_trips_and_is_optional_for_older_agents() -> None:
    s = DeviceState("d1", "online", "j", "rpi4", "0.1.0", 400, 3, 12.5,
                    reason="global version 4 is for task 'x'")  # fmt: skip
    assert decode_state(encode_state(s)) == s
    older = msgpack.unpackb(encode_state(DeviceState("d1", "online")))
    del older["reason"]  # what an agent without the field sends
    assert decode_state(msgpack.packb(older)).reason == ""


def test_a_reason_over_the_cap_is_cut_when_sent_and_refused_when_received() -> None:
    long = DeviceState("d1", "online", reason="x" * (MAX_REASON_CHARS + 10))
    assert len(decode_state(encode_state(long)).reason) == MAX_REASON_CHARS
    raw = msgpack.unpackb(encode_state(DeviceState("d1", "online")))
    raw["reason"] = "x" * (MAX_REASON_CHARS + 1)
    with pytest.raises(SchemaError, match="reason"):
        decode_state(msgpack.packb(raw))
    raw["reason"] = 7
    with pytest.raises(SchemaError):
        decode_state(msgpack.packb(raw))


def test_readiness_fields_round_trip_and_older_agents_count_as_ready() -> None:
    hot = DeviceState("d1", "online", "j", "rpi4", not_ready="thermal: 83.0 C", ready=False,
                      temp_c=83.0, battery_pct=55.0, declined=4)  # fmt: skip
    assert decode_state(encode_state(hot)) == hot
    older = msgpack.unpackb(encode_state(DeviceState("d1", "online")))
    for key in ("ready", "not_ready"):
        del older[key]  # what an agent without readiness sends
    assert "temp_c" not in older and "declined" not in older  # unknown: not sent
    got = decode_state(msgpack.packb(older))
    assert got.ready and got.not_ready == "" and got.temp_c is None and got.declined == 0


@pytest.mark.parametrize(("key", "value"), [
    ("temp_c", 1e9), ("temp_c", float("nan")), ("temp_c", "hot"), ("battery_pct", 101.0),
    ("battery_pct", -1), ("declined", -3), ("declined", 2.5), ("ready", 1),
    ("not_ready", "x" * (MAX_REASON_CHARS + 1)),
])  # fmt: skip
def test_hostile_readiness_values_are_refused(key: str, value: object) -> None:
    raw = msgpack.unpackb(encode_state(DeviceState("d1", "online")))
    raw[key] = value
    with pytest.raises(SchemaError):
        decode_state(msgpack.packb(raw))

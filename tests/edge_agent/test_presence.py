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

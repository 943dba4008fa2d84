"""The topic tree: names built in one place, parsed back, wildcards refused."""

from __future__ import annotations

import pytest

from fedmq.topics import Topics


def test_tree_and_parse() -> None:
    t = Topics(job="j1", prefix="site/fedmq")
    assert t.global_manifest() == "site/fedmq/j1/global"
    assert t.global_chunk(4, 2) == "site/fedmq/j1/global/4/2"
    assert t.device_state("pi-1") == "site/fedmq/devices/pi-1/state"
    assert t.updates_filter("workers") == "$share/workers/site/fedmq/j1/update/+"
    cases = {
        t.update("pi-1"): ("update", "pi-1"), t.ack("pi-1"): ("ack", "pi-1"),
        t.metrics("pi-1"): ("metrics", "pi-1"), t.fleet_device("pi-1"): ("fleet", "pi-1"),
        t.device_state("pi-1"): ("state", "pi-1"),
        t.round(): ("round", None), t.status(): ("status", None),
        t.global_manifest(): ("global", None), t.global_chunk(1, 0): ("global_chunk", None),
        "site/fedmq/j1/update/a/b": (None, None), "other/j1/round": (None, None),
    }  # fmt: skip
    for topic, (kind, device) in cases.items():
        assert (t.kind_of(topic), t.device_of(topic)) == (kind, device), topic


@pytest.mark.parametrize("bad", ["+", "#", "a/b", "", "x" * 65, "sp ace"])
def test_names_are_single_safe_levels(bad: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        Topics(job="j").update(bad)
    with pytest.raises(ValueError):
        Topics(job=bad)

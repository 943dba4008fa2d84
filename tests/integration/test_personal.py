"""Personal models never leave the device: a fedper fleet through a real Mosquitto, every
update that crossed the broker decoded and checked for the head, the aggregator's model
checked for any trace of it, and the per-round accuracy distributions in the history."""

from __future__ import annotations

import numpy as np

from aggregator.store import Store
from edge_agent.state import DeviceStore
from fedmq.codecs import decode_tensors
from fedmq.tasks import get_task
from fedmq.tasks.weights import get_weights
from fedmq.wire import decode_weights, specs_of
from tests.integration.fleet import Fleet, Watcher
from tests.integration.test_codecs import updates_seen


def test_fedper_heads_never_cross_the_broker(fleet: Fleet) -> None:
    task = get_task(fleet.task)
    specs = specs_of(get_weights(task.build_model()))
    head = set(task.head)
    body_specs = [s for s in specs if s.name not in head]
    watcher = Watcher(fleet.broker, fleet.topics.updates_filter())
    try:
        fleet.aggregator(rounds=2, devices_per_round=2, min_devices=2, codec="float32",
                         personalization="fedper", personal_steps=20, publish_onnx=False,
                         epochs=2, lr=0.1)  # fmt: skip
        for i in range(2):
            fleet.agent(i, 2, partition="shards")
        rounds = fleet.wait_rounds(2, timeout=120)
        assert [r["outcome"] for r in rounds] == ["complete"] * 2, fleet.logs()
        seen = updates_seen(watcher)
        assert len(seen) == 4, fleet.logs()
        for _, u in seen:
            # strictly against the body: a head tensor would be "not part of the model"
            got = decode_tensors(u.body, u.codec, body_specs)
            assert set(got) == {s.name for s in body_specs}
            assert 0 <= u.metrics["personal_acc"] <= 1 and "global_acc" in u.metrics
        # nothing of any head reached the aggregator: its head is version 0's, bit for bit
        store = Store(root=fleet.state_dir)
        first, last = (store.load_server_weights(v) or decode_weights(store.load_version(v)[0])
                       for v in (0, 2))  # fmt: skip
        for name in head:
            np.testing.assert_array_equal(first[name], last[name])
        assert not all(np.array_equal(first[n], last[n]) for n in first)  # the body moved
        # each device keeps its own head, trained away from the global one
        for d in ("d0", "d1"):
            kept = DeviceStore(root=fleet.root / "agents" / d).load_personal()
            assert kept is not None and kept[0]["mode"] == "fedper", d
            assert not np.array_equal(kept[1][task.head[0]], first[task.head[0]])
        for r in rounds:
            assert r["personal"]["n"] == 2 and r["global_local"]["n"] == 2, r
            assert 0 <= r["personal"]["p10"] <= r["personal"]["mean"] <= 1
        # the devices' shards are two labels each: their own heads beat the untrained global one
        assert rounds[-1]["personal"]["mean"] > rounds[-1]["global_local"]["mean"]
    finally:
        watcher.close()

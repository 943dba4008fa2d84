"""The model-fetch state machine, fed manifests, chunks and times: no broker, no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pytest

from edge_agent.fetch import (
    Action,
    Hold,
    HoldOnnx,
    ModelFetch,
    Reject,
    Subscribe,
    Unsubscribe,
)
from fedmq.topics import Topics
from fedmq.wire import Chunk, TensorSpec, specs_of
from tests.edge_agent.versions import Version, make_version, small_weights

TOPICS = Topics(job="j", prefix="p")


def machine(**kw: object) -> ModelFetch:
    kw.setdefault("specs", specs_of(small_weights()))
    return ModelFetch(topics=TOPICS, task="t", **kw)  # type: ignore[arg-type]


def feed(f: ModelFetch, chunks: list[Chunk], now: float = 1.0) -> list[Action]:
    out: list[Action] = []
    for c in chunks:
        out += f.on_chunk(c, now=now)
    return out


def only(actions: list[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def holding(f: ModelFetch, v: Version) -> ModelFetch:
    """f after fetching v whole."""
    f.on_manifest(v.manifest, now=0.0)
    assert only(feed(f, v.full), Hold)
    return f


def test_full_fetch_subscribes_to_its_chunks_and_holds_the_checked_weights() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    (sub,) = f.on_manifest(v.manifest, now=0.0)
    assert sub == Subscribe(tuple(f"p/j/global/0/{i}" for i in range(len(v.full))), 0,
                            "float32", 1)  # fmt: skip
    assert len(v.full) > 2 and f.fetching == v.manifest
    assert feed(f, v.full[:-1]) == []
    unsub, hold = f.on_chunk(v.full[-1], now=1.0, wire_bytes=5000)
    assert unsub == Unsubscribe(sub.topics) and isinstance(hold, Hold)
    assert hold.via == "float32" and hold.manifest == v.manifest
    assert hashlib.sha256(hold.blob).hexdigest() == v.manifest.model_sha256
    for name, arr in v.weights.items():
        np.testing.assert_array_equal(hold.weights[name], arr)
    assert (f.version, f.sha256, f.fetching) == (0, v.manifest.model_sha256, None)
    assert f.on_manifest(v.manifest, now=2.0) == []  # held: nothing to fetch


def test_chunks_in_any_order_with_duplicates_give_one_hold() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    f.on_manifest(v.manifest, now=0.0)
    assert f.on_manifest(v.manifest, now=0.5) == []  # being fetched: not restarted
    shuffled = v.full * 2
    random.Random(3).shuffle(shuffled)
    seen: set[int] = set()
    holds = 0
    for c in shuffled:
        seen.add(c.index)
        actions = f.on_chunk(c, now=1.0)
        assert not only(actions, Reject)
        holds += len(only(actions, Hold))
        assert holds == (1 if len(seen) == len(v.full) else 0)  # at the last new chunk, once
    assert f.version == 0


def test_a_payload_that_fails_its_sha256_is_fetched_again_then_given_up() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    f.on_manifest(v.manifest, now=0.0)
    bad = [dataclasses.replace(c, data=bytes(len(c.data))) for c in v.full]
    for attempt in (2, 3):
        actions = feed(f, bad)
        assert [type(a) for a in actions] == [Unsubscribe, Reject, Subscribe]
        reject, sub = actions[1], actions[2]
        assert isinstance(reject, Reject) and isinstance(sub, Subscribe)
        assert reject.code == "bad_payload" and not reject.final
        assert sub.attempt == attempt and sub.topics == actions[0].topics  # type: ignore[attr-defined]
    actions = feed(f, bad)
    assert [type(a) for a in actions] == [Unsubscribe, Reject]
    assert isinstance(actions[1], Reject) and actions[1].final and "gave up" in actions[1].reason
    assert f.fetching is None and f.version == -1
    assert feed(f, v.full) == []  # no longer fetching: nothing is held
    # the manifest once more (e.g. after a reconnect): a fresh set of tries, and they work
    assert only(f.on_manifest(v.manifest, now=5.0), Subscribe)
    assert only(feed(f, v.full), Hold) and f.version == 0


def test_a_retry_that_gets_good_chunks_holds_the_version() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    f.on_manifest(v.manifest, now=0.0)
    bad = [dataclasses.replace(c, data=bytes(len(c.data))) for c in v.full]
    assert only(feed(f, bad), Subscribe)[0].attempt == 2  # type: ignore[attr-defined]
    (hold,) = only(feed(f, v.full), Hold)
    assert isinstance(hold, Hold) and f.version == 0


def test_chunks_that_are_not_the_manifests_payload_are_ignored() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    other = make_version(small_weights(seed=9), 0)  # same payload id, other bytes
    f.on_manifest(v.manifest, now=0.0)
    assert feed(f, other.full) == [] and f.fetching == v.manifest
    assert only(feed(f, v.full), Hold)


def test_a_delta_is_fetched_when_the_base_is_held_and_rebuilds_the_version() -> None:
    f, v0 = machine(), make_version(small_weights(0), 0)
    holding(f, v0)
    v1 = make_version(small_weights(1), 1, previous=v0.weights,
                      base_sha=v0.manifest.model_sha256)  # fmt: skip
    (sub,) = f.on_manifest(v1.manifest, now=0.0)
    assert isinstance(sub, Subscribe) and sub.what == "delta"
    assert sub.topics[0] == f"p/j/global/1/{len(v1.full)}"  # after the full payload's chunks
    (hold,) = only(feed(f, v1.delta), Hold)
    assert isinstance(hold, Hold) and hold.via == "delta"
    for name, arr in v1.weights.items():
        np.testing.assert_array_equal(hold.weights[name], arr)


def test_a_delta_that_does_not_rebuild_falls_back_to_the_full_model() -> None:
    f, v0 = machine(), make_version(small_weights(0), 0)
    holding(f, v0)
    # a delta made against other weights than the base it names: it will not rebuild v1
    v1 = make_version(small_weights(1), 1, previous=small_weights(2),
                      base_sha=v0.manifest.model_sha256)  # fmt: skip
    f.on_manifest(v1.manifest, now=0.0)
    actions = feed(f, v1.delta)
    assert [type(a) for a in actions] == [Unsubscribe, Reject, Subscribe]
    reject, sub = actions[1], actions[2]
    assert isinstance(reject, Reject) and reject.code == "no_rebuild" and not reject.final
    assert isinstance(sub, Subscribe) and sub.what == "float32" and sub.attempt == 1
    assert f.version == 0  # still the base
    (hold,) = only(feed(f, v1.full), Hold)
    assert isinstance(hold, Hold) and hold.via == "float32" and f.version == 1
    wire = sum(len(c.data) for c in v1.delta + v1.full)
    assert hold.fetched_bytes == wire  # the failed delta counts as downlink too


def test_a_delta_for_another_base_is_not_used() -> None:
    f = holding(machine(), make_version(small_weights(0), 0))
    v1 = make_version(small_weights(1), 1, previous=small_weights(0), base_sha="0" * 64)
    (sub,) = f.on_manifest(v1.manifest, now=0.0)
    assert isinstance(sub, Subscribe) and sub.what == "float32"


def test_an_inference_only_device_fetches_the_onnx_export() -> None:
    f = machine(onnx=True, specs=None)
    v = make_version(small_weights(), 0, onnx=b"onnx model bytes " * 500)
    (sub,) = f.on_manifest(v.manifest, now=0.0)
    assert isinstance(sub, Subscribe) and sub.what == "onnx"
    assert sub.topics[0] == f"p/j/global/0/{len(v.full)}"
    assert feed(f, v.full) == []  # the weights' chunks are not what it fetches
    (hold,) = only(feed(f, v.onnx), HoldOnnx)
    assert isinstance(hold, HoldOnnx) and hold.onnx == b"onnx model bytes " * 500
    assert f.on_manifest(v.manifest, now=1.0) == []  # held
    # without an export it takes the weights
    g = machine(onnx=True, specs=None)
    assert g.on_manifest(make_version(small_weights(), 0).manifest, now=0.0)[0].what == "float32"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"task": "other-task"}, "wrong_task"),
        ({"job": "other-job"}, "wrong_job"),
        ({"tensors": (TensorSpec("w", "float32", (40, 31)), TensorSpec("b", "float32", (30,)))},
         "wrong_specs"),
        ({"tensors": (TensorSpec("w", "float32", (40, 30)),)}, "wrong_specs"),
        ({"codec": "gzip"}, "bad_manifest"),
    ],
)  # fmt: skip
def test_a_manifest_that_does_not_fit_the_device_is_refused_before_any_fetch(
    change: dict[str, object], code: str
) -> None:
    v0 = make_version(small_weights(0), 0)
    f = holding(machine(), v0)
    bad = dataclasses.replace(make_version(small_weights(1), 1).manifest, **change)  # type: ignore[arg-type]
    (reject,) = f.on_manifest(bad, now=1.0)
    assert isinstance(reject, Reject) and reject.code == code and reject.final
    assert reject.version == 1 and reject.reason
    assert f.fetching is None and f.version == 0 and f.sha256 == v0.manifest.model_sha256


def test_an_older_version_is_refused_and_a_refusal_does_not_disturb_a_fetch() -> None:
    f = holding(machine(), make_version(small_weights(0), 2))
    (reject,) = f.on_manifest(make_version(small_weights(1), 1).manifest, now=1.0)
    assert isinstance(reject, Reject) and reject.code == "stale_version"
    v3 = make_version(small_weights(3), 3)
    f.on_manifest(v3.manifest, now=1.0)
    wrong = dataclasses.replace(make_version(small_weights(4), 4).manifest, task="x")
    assert [type(a) for a in f.on_manifest(wrong, now=1.0)] == [Reject]
    assert f.fetching == v3.manifest and only(feed(f, v3.full), Hold) and f.version == 3


def test_a_newer_manifest_replaces_the_fetch_in_progress() -> None:
    f = machine()
    v1, v2 = make_version(small_weights(1), 1), make_version(small_weights(2), 2)
    (sub1,) = f.on_manifest(v1.manifest, now=0.0)
    unsub, sub2 = f.on_manifest(v2.manifest, now=0.0)
    assert unsub == Unsubscribe(sub1.topics) and isinstance(sub2, Subscribe) and sub2.version == 2  # type: ignore[attr-defined]
    assert feed(f, v1.full) == [] and only(feed(f, v2.full), Hold) and f.version == 2


def test_a_stalled_fetch_is_tried_again_then_given_up() -> None:
    f, v = machine(stall_s=30.0), make_version(small_weights(), 0)
    f.on_manifest(v.manifest, now=0.0)
    assert f.tick(now=29.0) == []
    f.on_chunk(v.full[0], now=29.0)  # progress restarts the clock
    assert f.tick(now=58.0) == []
    actions = f.tick(now=60.0)
    assert [type(a) for a in actions] == [Unsubscribe, Reject, Subscribe]
    assert actions[1].code == "timeout" and actions[2].attempt == 2  # type: ignore[attr-defined]
    f.on_connected(now=200.0)  # a reconnect brings the retained chunks again: not a stall
    assert f.tick(now=220.0) == []
    assert only(f.tick(now=231.0), Subscribe)[0].attempt == 3  # type: ignore[attr-defined]
    actions = f.tick(now=262.0)
    assert [type(a) for a in actions] == [Unsubscribe, Reject]
    assert actions[1].final and f.fetching is None and f.tick(now=999.0) == []  # type: ignore[attr-defined]


def test_weights_that_do_not_fit_the_specs_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="do not match"):
        machine(version=0, sha256="0" * 64, weights={"w": np.zeros(3, np.float32)})

"""The modes' rules as pure code: selection, judging updates, ending rounds and buffers."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.fedbuff import BufferPolicy
from aggregator.modes import BufferedRounds, Contribution, SyncRounds
from aggregator.rounds import OpenRound, RoundPolicy, select_devices
from fedmq.errors import DuplicateUpdate, StaleUpdate, Unauthorized
from fedmq.wire import Update

SYNC = SyncRounds(policy=RoundPolicy(target=3, min_devices=2, timeout_s=60))


def _round(**kw) -> OpenRound:  # noqa: ANN003
    args = dict(round_id=5, model_version=4, selected=frozenset({"a", "b", "c", "d"}),
                opened_at=100.0, deadline=160.0, target=3, min_devices=2)  # fmt: skip
    args.update(kw)
    return OpenRound(**args)


def _update(device: str = "a", uid: str = "u1", round_id: int = 5, base: int = 4,
            n: int = 10) -> Update:  # fmt: skip
    return Update(uid, device, round_id, base, n, "float32", b"")


def test_select_over_selects_and_is_seeded() -> None:
    online = [f"d{i}" for i in range(20)]
    a = select_devices(online, target=10, over_select=0.3, rng=np.random.default_rng(1))
    b = select_devices(online, target=10, over_select=0.3, rng=np.random.default_rng(1))
    assert a == b and len(a) == 13 and len(set(a)) == 13 and set(a) <= set(online)
    assert len(select_devices(online[:5], target=10, over_select=0.3,
                              rng=np.random.default_rng(0))) == 5  # fmt: skip


def test_policy_sizes_and_when_to_open() -> None:
    p = RoundPolicy(target=10, min_devices=5)
    assert not p.ready(9) and p.ready(10)
    assert p.round_target(7) == 7 and p.round_target(30) == 10 and p.round_target(2) == 5
    assert p.should_open(10, waited=False) and not p.should_open(9, waited=False)
    assert p.should_open(5, waited=True) and not p.should_open(4, waited=True)
    every = RoundPolicy(target=0, min_devices=1)
    assert every.round_target(12) == 12
    assert not every.should_open(12, waited=False) and every.should_open(12, waited=True)
    with pytest.raises(ValueError, match="min_devices"):
        RoundPolicy(target=2, min_devices=3)
    with pytest.raises(ValueError, match="over_select"):
        RoundPolicy(over_select=-0.1)


def test_sync_open_is_seeded_by_round() -> None:
    mode = SyncRounds(policy=RoundPolicy(target=4, over_select=0.5, min_devices=3, timeout_s=9))
    online = [f"d{i}" for i in range(10)]
    r = mode.open(round_id=2, version=1, online=online, seed=7, now=50.0)
    again = mode.open(round_id=2, version=1, online=online, seed=7, now=50.0)
    assert r == again and len(r.selected) == 6 and r.target == 4 and r.deadline == 59.0
    assert r.min_devices == 3 and r.model_version == 1


def test_sync_accepts_then_refuses_a_second_update_of_a_device() -> None:
    r = _round()
    assert SYNC.judge(r, _update(n=7), version=4, trains=True, now=120.0) == Contribution(7, 7)
    r.record("u1", "a")
    with pytest.raises(DuplicateUpdate, match="already contributed"):
        SYNC.judge(r, _update(uid="u2"), version=4, trains=True, now=120.0)


def test_sync_refuses_wrong_round_version_device() -> None:
    r = _round()
    with pytest.raises(StaleUpdate, match="round 6"):
        SYNC.judge(r, _update(round_id=6), version=4, trains=True, now=120.0)
    with pytest.raises(StaleUpdate, match="version 3"):
        SYNC.judge(r, _update(base=3), version=4, trains=True, now=120.0)
    with pytest.raises(Unauthorized, match="not selected"):
        SYNC.judge(r, _update(device="zz"), version=4, trains=True, now=120.0)


def test_sync_late_for_old_round_or_after_deadline() -> None:
    r = _round()
    assert SYNC.judge(r, _update(round_id=4), version=4, trains=True, now=120.0) is None
    assert SYNC.judge(r, _update(), version=4, trains=True, now=161.0) is None


def test_sync_outcomes() -> None:
    r = _round()
    assert SYNC.outcome(r, 110) is None
    r.record("1", "a")
    r.record("2", "b")
    assert SYNC.outcome(r, 150) is None
    assert SYNC.outcome(r, 160) == "quorum"
    r.record("3", "c")
    assert SYNC.outcome(r, 110) == "complete"


def test_sync_abandons_without_quorum_and_dropouts_end_the_wait() -> None:
    r = _round()
    r.record("1", "a")
    assert SYNC.outcome(r, 160) == "abandoned"
    r2 = _round()
    r2.record("1", "a")
    r2.record("2", "b")
    r2.drop("c")
    assert SYNC.outcome(r2, 110) is None
    r2.drop("d")
    assert SYNC.outcome(r2, 110) == "quorum"  # nobody left to wait for
    r2.rejoin("d")
    assert SYNC.outcome(r2, 110) is None
    r2.drop("a")  # a device that already contributed is not a dropout
    assert "a" not in r2.dropped


ASYNC = BufferedRounds(policy=RoundPolicy(timeout_s=30),
                       buffer=BufferPolicy(buffer_size=3, staleness_exponent=1.0,
                                           max_staleness=2))  # fmt: skip


def test_async_weighs_by_staleness_and_takes_a_device_once_per_buffer() -> None:
    r = ASYNC.open(round_id=9, version=5, online=["a", "b"], seed=0, now=0.0)
    assert r.target == 2 and r.selected == {"a", "b"}  # fewer online than the buffer size
    fresh = ASYNC.judge(r, _update(base=5, n=8), version=5, trains=True, now=1.0)
    assert fresh == Contribution(8.0, 8.0, {"staleness": 0})
    r.record("u1", "a")
    stale = ASYNC.judge(r, _update(uid="u2", device="b", base=3, n=8), version=5, trains=None,
                        now=1.0)  # fmt: skip
    assert stale == Contribution(8.0 / 3, 8.0, {"staleness": 2})
    # the attack: one id (never seen, so trains is None) filling the buffer by itself
    with pytest.raises(DuplicateUpdate, match="already contributed"):
        ASYNC.judge(r, _update(uid="u3", base=5), version=5, trains=None, now=1.0)
    with pytest.raises(StaleUpdate, match="3 versions stale"):
        ASYNC.judge(r, _update(device="b", base=2), version=5, trains=True, now=1.0)
    with pytest.raises(Unauthorized, match="inference-only"):
        ASYNC.judge(r, _update(device="b"), version=5, trains=False, now=1.0)


def test_async_flushes_full_or_at_its_age_limit() -> None:
    r = ASYNC.open(round_id=1, version=0, online=["a", "b", "c", "d"], seed=0, now=0.0)
    assert r.target == 3 and ASYNC.outcome(r, 29.0) is None
    assert ASYNC.outcome(r, 30.0) == "abandoned"  # empty at the limit: announced afresh
    r.record("u1", "a")
    assert ASYNC.outcome(r, 29.0) is None and ASYNC.outcome(r, 30.0) == "buffered"
    r.record("u2", "a")
    r.record("u3", "b")
    assert ASYNC.outcome(r, 1.0) == "buffered"

"""Round policy: selection, judging updates, closing on target, quorum or abandon."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.rounds import OpenRound, RoundPolicy, select_devices
from fedmq.errors import DuplicateUpdate, StaleUpdate, Unauthorized


def _round(**kw) -> OpenRound:  # noqa: ANN003
    args = dict(round_id=5, model_version=4, selected=frozenset({"a", "b", "c", "d"}),
                opened_at=100.0, deadline=160.0, target=3, min_devices=2)  # fmt: skip
    args.update(kw)
    return OpenRound(**args)


def _judge(r: OpenRound, device: str = "a", uid: str = "u1", **kw) -> str:  # noqa: ANN003
    args = dict(update_id=uid, device=device, round_id=5, base_version=4, now=120.0,
                counted_ids=set())  # fmt: skip
    args.update(kw)
    return r.judge(**args)


def test_select_over_selects_and_is_seeded() -> None:
    online = [f"d{i}" for i in range(20)]
    a = select_devices(online, target=10, over_select=0.3, rng=np.random.default_rng(1))
    b = select_devices(online, target=10, over_select=0.3, rng=np.random.default_rng(1))
    assert a == b and len(a) == 13 and len(set(a)) == 13 and set(a) <= set(online)
    assert len(select_devices(online[:5], target=10, over_select=0.3,
                              rng=np.random.default_rng(0))) == 5  # fmt: skip


def test_policy_sizes() -> None:
    p = RoundPolicy(target=10, min_devices=5)
    assert not p.ready(9) and p.ready(10)
    assert p.round_target(7) == 7 and p.round_target(30) == 10 and p.round_target(2) == 5
    every = RoundPolicy(target=0, min_devices=1)
    assert every.round_target(12) == 12
    with pytest.raises(ValueError, match="min_devices"):
        RoundPolicy(target=2, min_devices=3)
    with pytest.raises(ValueError, match="over_select"):
        RoundPolicy(over_select=-0.1)


def test_accepts_then_refuses_duplicates() -> None:
    r = _round()
    assert _judge(r) == "accept"
    r.record("a", "u1")
    with pytest.raises(DuplicateUpdate):
        _judge(r, uid="u1")
    with pytest.raises(DuplicateUpdate, match="already contributed"):
        _judge(r, uid="u2")
    with pytest.raises(DuplicateUpdate):
        _judge(r, device="b", uid="old", counted_ids={"old"})


def test_refuses_wrong_round_version_device() -> None:
    r = _round()
    with pytest.raises(StaleUpdate, match="round 6"):
        _judge(r, round_id=6)
    with pytest.raises(StaleUpdate, match="version 3"):
        _judge(r, base_version=3)
    with pytest.raises(Unauthorized, match="not selected"):
        _judge(r, device="zz")


def test_late_for_old_round_or_after_deadline() -> None:
    r = _round()
    assert _judge(r, round_id=4) == "late"
    assert _judge(r, now=161.0) == "late"


def test_outcomes() -> None:
    r = _round()
    assert r.outcome(110) is None
    r.record("a", "1")
    r.record("b", "2")
    assert r.outcome(150) is None
    assert r.outcome(160) == "quorum"
    r.record("c", "3")
    assert r.outcome(110) == "complete"


def test_abandon_without_quorum_and_dropouts_end_wait() -> None:
    r = _round()
    r.record("a", "1")
    assert r.outcome(160) == "abandoned"
    r2 = _round()
    r2.record("a", "1")
    r2.record("b", "2")
    r2.drop("c")
    assert r2.outcome(110) is None
    r2.drop("d")
    assert r2.outcome(110) == "quorum"  # nobody left to wait for
    r2.rejoin("d")
    assert r2.outcome(110) is None

"""Selection policies, pure: random as it always was, utility-aware (Oort-style) with its
exploration and fairness guard, the table rebuilt from history, hostile reported numbers."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from aggregator.fedbuff import BufferPolicy
from aggregator.modes import BufferedRounds, SyncRounds
from aggregator.rounds import RoundPolicy
from aggregator.selection import (
    MAX_LOSS,
    Candidates,
    Participation,
    RandomSelection,
    Selector,
    UtilitySelection,
    make_selection,
)
from aggregator.settings import AggregatorSettings


def old_select(online: list[str], target: int, over: float, seed: int, round_id: int,
               cap: int = 0) -> tuple[str, ...]:  # fmt: skip
    """fedmq's selection before policies existed, written out again."""
    want = min(len(online), math.ceil(target * (1.0 + over)))
    if cap:
        want = min(want, cap)
    rng = np.random.default_rng([seed, round_id])
    return tuple(sorted(str(d) for d in rng.choice(sorted(online), size=want, replace=False)))


def test_random_is_todays_selection_bit_for_bit() -> None:
    online = [f"dev-{i:03d}" for i in range(37)]
    for seed in (0, 1, 12345):
        for round_id in (1, 2, 50):
            for target, over, cap in ((5, 0.0, 0), (10, 0.3, 0), (30, 0.5, 20), (3, 0.0, 0)):
                c = Candidates(online=online, round_id=round_id, seed=seed, target=target,
                               over_select=over, max_selected=cap)  # fmt: skip
                got = RandomSelection().select(c, Participation())
                assert got == old_select(online, target, over, seed, round_id, cap)
    # and through the modes, as the service calls them
    sync = SyncRounds(policy=RoundPolicy(target=4, over_select=0.5))
    r = sync.open(round_id=7, version=3, online=online, seed=9, now=0.0)
    assert tuple(sorted(r.selected)) == old_select(online, 4, 0.5, 9, 7)
    capped = BufferedRounds(policy=RoundPolicy(target=1, max_selected=5),
                            buffer=BufferPolicy(buffer_size=2))  # fmt: skip
    r = capped.open(round_id=3, version=1, online=online, seed=2, now=0.0)
    assert tuple(sorted(r.selected)) == old_select(online, 5, 0.0, 2, 3)


def record(round_id: int, selected: list[str], parts: dict[str, tuple[float, float, float]],
           wall: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A history record: parts maps device -> (loss, examples, arrived_s)."""
    return {"round": round_id, "outcome": "complete", "selected": sorted(selected),
            "participants": [{"device": d, "examples": n, "arrived_s": t,
                              "metrics": {"train_loss": loss, "train_s": 0.1}}
                             for d, (loss, n, t) in parts.items()],
            "wall_s": wall if wall is not None else max((p[2] for p in parts.values()),
                                                        default=0.0)}  # fmt: skip


def simulate(policy: UtilitySelection, speeds: dict[str, float], *, rounds: int, k: int,
             losses: dict[str, float] | None = None, seed: int = 0,
             ) -> tuple[Selector, list[dict[str, Any]]]:  # fmt: skip
    """Sync rounds that wait for every selected device; a device's loss falls as it trains
    (a liar's does not); returns the selector and the history records."""
    sel = Selector(policy=policy)
    base = losses or {d: 2.3 for d in speeds}
    history = []
    for r in range(1, rounds + 1):
        chosen = sel.select(Candidates(online=list(speeds), round_id=r, seed=seed, target=k))
        assert len(chosen) == k and len(set(chosen)) == k
        parts = {d: (base[d] * 0.97 ** sel.table.devices.get(d, _zero).took_part, 250.0,
                     speeds[d]) for d in chosen}  # fmt: skip
        rec = record(r, list(chosen), parts)
        sel.table.observe(rec)
        history.append(rec)
    return sel, history


class _Zero:
    took_part = 0


_zero = _Zero()


def heterogeneous(n: int = 20, slow: int = 4) -> dict[str, float]:
    """n devices, the first `slow` 10x slower, the rest 0.5-1.5 s."""
    rng = np.random.default_rng(7)
    return {f"d{i:02d}": (10.0 if i < slow else 1.0) * float(rng.uniform(0.5, 1.5))
            for i in range(n)}  # fmt: skip


def max_gaps(history: list[dict[str, Any]], devices: list[str]) -> dict[str, int]:
    """The longest run of rounds each device went unselected (also before its first)."""
    last = dict.fromkeys(devices, 0)
    gap = dict.fromkeys(devices, 0)
    for rec in history:
        for d in rec["selected"]:
            gap[d] = max(gap[d], rec["round"] - last[d] - 1)
            last[d] = rec["round"]
    end = history[-1]["round"] + 1
    return {d: max(gap[d], end - last[d] - 1) for d in devices}


def test_utility_prefers_high_loss_and_fast_devices() -> None:
    # everyone tried once; a and b report high loss, c low loss, d high loss but 10x slower
    table = Participation.from_history([record(1, ["a", "b", "c", "d", "e", "f"], {
        "a": (2.0, 250, 1.0), "b": (2.0, 250, 1.1), "c": (0.1, 250, 1.0),
        "d": (2.0, 250, 10.0), "e": (1.0, 250, 1.0), "f": (1.0, 250, 1.2)})])  # fmt: skip
    policy = UtilitySelection(exploration=0.0, max_skip_rounds=1000)
    picks: Counter[str] = Counter()
    for seed in range(200):
        picks.update(policy.select(Candidates(online=list("abcdef"), round_id=2, seed=seed,
                                              target=2), table))  # fmt: skip
    assert picks["a"] + picks["b"] > 0.9 * 400, picks  # high loss and fast
    assert picks["c"] == 0 and picks["d"] == 0, picks  # low loss; slow
    scores = policy.scores(list("abcdef"), table.devices, 2)
    assert scores[3] < scores[2] < scores[0]  # slow (x (T/t)^2) under low loss under best


def test_round_s_and_alpha_set_the_speed_penalty() -> None:
    table = Participation.from_history([record(1, ["a", "b"], {
        "a": (1.0, 100, 2.0), "b": (1.0, 100, 8.0)})])  # fmt: skip
    lenient = UtilitySelection(round_s=10.0).scores(["a", "b"], table.devices, 2)
    assert lenient[0] == lenient[1]  # both within T
    strict = UtilitySelection(round_s=4.0, speed_alpha=1.0).scores(["a", "b"], table.devices, 2)
    assert strict[1] == pytest.approx(strict[0] * 4.0 / 8.0)
    blind = UtilitySelection(speed_alpha=0.0).scores(["a", "b"], table.devices, 2)
    assert blind[0] == blind[1]


def test_exploration_picks_untried_devices() -> None:
    tried = [f"t{i}" for i in range(10)]
    untried = [f"u{i}" for i in range(10)]
    table = Participation.from_history([record(1, tried, {d: (1.0, 100, 1.0) for d in tried})])
    online = tried + untried
    half = UtilitySelection(exploration=0.5, max_skip_rounds=1000)
    got = half.select(Candidates(online=online, round_id=2, seed=0, target=4), table)
    assert sum(d.startswith("u") for d in got) == 2
    none = UtilitySelection(exploration=0.0, max_skip_rounds=1000)
    for seed in range(20):
        got = none.select(Candidates(online=online, round_id=2, seed=seed, target=4), table)
        assert not any(d.startswith("u") for d in got)
    # a fraction below one pick still explores now and then (rounded at random), seeded
    small = UtilitySelection(exploration=0.1, max_skip_rounds=1000)
    runs = [small.select(Candidates(online=online, round_id=2, seed=s, target=4), table)
            for s in range(100)]  # fmt: skip
    explored = sum(any(d.startswith("u") for d in got) for got in runs)
    assert 20 <= explored <= 60  # 0.4 of a pick per round
    assert runs == [small.select(Candidates(online=online, round_id=2, seed=s, target=4), table)
                    for s in range(100)]  # fmt: skip
    # nothing tried yet (round 1): every pick explores
    first = small.select(Candidates(online=online, round_id=1, seed=0, target=4), Participation())
    assert len(first) == 4


def test_fairness_guard_over_500_rounds_with_heterogeneous_speeds() -> None:
    speeds = heterogeneous()
    policy = UtilitySelection(max_skip_rounds=8)
    sel, history = simulate(policy, speeds, rounds=500, k=10)
    gaps = max_gaps(history, list(speeds))
    assert max(gaps.values()) <= 8, gaps
    # the policy still prefers the fast: slow devices take part about once per guard period
    counts = Counter(d for rec in history for d in rec["selected"])
    slow = [d for d in speeds if speeds[d] > 5]
    assert all(counts[d] <= 500 / 8 + 5 for d in slow), counts
    assert all(counts[d] > 150 for d in speeds if d not in slow), counts
    # and once the guard makes a round wait for a slow device, the other slow ones due soon
    # come along (they cost that round no time): few rounds wait for a slow device at all
    # (random selection: 96% of them)
    waiting = sum(bool(set(slow) & set(rec["selected"])) for rec in history)
    assert waiting <= 500 / 9 * 1.5, waiting
    # participation counts are reported, and they are the history's
    status = sel.status()
    assert status["policy"] == "utility"
    assert status["participation"] == {d: {"selected": counts[d], "took_part": counts[d]}
                                       for d in sorted(speeds)}  # fmt: skip


def test_automatic_guard_bounds_the_gap_in_a_larger_fleet() -> None:
    speeds = heterogeneous(n=60, slow=12)
    policy = UtilitySelection()  # max_skip_rounds 0: 4 x ceil(60 / 5) = 48
    assert policy.skip_limit(60, 5) == 48
    _, history = simulate(policy, speeds, rounds=300, k=5)
    assert max(max_gaps(history, list(speeds)).values()) <= 48


def test_a_restarted_aggregator_selects_as_an_uninterrupted_one() -> None:
    speeds = heterogeneous()
    policy = UtilitySelection(max_skip_rounds=8)
    live, history = simulate(policy, speeds, rounds=60, k=10)
    restarted = Selector(policy=policy)
    restarted.rebuild(history)  # what the service does on start
    assert restarted.table == live.table
    for r in (61, 62):
        c = Candidates(online=list(speeds), round_id=r, seed=0, target=10)
        assert restarted.select(c) == live.select(c)


def test_a_round_closed_again_after_a_crash_replaces_its_first_record() -> None:
    # killed between the round's history record and the commit point: the restart rebuilds
    # from a history holding round 3's first record, resumes round 3 and closes it again
    # with one more participant; the history (read_history) then keeps only the later one
    first = [record(1, ["a", "b"], {"a": (2.0, 10, 1.0), "b": (1.0, 10, 2.0)}),
             record(2, ["a", "c"], {"a": (1.5, 10, 1.0), "c": (1.0, 10, 3.0)}),
             record(3, ["b", "c"], {"b": (0.9, 10, 2.0)}, wall=30.0)]  # fmt: skip
    again = record(3, ["b", "c"], {"b": (0.9, 10, 2.0), "c": (0.8, 10, 40.0)})
    history = [*first[:2], again]
    live = Selector(policy=UtilitySelection())
    live.rebuild(first)
    live.observe(again, lambda: history)
    assert live.table == Participation.from_history(history)
    assert live.table.devices["c"].selected == 2 and live.table.devices["c"].took_part == 2
    live.observe(record(4, ["a"], {"a": (1.0, 10, 1.0)}), lambda: [])  # a new round: no reread
    assert live.table.devices["a"].selected == 3


def test_hostile_numbers_are_clipped_or_ignored() -> None:
    nasty: list[Any] = [float("nan"), float("inf"), -float("inf"), -5.0, 1e308, "2.0", True,
                        None, [1], {"x": 1}]  # fmt: skip
    records: list[dict[str, Any]] = []
    for i, bad in enumerate(nasty):
        records.append({"round": i + 1, "selected": ["a", "b", 7, None], "wall_s": bad,
                        "participants": [{"device": "a", "examples": bad, "arrived_s": bad,
                                          "metrics": {"train_loss": bad}},
                                         {"device": ["b"]}, "junk",
                                         {"device": "b", "metrics": bad}]})  # fmt: skip
    records += [{"no": "round"}, {"round": "x"}, {"round": 99, "selected": "abc"}]
    table = Participation.from_history(records)
    a = table.devices["a"]
    assert a.loss is None or 0.0 <= a.loss <= MAX_LOSS
    assert 1 <= a.examples <= 1e6 and a.duration_s is not None and a.duration_s < 1e6
    for d in table.devices.values():
        for v in (d.loss, d.duration_s, d.examples):
            assert v is None or math.isfinite(v)
    online = ["a", "b", "c", "d", "e"]
    got = UtilitySelection().select(Candidates(online=online, round_id=100, seed=0, target=2),
                                    table)  # fmt: skip
    assert len(got) == 2 and set(got) <= set(online)
    scores = UtilitySelection().scores(["a", "b"], table.devices, 100)
    assert np.isfinite(scores).all() and (scores >= 0).all()
    # round trips so long that the speed penalty all but vanishes for most devices
    slow = Participation.from_history([record(1, [f"s{i}" for i in range(8)], {
        f"s{i}": (1.0, 10, 1e-3 if i == 0 else 1e30) for i in range(8)})])  # fmt: skip
    harsh = UtilitySelection(round_s=1e-3, speed_alpha=10.0, exploration=0.0)
    assert (harsh.scores([f"s{i}" for i in range(8)], slow.devices, 2)[1:] < 1e-50).all()
    got = harsh.select(Candidates(online=[f"s{i}" for i in range(8)], round_id=2, seed=0,
                                  target=4), slow)  # fmt: skip
    assert len(got) == 4 and "s0" in got


def test_a_device_lying_about_its_loss_has_bounded_influence() -> None:
    speeds = heterogeneous(n=12, slow=0)
    liar = "d05"
    losses = {d: 2.3 for d in speeds} | {liar: 1e30}
    policy = UtilitySelection(max_skip_rounds=6)
    sel, history = simulate(policy, speeds, rounds=200, k=3, losses=losses)
    assert sel.table.devices[liar].loss == MAX_LOSS  # clipped at intake
    # its statistical utility is clipped at the fleet's 95th percentile: it cannot score
    # more than one plus the staleness bonus, whatever it claims
    scores = policy.scores(sorted(speeds), sel.table.devices, 201)
    assert scores.max() <= 1.0 + math.sqrt(0.1 * math.log(201))
    gaps = max_gaps(history, list(speeds))
    assert all(g <= 6 for d, g in gaps.items() if d != liar), gaps
    counts = Counter(d for rec in history for d in rec["selected"])
    assert all(counts[d] >= 200 // 7 for d in speeds), counts  # everyone gets turns


def test_settings_validate_and_default_to_random() -> None:
    s = AggregatorSettings(insecure=True)
    assert s.selection == "random" and s.selector.policy == RandomSelection()
    u = AggregatorSettings(insecure=True, selection="utility", selection_exploration=0.2,
                           selection_round_s=3.0, selection_speed_alpha=1.0,
                           selection_max_skip_rounds=5)  # fmt: skip
    assert u.selector.policy == UtilitySelection(exploration=0.2, round_s=3.0, speed_alpha=1.0,
                                                 max_skip_rounds=5)  # fmt: skip
    for bad in ({"selection": "oort"}, {"selection_exploration": 1.5},
                {"selection_round_s": -1.0}, {"selection_speed_alpha": -1.0},
                {"selection_max_skip_rounds": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            AggregatorSettings(insecure=True, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_selection(policy="nope")
    with pytest.raises(ValueError, match="central DP"):  # its accountant assumes uniform q
        AggregatorSettings(insecure=True, selection="utility", rule="clip", clip_norm=1.0,
                           dp_noise_multiplier=1.0)  # fmt: skip


def test_the_service_rebuilds_the_table_from_its_history_on_start(tmp_path: Any) -> None:
    from aggregator.service import Aggregator
    from aggregator.store import Store

    speeds = heterogeneous()
    live, history = simulate(UtilitySelection(max_skip_rounds=8), speeds, rounds=30, k=10)
    store = Store(root=tmp_path / "agg")
    for rec in history:
        store.append_round(rec)
    settings = AggregatorSettings(insecure=True, task="digits-mlp", state_dir=tmp_path / "agg",
                                  selection="utility", selection_max_skip_rounds=8,
                                  devices_per_round=10,
                                  publish_onnx=False)  # fmt: skip
    agg = Aggregator(settings=settings)
    try:
        agg._resume()  # what run() does first, before it connects
        assert agg.selector.table == live.table
        r = agg.mode.open(round_id=31, version=0, online=list(speeds), seed=0, now=0.0)
        want = live.select(Candidates(online=list(speeds), round_id=31, seed=0, target=10))
        assert tuple(sorted(r.selected)) == want
        assert agg.aggregation_status()["selection"] == live.status()
    finally:
        agg.journal.close()
        agg.intake.close()

"""Personal models, the aggregator's side: fedper's shared-body form of an update, the
head named in the round, and the per-round distribution of reported accuracies."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.admission import Admission
from aggregator.personal import distribution, personal_stats, personal_train, resolve_head
from aggregator.status import RecentRounds
from fedmq.codecs import encode_tensors, parse_pipeline
from fedmq.errors import SchemaError, ShapeMismatch
from fedmq.wire import (
    RoundAnnouncement,
    TensorSpec,
    TrainConfig,
    Update,
    decode_round,
    decode_update,
    encode_round,
    encode_update,
)

SPECS = (
    TensorSpec("0.weight", "float32", (3, 2)),
    TensorSpec("0.bias", "float32", (3,)),
    TensorSpec("2.weight", "float32", (2, 3)),
    TensorSpec("2.bias", "float32", (2,)),
)
HEAD = ("2.weight", "2.bias")


def _update(tensors: dict[str, np.ndarray], metrics: dict[str, float] | None = None) -> Update:
    body = encode_tensors(tensors, parse_pipeline("float32"), rng=np.random.default_rng(0))
    return Update("u1", "d1", 1, 0, 10, "float32", body, metrics=metrics or {})


def _delta(names: tuple[str, ...], value: float = 1.0) -> dict[str, np.ndarray]:
    return {s.name: np.full(s.shape, value, np.float32) for s in SPECS if s.name in names}


ALL = tuple(s.name for s in SPECS)
BODY = ("0.weight", "0.bias")


def test_fedper_admission_takes_the_body_alone_and_zeroes_the_head() -> None:
    adm = Admission(specs=SPECS, max_update_bytes=1 << 20, head=frozenset(HEAD))
    got = adm.validate(_update(_delta(BODY, 2.0)))
    assert set(got) == set(ALL)
    np.testing.assert_array_equal(got["0.weight"], 2.0)
    np.testing.assert_array_equal(got["2.weight"], np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(got["2.bias"], np.zeros(2, np.float32))


def test_fedper_discards_a_full_update_head_and_refuses_half_a_head() -> None:
    adm = Admission(specs=SPECS, max_update_bytes=1 << 20, head=frozenset(HEAD))
    full = adm.validate(_update(_delta(ALL, 5.0)))  # an agent that predates personal models
    np.testing.assert_array_equal(full["0.bias"], 5.0)
    assert not np.any(full["2.weight"]) and not np.any(full["2.bias"])
    with pytest.raises(ShapeMismatch, match="all of the head or none"):
        adm.validate(_update(_delta(("0.weight", "0.bias", "2.bias"))))
    with pytest.raises(ShapeMismatch, match="missing"):  # the body is never optional
        adm.validate(_update(_delta(("0.weight",))))


def test_without_fedper_a_body_only_update_is_refused() -> None:
    adm = Admission(specs=SPECS, max_update_bytes=1 << 20)
    with pytest.raises(ShapeMismatch, match="missing"):
        adm.validate(_update(_delta(BODY)))
    assert set(adm.validate(_update(_delta(ALL)))) == set(ALL)


def test_resolve_head_from_the_setting_or_the_task() -> None:
    assert resolve_head((), HEAD, SPECS) == HEAD
    assert resolve_head(("2.bias",), HEAD, SPECS) == ("2.bias",)
    with pytest.raises(ValueError, match="does not have"):
        resolve_head(("9.weight",), HEAD, SPECS)
    with pytest.raises(ValueError, match="needs the head"):
        resolve_head((), (), SPECS)
    with pytest.raises(ValueError, match="nothing would be shared"):
        resolve_head(ALL, (), SPECS)
    t = personal_train(TrainConfig(personal="fedper", personal_steps=5), head=(),
                       default_head=HEAD, specs=SPECS)  # fmt: skip
    assert t.personal_head == HEAD
    plain = TrainConfig()
    assert personal_train(plain, head=(), default_head=HEAD, specs=SPECS) is plain


def _round(train: TrainConfig) -> RoundAnnouncement:
    return RoundAnnouncement("j", 4, 3, "open", 1.0, 61.0, ("a",), 1, 1, train)


def test_personal_fields_travel_in_train_only_when_on_and_are_checked() -> None:
    plain = _round(TrainConfig(2, 10, 0.05))
    raw = msgpack.unpackb(encode_round(plain))
    assert not {"personal", "personal_steps", "personal_head"} & set(raw["train"])
    assert decode_round(encode_round(plain)).train.personal == "none"
    fedper = TrainConfig(personal="fedper", personal_steps=0, personal_head=HEAD)
    for train in (TrainConfig(personal="finetune", personal_steps=7), fedper):
        assert decode_round(encode_round(_round(train))) == _round(train)
    raw = msgpack.unpackb(encode_round(_round(TrainConfig(personal="fedper",
                                                          personal_head=HEAD))))  # fmt: skip
    for key, bad in (("personal", "ditto"), ("personal", 3), ("personal_steps", -1),
                     ("personal_steps", 10**9), ("personal_head", []),
                     ("personal_head", ["x"] * 17), ("personal_head", ["a", "a"]),
                     ("personal_head", [""]), ("personal_head", "2.bias")):  # fmt: skip
        hostile = {**raw, "train": {**raw["train"], key: bad}}
        with pytest.raises(SchemaError):
            decode_round(msgpack.packb(hostile))
    finetune = msgpack.unpackb(encode_round(_round(TrainConfig(personal="finetune"))))
    finetune["train"]["personal_head"] = ["2.bias"]  # a head means something only to fedper
    with pytest.raises(SchemaError):
        decode_round(msgpack.packb(finetune))


def test_distribution_mean_and_p10_of_valid_values() -> None:
    d = distribution([0.9, 1.0, 0.5, 0.7, 0.8])
    assert d == {"mean": 0.78, "p10": pytest.approx(0.58), "n": 5, "dropped": 0}
    assert distribution([]) is None


def test_hostile_accuracies_are_dropped_not_clipped() -> None:
    d = distribution([0.5, 1.5, -0.2, float("nan"), float("inf"), "0.9", True, None, 1.0])
    assert d == {"mean": 0.75, "p10": pytest.approx(0.55), "n": 2, "dropped": 7}
    assert distribution([7.0]) == {"mean": None, "p10": None, "n": 0, "dropped": 1}


def test_a_nan_metric_never_gets_past_decoding() -> None:
    payload = encode_update(_update(_delta(BODY), {"personal_acc": 0.5}))
    raw = msgpack.unpackb(payload)
    raw["metrics"]["personal_acc"] = float("nan")
    with pytest.raises(SchemaError):
        decode_update(msgpack.packb(raw))


def test_personal_stats_from_a_round_participants() -> None:
    parts = [{"device": f"d{i}", "metrics": {"personal_acc": p, "global_acc": g}}
             for i, (p, g) in enumerate([(1.0, 0.2), (0.9, 0.4), (0.95, 0.3), (2.0, -1.0)])]
    parts += [{"device": "old", "metrics": {"train_loss": 0.3}}, {"device": "x", "metrics": 3}]
    s = personal_stats(parts)
    assert s["personal"] == {"mean": 0.95, "p10": pytest.approx(0.91), "n": 3, "dropped": 1}
    assert s["global_local"]["mean"] == 0.3 and s["global_local"]["n"] == 3
    assert personal_stats([{"metrics": {"train_loss": 1.0}}]) == {}  # records stay as they were
    recent = RecentRounds()
    recent.add({"round": 1, "version": 1, "outcome": "complete", **s})
    (point,) = recent.as_list()
    assert point["personal"] == {"mean": 0.95, "p10": pytest.approx(0.91), "n": 3}
    recent.add({"round": 2, "version": 2, "outcome": "complete"})
    assert "personal" not in recent.as_list()[-1]


def test_a_fedper_round_survives_a_restart_through_the_journal(tmp_path: Path) -> None:
    """Body-only updates go through the real intake and journal; recovery replays them with
    the head and gets the same sum; without the head the journal cannot be trusted."""
    from aggregator.fedavg import RunningSum
    from aggregator.intake import Intake
    from aggregator.journal import Journal
    from aggregator.ledger import Ledger
    from aggregator.modes import SyncRounds
    from aggregator.recovery import recover_round
    from aggregator.rounds import RoundPolicy
    from fedmq.chunks import encode_chunks

    journal = Journal(root=tmp_path)
    ledger = Ledger(journal=journal)
    adm = Admission(specs=SPECS, max_update_bytes=1 << 20, head=frozenset(HEAD))
    mode = SyncRounds(policy=RoundPolicy(target=3, timeout_s=60))
    intake = Intake(admission=adm, mode=mode, ledger=ledger, max_message_bytes=65536,
                    threads=1)  # fmt: skip
    r = mode.open(round_id=1, version=0, online=["d0", "d1", "d2"], seed=0, now=0.0)
    journal.open_round(1, {**r.meta(), "rule": {}})
    intake.begin(r, RunningSum(specs=SPECS))
    for i, (names, v) in enumerate([(BODY, 1.0), (ALL, 3.0)]):
        body = encode_tensors(_delta(names, v), parse_pipeline("float32"),
                              rng=np.random.default_rng(0))  # fmt: skip
        u = Update(f"u{i}", f"d{i}", 1, 0, 10, "float32", body)
        for chunk in encode_chunks(encode_update(u), u.update_id, 65536):
            intake.on_chunk(u.device, chunk, now=1.0, version=0, next_round=2,
                            trains=lambda d: True)  # fmt: skip
        intake.drain()
    live = intake.sum
    assert live is not None and live.count == 2
    want = live.mean()
    np.testing.assert_array_equal(want["0.bias"], 2.0)
    assert not np.any(want["2.weight"])  # the full update's head was discarded
    intake.close()
    journal.close()

    journal = Journal(root=tmp_path)
    found = recover_round(journal=journal, ledger=Ledger(journal=journal), round_id=1,
                          version=0, specs=SPECS, head=frozenset(HEAD))  # fmt: skip
    assert found is not None
    got = found[1].mean()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ShapeMismatch):  # the service moves such a round aside
        recover_round(journal=journal, ledger=Ledger(journal=journal), round_id=1, version=0,
                      specs=SPECS)  # fmt: skip
    journal.close()


def test_settings_default_to_none_and_refuse_what_a_round_could_not_carry() -> None:
    from aggregator.settings import AggregatorSettings
    from edge_agent.settings import AgentSettings

    s = AggregatorSettings(insecure=True)
    before = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
    assert encode_round(_round(s.train)) == encode_round(_round(before))  # none: as before
    assert s.train.personal == "none" and s.personal_head_names == ()
    fedper = AggregatorSettings(insecure=True, personalization="fedper",
                                personal_head=" 2.weight, 2.bias ")  # fmt: skip
    assert fedper.personal_head_names == HEAD and fedper.train.personal == "fedper"
    for bad in ({"personalization": "ditto"}, {"personal_steps": -1}):
        with pytest.raises(ValueError):
            AggregatorSettings(insecure=True, **bad)  # type: ignore[arg-type]
    assert AgentSettings(insecure=True).holdout_fraction == 0.2
    with pytest.raises(ValueError, match="holdout_fraction"):
        AgentSettings(insecure=True, holdout_fraction=1.0)

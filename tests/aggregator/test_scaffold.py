"""SCAFFOLD and FedNova on the aggregator: the server control variate across versions and
restarts, hostile control deltas refused with a reason, FedNova through the real
admission path against its reference, and both settings off = FedAvg bit for bit.
Pure: no broker, no torch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from aggregator.admission import Admission
from aggregator.clientside import ClientSide
from aggregator.fedavg import RunningSum
from aggregator.localwork import normalize, rescale, tau_effective
from aggregator.modes import Contribution
from aggregator.scaffold import ScaffoldRule, ServerControl, encode_control
from aggregator.store import Store
from fedmq.codecs import encode_tensors, parse_pipeline
from fedmq.correction import control_name, fednova_mean, update_specs
from fedmq.errors import ProtocolError
from fedmq.wire import TensorSpec, TrainConfig, Update, encode_update, specs_of

W = {"w": np.array([1.0, -2.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}
SPECS = specs_of(W)
SCAFFOLD = TrainConfig(lr=0.1, correction="scaffold")


def _update(tensors: dict[str, np.ndarray], *, examples: int = 10, steps: float | None = None,
            codec: str = "float32") -> Update:  # fmt: skip
    metrics = {} if steps is None else {"local_steps": steps}
    body = encode_tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()},
                          parse_pipeline(codec), rng=np.random.default_rng(0))  # fmt: skip
    return Update(update_id="u1", device="d", round_id=1, base_version=0, num_examples=examples,
                  codec=codec, body=body, metrics=metrics)  # fmt: skip


def _admit(specs: tuple[TensorSpec, ...], u: Update) -> dict[str, object]:
    admission = Admission(specs=specs, max_update_bytes=1 << 20)
    return admission.validate(admission.decode(encode_update(u), device="d", payload_id="u1"))  # type: ignore[return-value]


def _scaffold_delta(dw: list[float], db: list[float], cw: list[float], cb: list[float]
                    ) -> dict[str, np.ndarray]:  # fmt: skip
    return {"w": np.array(dw), "b": np.array(db), control_name("w"): np.array(cw),
            control_name("b"): np.array(cb)}  # fmt: skip


def test_the_round_sums_control_deltas_unweighted_and_steps_c() -> None:
    side = ClientSide(specs=SPECS, train=SCAFFOLD, normalize_local_work=False)
    acc = side.rule(RunningSum(specs=SPECS))
    for ex, dw, cw in ((10, [1.0, 1.0], [2.0, -4.0]), (30, [-1.0, 3.0], [0.0, 2.0])):
        tensors = _admit(side.update_specs, _update(_scaffold_delta(dw, [0.0], cw, [1.0]),
                                                    examples=ex))  # fmt: skip
        acc.add(tensors, float(ex))  # type: ignore[arg-type]
    side.population = 4
    mean = side.mean(acc, [])
    # the model delta example-weighted: (10 (1, 1) + 30 (-1, 3)) / 40 = (-0.5, 2.5)
    np.testing.assert_array_equal(mean["w"], [-0.5, 2.5])
    assert side.control is not None and side.control.pending is not None
    assert np.all(side.control.c["w"] == 0)  # nothing adopted before the version exists
    side.commit(1)
    # c = 0 + 2/4 * mean((2, -4), (0, 2)) = 0.5 * (1, -1) = (0.5, -0.5); b: 0.5 * 1
    np.testing.assert_array_equal(side.control.c["w"], [0.5, -0.5])
    np.testing.assert_array_equal(side.control.c["b"], [0.5])


def test_c_is_saved_with_its_version_and_resumed_after_a_restart(tmp_path: Path) -> None:
    store = Store(root=tmp_path)
    first = ServerControl(specs=SPECS, store=store)
    first.step({"w": np.array([1.0, 2.0]), "b": np.array([3.0])}, participating=1, population=2)
    first.commit(1)
    first.step({"w": np.array([9.0, 9.0]), "b": np.array([9.0])}, participating=1, population=1)
    # a crash here: version 2 was never made; a restart resumes version 1's c
    again = ServerControl(specs=SPECS, store=store)
    assert again.resume(1, tmp_path / "quarantine") == 0
    assert again.steps == 1
    np.testing.assert_array_equal(again.c["w"], [0.5, 1.0])
    np.testing.assert_array_equal(again.c["b"], [1.5])
    assert again.published["w"].dtype == np.float32
    # a version without a .ctl (made before SCAFFOLD was on) starts c at zero, no quarantine
    assert again.resume(7, tmp_path / "quarantine") == 0 and again.norm() == 0.0


@pytest.mark.parametrize("blob", [
    b"", b"not msgpack at all",
    encode_control(1, {"w": np.array([np.nan, 0.0]), "b": np.array([0.0])}),  # poisoned
    encode_control(1, {"w": np.zeros(3), "b": np.zeros(1)}),  # another model's
    encode_control(1, {"w": np.zeros(2), "b": np.zeros(1)})[:-5],  # torn
])  # fmt: skip
def test_an_untrusted_control_file_is_quarantined_and_c_starts_at_zero(
    tmp_path: Path, blob: bytes
) -> None:
    store = Store(root=tmp_path)
    store.save_extra(3, "ctl", blob)
    control = ServerControl(specs=SPECS, store=store)
    assert control.resume(3, tmp_path / "quarantine") == 1
    assert store.load_extra(3, "ctl") is None
    assert [p.read_bytes() for p in (tmp_path / "quarantine").iterdir()] == [blob]
    assert control.norm() == 0.0 and control.steps == 0


HOSTILE = {
    "nan": (_scaffold_delta([0.1, 0.1], [0.0], [np.nan, 0.0], [0.0]), "SCAFFOLD", "finite"),
    "huge": (_scaffold_delta([0.1, 0.1], [0.0], [1e6, 0.0], [0.0]), "SCAFFOLD", "allows"),
    "wrong shape": ({"w": np.zeros(2), "b": np.zeros(1), control_name("w"): np.zeros(3),
                     control_name("b"): np.zeros(1)}, "SCAFFOLD", "shape"),
    "missing": ({"w": np.zeros(2), "b": np.zeros(1)}, "SCAFFOLD", "missing"),
    "not announced": (_scaffold_delta([0.1, 0.1], [0.0], [0.1, 0.1], [0.0]), "none",
                      "not part of the model"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_control_delta_is_refused_with_a_reason(case: str) -> None:
    tensors, announced, reason = HOSTILE[case]
    train = SCAFFOLD if announced == "SCAFFOLD" else TrainConfig(lr=0.1)
    side = ClientSide(specs=SPECS, train=train, normalize_local_work=False)
    acc = side.rule(RunningSum(specs=SPECS))
    with pytest.raises(ProtocolError) as err:
        acc.add(_admit(side.update_specs, _update(tensors)), 10.0)  # type: ignore[arg-type]
    assert reason in err.value.reason.lower() or reason in str(err.value).lower()
    assert acc.count == 0  # nothing of it was folded in


def test_an_honest_control_delta_passes_the_plausibility_bound() -> None:
    # K = 1 step of lr 0.1 with c = 0: dc = -delta / 0.1, exactly at ||delta|| / lr
    acc = ScaffoldRule(inner=RunningSum(specs=SPECS), specs=SPECS, lr=0.1, c_norm=0.0)
    acc.add(_admit(update_specs(SPECS, "scaffold"), _update(
        _scaffold_delta([0.1, -0.2], [0.05], [-1.0, 2.0], [-0.5]))), 1.0)  # type: ignore[arg-type]
    assert acc.count == 1 and acc.control_count == 1


def test_fednova_through_admission_matches_its_reference() -> None:
    train = TrainConfig(epochs=1, batch_size=10)
    side = ClientSide(specs=SPECS, train=train, normalize_local_work=True)
    acc, people = side.rule(RunningSum(specs=SPECS)), []
    cases = (({"w": [4.0, 8.0], "b": [1.0]}, 10, 4.0), ({"w": [1.0, 1.0], "b": [2.0]}, 30, None))
    for delta, ex, steps in cases:
        u = _update({k: np.array(v) for k, v in delta.items()}, examples=ex, steps=steps)
        given = side.weigh(Contribution(weight=float(ex), norm=float(ex)), u)
        acc.add(_admit(SPECS, u), given.weight, norm=given.norm)  # type: ignore[arg-type]
        people.append({"examples": ex, **given.record})
    # the second reports no steps: the announced work, ceil(30 / 10) = 3
    assert [p["local_steps"] for p in people] == [4, 3]
    want = fednova_mean([({k: np.array(v) for k, v in d.items()}, float(ex), float(s or 3))
                         for d, ex, s in cases])  # fmt: skip
    got = side.mean(acc, people)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)
    assert tau_effective(people) == (10 * 4 + 30 * 3) / 40


def test_an_implausible_local_step_count_is_refused() -> None:
    u = _update({"w": np.zeros(2), "b": np.zeros(1)}, examples=30, steps=1.0)  # < ceil(30/10)
    with pytest.raises(ProtocolError, match="local_steps 1 is implausible"):
        normalize(Contribution(weight=30.0, norm=30.0), u, TrainConfig(batch_size=10))


def test_settings_off_are_fedavg_bit_for_bit() -> None:
    side = ClientSide(specs=SPECS, train=TrainConfig(), normalize_local_work=False)
    assert side.update_specs == SPECS and side.control is None and side.control_body() == b""
    inner = RunningSum(specs=SPECS)
    assert side.rule(inner) is inner
    rng = np.random.default_rng(1)
    plain = RunningSum(specs=SPECS)
    for i in range(5):
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in W.items()}
        u = _update(delta, examples=7 + i, steps=float(1 + i))
        given = Contribution(weight=float(u.num_examples), norm=float(u.num_examples))
        assert side.weigh(given, u) is given
        inner.add(_admit(SPECS, u), given.weight, norm=given.norm)  # type: ignore[arg-type]
        plain.add(_admit(SPECS, u), given.weight, norm=given.norm)  # type: ignore[arg-type]
    got, want = side.mean(inner, []), plain.mean()
    for k in want:
        assert got[k].tobytes() == want[k].tobytes()
    assert rescale(want, 1.0)["w"].tobytes() == want["w"].tobytes()


def test_a_restart_mid_round_replays_model_and_control_sums_and_the_weights(
    tmp_path: Path,
) -> None:
    from aggregator.intake import Intake
    from aggregator.journal import Journal, read_ledger
    from aggregator.ledger import Ledger
    from aggregator.modes import SyncRounds
    from aggregator.recovery import recover_round
    from aggregator.rounds import RoundPolicy
    from fedmq.chunks import encode_chunks

    train = TrainConfig(lr=0.1, batch_size=10, correction="scaffold")
    side = ClientSide(specs=SPECS, train=train, normalize_local_work=True)
    mode = SyncRounds(policy=RoundPolicy(target=4, timeout_s=60))
    journal = Journal(root=tmp_path)
    ledger = Ledger(journal=journal)
    admission = Admission(specs=side.update_specs, max_update_bytes=1 << 20)
    intake = Intake(admission=admission, mode=mode, ledger=ledger, max_message_bytes=65536,
                    threads=1, weigh=side.weigh)  # fmt: skip
    r = mode.open(round_id=1, version=0, online=["d0", "d1", "d2"], seed=0, now=0.0)
    journal.open_round(1, {**r.meta(), "rule": {}})
    intake.begin(r, side.rule(RunningSum(specs=SPECS)))
    sent = [("d0", _scaffold_delta([0.1, 0.2], [0.0], [-1.0, -2.0], [0.5]), 20, 2.0),
            ("d1", _scaffold_delta([0.3, -0.1], [0.1], [1.0, 0.5], [-0.5]), 40, 4.0),
            ("d2", _scaffold_delta([0.1, 0.1], [0.0], [1e6, 0.0], [0.0]), 20, 2.0)]  # hostile
    for device, tensors, n, steps in sent:
        u = dataclasses.replace(_update(tensors, examples=n, steps=steps), update_id=device,
                                device=device)  # fmt: skip
        for chunk in encode_chunks(encode_update(u), u.update_id, 65536):
            intake.on_chunk(device, chunk, now=1.0, version=0, next_round=2,
                            trains=lambda d: True)  # fmt: skip
        intake.drain()
        journal.commit()
    live = intake.sum
    assert isinstance(live, ScaffoldRule) and live.count == 2 and live.control_count == 2
    want, want_c = live.mean(), live.mean_control()
    verdicts = {v["update_id"]: v for v in read_ledger(tmp_path)}
    assert verdicts["d2"]["verdict"] == "rejected" and "allows" in verdicts["d2"]["reason"]
    intake.close()
    journal.close()  # the service dies here, the round still open

    journal = Journal(root=tmp_path)
    ledger = Ledger(journal=journal)
    found = recover_round(journal=journal, ledger=ledger, round_id=1, version=0,
                          specs=side.update_specs,
                          new_rule=lambda meta: side.rule(RunningSum(specs=SPECS)))  # fmt: skip
    assert found is not None
    acc = found[1]
    assert isinstance(acc, ScaffoldRule) and acc.count == 2
    for k in want:
        assert acc.mean()[k].tobytes() == want[k].tobytes()
        assert acc.mean_control()[k].tobytes() == want_c[k].tobytes()
    # the FedNova weights came back with the participants: tau_eff = (20*2 + 40*4) / 60
    assert [p["local_steps"] for p in ledger.participants] == [2, 4]
    assert tau_effective(ledger.participants) == pytest.approx(200 / 60)
    journal.close()


@pytest.mark.parametrize("bad", [
    {"client_correction": "scafold"},
    {"client_correction": "scaffold", "rule": "median"},
    {"normalize_local_work": True, "mode": "async"},
    {"client_correction": "scaffold", "personalization": "fedper"},
])  # fmt: skip
def test_settings_refuse_what_does_not_combine(bad: dict[str, object]) -> None:
    from aggregator.settings import AggregatorSettings

    AggregatorSettings(insecure=True, client_correction="scaffold", normalize_local_work=True)
    with pytest.raises(ValueError, match="correction|normalize_local_work"):
        AggregatorSettings(insecure=True, **bad)  # type: ignore[arg-type]

"""Admission bounds and robust rules through the real intake, journal and recovery, in
process: the example cap, clipping and rejection as ledger verdicts and counters, sync and
FedBuff, and a restart in the middle of a round whose rule keeps every update."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.admission import Admission
from aggregator.fedbuff import BufferPolicy
from aggregator.intake import Intake
from aggregator.journal import Journal, read_ledger
from aggregator.ledger import Ledger
from aggregator.modes import BufferedRounds, Mode, SyncRounds
from aggregator.recovery import recover_round
from aggregator.robust import make_rule
from aggregator.rounds import OpenRound, RoundPolicy
from fedmq.chunks import encode_chunks
from fedmq.codecs import encode_tensors, parse_pipeline
from fedmq.wire import TensorSpec, Update, encode_update

SPECS = (TensorSpec("w", "float32", (3, 2)), TensorSpec("b", "float32", (2,)))
DEVICES = [f"d{i}" for i in range(6)]


def _update(uid: str, device: str, value: float, *, n: int = 10, round_id: int = 1,
            base: int = 0) -> Update:  # fmt: skip
    delta = {s.name: np.full(s.shape, value, np.float32) for s in SPECS}
    body = encode_tensors(delta, parse_pipeline("float32"), rng=np.random.default_rng(0))
    return Update(uid, device, round_id, base, n, "float32", body)


def _rule(rule: str, bounds: dict[str, Any]) -> Any:
    return make_rule(specs=SPECS, rule=rule, bound=float(bounds.get("bound", 0.0)),
                     median_norm=float(bounds.get("median_norm", 0.0)), trim=0.2,
                     krum_f=1)  # fmt: skip


class Rig:
    """An intake with a real journal and ledger over one state directory."""

    def __init__(self, root: Path, mode: Mode, *, enrolled: dict[str, int] | None = None,
                 max_examples: int = 1000) -> None:  # fmt: skip
        self.journal = Journal(root=root)
        self.ledger = Ledger(journal=self.journal)
        self.admission = Admission(specs=SPECS, max_update_bytes=1 << 20,
                                   max_examples=max_examples,
                                   example_caps=enrolled or {})  # fmt: skip
        self.intake = Intake(admission=self.admission, mode=mode, ledger=self.ledger,
                             max_message_bytes=65536, threads=2)  # fmt: skip

    def send(self, u: Update, *, version: int = 0) -> None:
        for chunk in encode_chunks(encode_update(u), u.update_id, 65536):
            self.intake.on_chunk(u.device, chunk, now=1.0, version=version, next_round=2,
                                 trains=lambda d: True)  # fmt: skip
        self.intake.drain()
        self.journal.commit()

    def close(self) -> None:
        self.intake.close()
        self.journal.close()


def _sync() -> SyncRounds:
    return SyncRounds(policy=RoundPolicy(target=6, timeout_s=60))


def _open(rig: Rig, mode: Mode, rule: str, bounds: dict[str, Any]) -> OpenRound:
    r = mode.open(round_id=1, version=0, online=DEVICES, seed=0, now=0.0)
    rig.journal.open_round(1, {**r.meta(), "rule": bounds})
    rig.intake.begin(r, _rule(rule, bounds))
    return r


def test_example_cap_clipping_and_absurd_norms_are_counted_and_ledgered(tmp_path: Path) -> None:
    mode = _sync()
    rig = Rig(tmp_path, mode, enrolled={"d0": 50}, max_examples=1000)
    # bound 2: a delta of value v over 8 coordinates has norm v * sqrt(8)
    _open(rig, mode, "fedavg", {"bound": 2.0, "median_norm": 1.0})
    rig.send(_update("spoofed", "d0", 0.1, n=10_000_000))  # capped at its enrolled 50
    rig.send(_update("greedy", "d1", 0.1, n=5000))  # capped at the policy's 1000
    rig.send(_update("big", "d2", 1.0, n=10))  # norm 2.83: clipped to 2
    rig.send(_update("absurd", "d3", 1e5, n=10))  # norm 2.8e5 > 1e4 x bound: rejected
    rig.send(_update("liar", "d4", 0.1, n=20_000_000))  # an implausible claim: refused
    c = rig.ledger.counters
    assert (c["examples_capped"], c["clipped"], c["rejected_out_of_bounds"]) == (2, 1, 1)
    assert c["rejected_schema_error"] == 1
    parts = {p["device"]: p for p in rig.ledger.participants}
    assert parts["d0"]["examples"] == 50 and parts["d0"]["examples_claimed"] == 10_000_000
    assert parts["d1"]["examples"] == 1000 and parts["d2"]["clipped"] is True
    assert parts["d2"]["l2"] == pytest.approx(np.sqrt(8.0))
    verdicts = {v["update_id"]: v for v in read_ledger(tmp_path)}
    assert verdicts["absurd"]["verdict"] == "rejected"
    assert verdicts["absurd"]["reason"].startswith("out_of_bounds")
    assert verdicts["liar"]["reason"].startswith("schema_error: num_examples")
    acc = rig.intake.sum
    assert acc is not None and acc.count == 3 and acc.total_weight == 50 + 1000 + 10
    big = 2.0 / np.sqrt(8.0)  # the clipped update's value per coordinate
    np.testing.assert_allclose(acc.mean()["b"], (50 * 0.1 + 1000 * 0.1 + 10 * big) / 1060)
    rig.close()


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_restart_mid_round_replays_every_kept_update(tmp_path: Path, rule: str) -> None:
    mode = _sync()
    bounds = {"bound": 2.0, "median_norm": 0.5}
    rig = Rig(tmp_path, mode)
    _open(rig, mode, rule, bounds)
    values = [0.1, 0.2, 5.0, 0.15]  # 5.0: clipped to the bound before it is kept
    for i, v in enumerate(values):
        rig.send(_update(f"u{i}", DEVICES[i], v))
    live = rig.intake.sum
    assert live is not None and not live.streaming and live.count == 4
    want = live.mean()
    rig.close()  # the service stops (or dies) here, the round still open

    journal = Journal(root=tmp_path)
    ledger = Ledger(journal=journal)
    found = recover_round(journal=journal, ledger=ledger, round_id=1, version=0, specs=SPECS,
                          new_rule=lambda meta: _rule(rule, meta))  # fmt: skip
    assert found is not None
    r, acc = found
    assert list(r.accepted) == ["u0", "u1", "u2", "u3"] and acc.count == 4
    got = acc.mean()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # the round goes on after the restart: one more update folds in with the same bound
    rig2 = Rig.__new__(Rig)
    rig2.journal, rig2.ledger = journal, ledger
    rig2.admission = Admission(specs=SPECS, max_update_bytes=1 << 20)
    rig2.intake = Intake(admission=rig2.admission, mode=mode, ledger=ledger,
                         max_message_bytes=65536, threads=1)  # fmt: skip
    rig2.intake.begin(r, acc)
    rig2.send(_update("u4", DEVICES[4], 9.0))
    assert acc.count == 5 and ledger.counters["clipped"] == 1
    assert len(ledger.participants) == 5
    rig2.close()


def test_fedbuff_buffer_with_a_robust_rule_discounts_stale_updates(tmp_path: Path) -> None:
    mode = BufferedRounds(policy=RoundPolicy(timeout_s=60),
                          buffer=BufferPolicy(buffer_size=3, staleness_exponent=1.0))  # fmt: skip
    rig = Rig(tmp_path, mode)
    r = mode.open(round_id=1, version=3, online=DEVICES, seed=0, now=0.0)
    rig.journal.open_round(1, {**r.meta(), "rule": {}})
    rig.intake.begin(r, _rule("median", {}))
    for i, base in enumerate([3, 3, 2]):  # the last one version stale: weight halved
        rig.send(_update(f"a{i}", DEVICES[i], 0.4, n=10, base=base), version=3)
    acc = rig.intake.sum
    assert acc is not None and acc.count == 3
    np.testing.assert_allclose(acc.mean()["w"], 0.4)  # median of 0.4, 0.4, 0.2
    assert [p.get("staleness") for p in rig.ledger.participants] == [0, 0, 1]
    rig.close()

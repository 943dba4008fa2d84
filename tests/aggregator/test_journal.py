"""The journal: group commit, replay in order onto a snapshot, the ledger of verdicts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from aggregator.fedavg import RunningSum
from aggregator.journal import Accepted, Journal, Snapshot, read_ledger
from aggregator.ledger import Ledger
from fedmq.codecs import decode_tensors, encode_tensors, parse_pipeline
from fedmq.wire import TensorSpec, decode_weights, encode_weights

SPECS = (TensorSpec("w", "float32", (4, 3)), TensorSpec("b", "float32", (3,)))


def _accepted(i: int, round_id: int = 1, codec: str = "topk:0.5+int8") -> Accepted:
    rng = np.random.default_rng(i)
    delta = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}
    body = encode_tensors(delta, parse_pipeline(codec), rng=rng)
    return Accepted(update_id=f"u{i}", round_id=round_id, device=f"d{i % 3}", codec=codec,
                    body=body, weight=float(i + 1), norm=float(i + 1), wire_bytes=len(body) + 90,
                    fetched_bytes=7, record={"device": f"d{i % 3}", "examples": i + 1})  # fmt: skip


def _fold(acc: RunningSum, a: Accepted) -> None:
    acc.add(decode_tensors(a.body, a.codec, SPECS), a.weight, norm=a.norm)


def test_replay_rebuilds_the_sum_bit_for_bit_and_keeps_the_ledger(tmp_path: Path) -> None:
    j = Journal(root=tmp_path)
    ledger = Ledger(journal=j)
    j.open_round(1, {"round": 1, "model_version": 0})
    live = RunningSum(specs=SPECS)
    for i in range(6):
        a = _accepted(i)
        _fold(live, a)
        ledger.accept(a)
    ledger.verdict(update_id="x", device="d9", round_id=1, verdict="rejected",
                   reason="decode_error: garbage", counter="rejected_decode_error")  # fmt: skip
    assert j.commit() == 8  # one commit for the round, six accepts and a rejection
    j.close()

    again = Journal(root=tmp_path)
    assert again.round_meta(1) == {"round": 1, "model_version": 0}
    assert list(again.counted_ids()) == [f"u{i}" for i in range(6)]
    replayed = RunningSum(specs=SPECS)
    for _, a in again.replay(1):
        _fold(replayed, a)
    for name in live.sums:
        assert np.array_equal(replayed.sums[name], live.sums[name])  # same order, same sum
    assert replayed.total_weight == live.total_weight
    verdicts = read_ledger(tmp_path)
    assert [v["verdict"] for v in verdicts] == ["accepted"] * 6 + ["rejected"]
    assert verdicts[-1]["reason"].startswith("decode_error") and verdicts[0]["round"] == 1
    assert ledger.round_stats()["bytes_up"] == sum(_accepted(i).wire_bytes for i in range(6))


def test_uncommitted_updates_are_not_replayed_and_the_bodies_file_stays_usable(
    tmp_path: Path,
) -> None:
    # a child process stages two accepts, commits one, stages another and dies (kill -9
    # stand-in: os._exit skips every cleanup)
    script = f"""
import sys; sys.path.insert(0, {str(Path.cwd())!r})
from tests.aggregator.test_journal import _accepted
from aggregator.journal import Journal
import os
j = Journal(root=__import__('pathlib').Path({str(tmp_path)!r}))
j.stage_accept(_accepted(0)); j.commit()
j.stage_accept(_accepted(1)); j._bodies[1].flush()
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    j = Journal(root=tmp_path)
    assert [a.update_id for _, a in j.replay(1)] == ["u0"]
    assert os.path.getsize(tmp_path / "journal" / "000001.bodies") > len(_accepted(0).body)
    j.stage_accept(_accepted(2))  # appended after the garbage of the lost one
    j.commit()
    assert [a.update_id for _, a in Journal(root=tmp_path).replay(1)] == ["u0", "u2"]
    assert [v["update_id"] for v in read_ledger(tmp_path)] == ["u0", "u2"]


def test_replay_starts_after_the_snapshot(tmp_path: Path) -> None:
    j = Journal(root=tmp_path)
    acc = RunningSum(specs=SPECS)
    for i in range(3):
        _fold(acc, _accepted(i))
        j.stage_accept(_accepted(i))
    j.commit()
    j.save_snapshot(1, Snapshot(seq=j.last_seq(), count=acc.count,
                                total_weight=acc.total_weight,
                                sums=encode_weights(acc.sums)))  # fmt: skip
    for i in range(3, 5):
        _fold(acc, _accepted(i))
        j.stage_accept(_accepted(i))
    j.commit()
    snap = j.snapshot(1)
    assert snap is not None and snap.count == 3
    rebuilt = RunningSum(specs=SPECS)
    rebuilt.sums = {k: v.copy() for k, v in decode_weights(snap.sums).items()}
    rebuilt.total_weight, rebuilt.count = snap.total_weight, snap.count
    tail = [a for _, a in j.replay(1, after_seq=snap.seq)]
    assert [a.update_id for a in tail] == ["u3", "u4"]
    for a in tail:
        _fold(rebuilt, a)
    for name in acc.sums:
        assert np.array_equal(rebuilt.sums[name], acc.sums[name])


def test_closing_a_round_drops_its_bodies_but_keeps_its_ids(tmp_path: Path) -> None:
    j = Journal(root=tmp_path, keep_ids=3)
    for i in range(2):
        j.stage_accept(_accepted(i, round_id=1))
    for i in range(2, 5):
        j.stage_accept(_accepted(i, round_id=2))
    j.open_round(2, {"round": 2})
    j.commit()
    j.close_round(1)
    assert not (tmp_path / "journal" / "000001.bodies").exists()
    assert (tmp_path / "journal" / "000002.bodies").exists()
    assert list(j.counted_ids()) == ["u2", "u3", "u4"]  # bounded to keep_ids, newest kept
    assert [a.update_id for a in j.accepted_in(2)] == ["u2", "u3", "u4"]
    j.close_round(2)
    assert j.round_meta(2) is None and not list((tmp_path / "journal").iterdir())

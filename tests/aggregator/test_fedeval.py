"""Federated evaluation's arithmetic and its bounds, written as the attacks (no broker)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fedeval import (
    MAX_EVAL_EXAMPLES,
    EvalReport,
    FederatedEval,
    accuracy_of,
    combine,
    read_report,
)
from fedmq.errors import (
    DuplicateReport,
    OutOfBounds,
    OverCapacity,
    ProtocolError,
    SchemaError,
    StaleUpdate,
)


def _device_sets(seed: int = 0, devices: int = 7, classes: int = 5):
    """Per-device held-out sets of synthetic logits and labels, of very different sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(devices):
        n = int(rng.integers(1, 400))
        logits = rng.normal(size=(n, classes)) + 2.0 * d / devices * np.eye(classes)[
            rng.integers(0, classes, n)]  # fmt: skip
        labels = rng.integers(0, classes, n)
        out.append((logits, labels))
    return out


def _evaluate(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) as a device computes them."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    return float((logits.argmax(axis=1) == labels).mean()), loss


def _metrics(acc: float, loss: float, n: float) -> dict[str, float]:
    return {"eval_accuracy": acc, "eval_loss": loss, "eval_examples": n}


def test_weighted_result_is_the_evaluation_of_the_union() -> None:
    sets = _device_sets()
    reports = []
    for d, (logits, labels) in enumerate(sets):
        acc, loss = _evaluate(logits, labels)
        reports.append(EvalReport(device=f"d{d}", version=3, accuracy=acc, loss=loss,
                                  examples=len(labels)))  # fmt: skip
    union_acc, union_loss = _evaluate(np.concatenate([s[0] for s in sets]),
                                      np.concatenate([s[1] for s in sets]))  # fmt: skip
    got = combine(reports)
    assert got["accuracy"] == pytest.approx(union_acc, abs=1e-12)
    assert got["loss"] == pytest.approx(union_loss, rel=1e-12)
    assert got["examples"] == sum(len(s[1]) for s in sets)
    assert got["devices"] == len(sets) and got["version"] == 3
    # the unweighted mean of the devices is not the union's value with these sizes
    assert abs(np.mean([r.accuracy for r in reports]) - union_acc) > 1e-3


def test_spread_across_devices() -> None:
    accs = [0.1, 0.5, 0.6, 0.9]
    reports = [EvalReport(device=f"d{i}", version=0, accuracy=a, loss=1.0 + i, examples=10)
               for i, a in enumerate(accs)]  # fmt: skip
    got = combine(reports)
    assert got["accuracy_min"] == 0.1 and got["accuracy_max"] == 0.9
    assert got["accuracy_std"] == pytest.approx(float(np.std(accs)))
    assert got["accuracy_p10"] == pytest.approx(float(np.percentile(accs, 10)))
    assert got["accuracy_p90"] == pytest.approx(float(np.percentile(accs, 90)))
    assert (got["loss_min"], got["loss_max"]) == (1.0, 4.0)
    with pytest.raises(ValueError):
        combine([])
    with pytest.raises(ValueError):
        combine([reports[0], EvalReport(device="x", version=1, accuracy=0, loss=0, examples=1)])


def test_training_metrics_are_not_a_report() -> None:
    assert read_report("d0", 1, {"train_loss": 0.3, "train_s": 1.0}) is None
    fed = FederatedEval()
    assert fed.observe("d0", 1, {"onnx_accuracy": 0.9}, current=1) is None
    assert fed.latest() is None


@pytest.mark.parametrize(("metrics", "error"), [
    (_metrics(math.nan, 0.5, 10), SchemaError),
    (_metrics(0.5, math.inf, 10), SchemaError),
    (_metrics(-0.1, 0.5, 10), OutOfBounds),
    (_metrics(1.5, 0.5, 10), OutOfBounds),
    (_metrics(0.5, -1.0, 10), OutOfBounds),
    (_metrics(0.5, 1e9, 10), OutOfBounds),
    (_metrics(0.5, 0.5, 0), OutOfBounds),
    (_metrics(0.5, 0.5, -5), OutOfBounds),
    (_metrics(0.5, 0.5, 2.5), OutOfBounds),
    (_metrics(0.5, 0.5, MAX_EVAL_EXAMPLES + 1), OutOfBounds),
    (_metrics(0.5, 0.5, 1e300), OutOfBounds),
    ({"eval_accuracy": 0.5, "eval_examples": 10}, SchemaError),  # half a report
])  # fmt: skip
def test_hostile_values_are_refused(metrics: dict[str, float], error: type[Exception]) -> None:
    fed = FederatedEval()
    with pytest.raises(error):
        fed.observe("d0", 2, metrics, current=2)
    assert fed.result(2) is None  # nothing of it was kept


def test_versions_outside_the_window_are_refused() -> None:
    fed = FederatedEval(keep_versions=3)
    with pytest.raises(OutOfBounds):  # a version the aggregator does not hold yet
        fed.observe("d0", 6, _metrics(0.5, 1.0, 10), current=5)
    with pytest.raises(StaleUpdate):  # older than the window
        fed.observe("d0", 2, _metrics(0.5, 1.0, 10), current=5)
    with pytest.raises(SchemaError):
        fed.observe("d0", -1, _metrics(0.5, 1.0, 10), current=5)
    assert fed.observe("d0", 3, _metrics(0.5, 1.0, 10), current=5) is not None
    assert fed.observe("d0", 5, _metrics(0.7, 0.8, 10), current=5) is not None
    assert fed.result(3) is not None
    # a newer version moves the window: version 3's reports are dropped
    fed.observe("d1", 6, _metrics(0.8, 0.6, 10), current=6)
    assert fed.result(3) is None and fed.result(5) is not None
    latest = fed.latest()
    assert latest is not None and latest["version"] == 6


def test_one_report_per_device_per_version() -> None:
    fed = FederatedEval()
    first = _metrics(0.5, 1.0, 10)
    assert fed.observe("d0", 1, first, current=1) is not None
    assert fed.observe("d0", 1, dict(first), current=1) is None  # a QoS 1 redelivery
    with pytest.raises(DuplicateReport):  # a second opinion, e.g. to outweigh the others
        fed.observe("d0", 1, _metrics(1.0, 0.0, 1000), current=1)
    fed.observe("d1", 1, _metrics(0.7, 0.5, 30), current=1)
    got = fed.result(1)
    assert got is not None and got["devices"] == 2 and got["examples"] == 40
    assert got["accuracy"] == pytest.approx((0.5 * 10 + 0.7 * 30) / 40)


def test_a_version_holds_at_most_max_devices_reports() -> None:
    fed = FederatedEval(max_devices=2)
    fed.observe("d0", 0, _metrics(0.5, 1.0, 10), current=0)
    fed.observe("d1", 0, _metrics(0.5, 1.0, 10), current=0)
    with pytest.raises(OverCapacity):
        fed.observe("d2", 0, _metrics(0.5, 1.0, 10), current=0)
    assert fed.result(0)["devices"] == 2  # type: ignore[index]


def test_the_deciding_accuracy_is_central_else_federated() -> None:
    fed = {"version": 2, "accuracy": 0.7}
    assert accuracy_of({"accuracy": 0.9, "loss": 0.3}, fed) == 0.9
    assert accuracy_of({}, fed) == 0.7
    assert accuracy_of({}, None) is None


def _record(round_id: int, version: int | None, acc: float | None,
            fed: dict | None = None) -> dict:  # fmt: skip
    r: dict = {"round": round_id, "outcome": "complete" if version is not None else "abandoned",
               "base_version": round_id - 1, "bytes_up": 0, "bytes_down": 0}  # fmt: skip
    if version is not None:
        r["version"] = version
    if acc is not None:
        r.update(accuracy=acc, loss=1 - acc)
    if fed is not None:
        r["federated"] = fed
    return r


def test_history_reads_per_version_central_beside_federated() -> None:
    from fedmq.report import by_version, format_versions, summarize

    fed0 = combine([EvalReport("a", 0, 0.1, 2.3, 10), EvalReport("b", 0, 0.2, 2.2, 30)])
    fed1 = combine([EvalReport("a", 1, 0.6, 1.0, 10)])
    rounds = [_record(1, 1, 0.55, fed0), _record(2, None, None, fed1),
              _record(3, 2, 0.7, fed1)]  # fmt: skip
    rows = by_version(rounds)
    assert [r["version"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] is None and rows[0]["federated"]["accuracy"] == 0.175
    assert rows[1]["accuracy"] == 0.55 and rows[1]["federated"]["accuracy"] == 0.6
    assert rows[2]["accuracy"] == 0.7 and rows[2]["federated"] is None
    table = format_versions(rounds).splitlines()
    assert len(table) == 2 + 3 and "0.5500" in table[3] and "0.6000" in table[3]
    s = summarize(rounds)
    assert (s["federated_version"], s["final_federated_accuracy"]) == (1, 0.6)
    # no central test set: the plots and the summary still have a series to show
    assert summarize([_record(1, 1, None, fed0)])["final_federated_accuracy"] == 0.175


def test_status_shows_the_live_federated_result() -> None:
    import json

    from aggregator.status import RecentRounds, _federated
    from fedmq.fleetstate import FleetState, parse_status
    from fedmq.statusview import summary_lines
    from fedmq.topics import Topics

    fed = combine([EvalReport("a", 4, 0.5, 1.0, 10), EvalReport("b", 4, 0.9, 0.2, 30)])
    recent = RecentRounds()
    recent.add(_record(5, 5, None, fed))  # no central test set
    doc = {"job": "j", "phase": "training", "aggregator": "online", "model_version": 5,
           "accuracy": None, "loss": None, "federated": _federated(fed),
           "recent_rounds": recent.as_list(), "updated_at": 100.0}  # fmt: skip
    status = parse_status(json.dumps(doc).encode())
    assert status is not None and status.federated is not None
    assert (status.federated.version, status.federated.devices) == (4, 2)
    assert status.recent == ((5, pytest.approx(0.8), pytest.approx(0.4)),)
    state = FleetState(topics=Topics(job="j"))
    state.status = status
    text = "\n".join(summary_lines(state, 101.0))
    assert "federated version 4: accuracy 0.8000" in text and "of 2 devices" in text
    hostile = dict(doc, federated={"version": "x", "accuracy": float("inf")})
    assert parse_status(json.dumps(hostile).encode()).federated is None  # type: ignore[union-attr]


def test_central_and_federated_agreement() -> None:
    from fedmq.report import central_vs_federated

    fed = [combine([EvalReport("a", v, acc, 1.0, 10)]) for v, acc in ((0, 0.1), (1, 0.5))]
    rounds = [_record(1, 1, 0.52, fed[0]), _record(2, 2, 0.61, fed[1])]
    got = central_vs_federated(rounds)  # only version 1 has both: 0.52 vs 0.5
    assert got is not None and got["versions"] == 1
    assert got["mean_abs_diff"] == pytest.approx(0.02) == got["max_abs_diff"]
    assert central_vs_federated([_record(1, 1, 0.5)]) is None


_ANY_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.integers(-(2**70), 2**70).map(float))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(reports=st.lists(st.tuples(
    st.sampled_from(["a", "b", "c"]), st.integers(-3, 12),
    st.dictionaries(st.sampled_from(["eval_accuracy", "eval_loss", "eval_examples", "other"]),
                    _ANY_NUMBER)), max_size=20), current=st.integers(0, 10))  # fmt: skip
def test_any_reports_end_as_results_in_range_or_protocol_errors(
    reports: list[tuple[str, int, dict[str, float]]], current: int
) -> None:
    fed = FederatedEval(keep_versions=3)
    for device, version, metrics in reports:
        # refused with a reason (a ProtocolError) is what the service counts and logs
        with contextlib.suppress(ProtocolError):
            fed.observe(device, version, metrics, current=current)
    for version in range(current - 2, current + 1):
        got = fed.result(version)
        if got is None:
            continue
        assert 0 <= got["accuracy"] <= 1 and 0 <= got["loss"] <= 1e4
        assert 1 <= got["devices"] <= 3 and got["examples"] >= got["devices"]
        assert all(math.isfinite(v) for v in got.values())

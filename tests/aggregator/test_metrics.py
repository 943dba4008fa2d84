"""The Prometheus endpoint, scraped over HTTP from a service on a real Mosquitto, agrees with
the machine-readable records (history, ledger, state.json); `fedmq report` turns the same
run's state directory into an HTML report; the Grafana dashboard asks only for series the
aggregator exports."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.journal import read_ledger
from aggregator.metrics import MAX_CLASSES, SERIES, Metrics
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from fedmq.cli import main
from fedmq.report import read_history
from fedmq.wire import DeviceMetrics, decode_weights, encode_metrics
from tests.aggregator.test_service import ScriptedDevice, _update

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "fedmq-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> tuple[set[str], Samples]:
    """(family names, {(sample name, labels): value}) of one scrape."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_agree_with_the_records_and_the_report_shows_the_run(
    plain_broker: Any, tmp_path: Path, topic_prefix: str, capsys: Any
) -> None:
    port = _free_port()
    settings = AggregatorSettings(
        job="svc",
        prefix=topic_prefix,
        port=plain_broker.port,
        task="digits-mlp",
        state_dir=tmp_path / "agg",
        rounds=0,
        devices_per_round=2,
        min_devices=2,
        round_timeout_s=30,
        start_wait_s=30,
        publish_onnx=False,
        insecure=True,
        norm_bound_factor=0,
        examples_factor=0,
        metrics_port=port,
    )
    agg = Aggregator(settings=settings)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agg.run(stop=stop)), daemon=True)
    thread.start()
    dev = ScriptedDevice(plain_broker, settings.topics)
    try:
        dev.online("a", "b")
        dev.open_round(1)
        m0 = dev.pump(lambda: next((m for m in dev.manifests if m.version == 0), None))
        w0 = decode_weights(dev.pump(lambda: dev.payloads.get(m0.weights.payload_id)))
        small = {k: np.full_like(v, 0.01) for k, v in w0.items()}
        # the devices' evaluation of version 0 (federated evaluation), before round 1 closes
        for d, acc, n in (("a", 0.25, 10), ("b", 0.75, 30)):
            body = encode_metrics(DeviceMetrics(device=d, round_id=1, model_version=0, metrics={
                "eval_accuracy": acc, "eval_loss": 2.0, "eval_examples": n}))  # fmt: skip
            dev.client.publish(settings.topics.metrics(d), body, qos=1)
        dev.pump(lambda: _value(_scrape(port)[1], "fedmq_federated_devices") == 2)
        sent = [
            ("a", _update("a1", "a", 1, 0, small)),
            ("b", _update("stale", "b", 9, 0, small)),  # rejected: stale_update
            ("b", _update("b1", "b", 1, 0, small)),
        ]
        for device, u in sent:
            dev.send(device, u)
            dev.ack_for(u.update_id)
        dev.open_round(2)
        for d in "ab":
            dev.send(d, _update(f"{d}2", d, 2, 1, small))
            assert dev.ack_for(f"{d}2").status == "accepted"
        dev.open_round(3)  # round 2 closed; nothing is sent in round 3
        # a message on the aggregator's status topic that it did not publish
        dev.client.publish(settings.topics.status(), b'{"forged": true}', qos=1)

        def settled() -> tuple[set[str], Samples] | None:
            names, s = _scrape(port)
            done = (
                _value(s, "fedmq_rounds_closed_total") == 2
                and _value(s, "fedmq_downlink_intrusions_total", kind="foreign") == 1
                and _value(s, "fedmq_ack_latency_seconds_count") == 5
            )
            return (names, s) if done else None

        names, s = dev.pump(settled)  # bounded: fails with "timed out"
    finally:
        stop.set()
        thread.join(timeout=15)
        dev.close()
    assert result == [0]

    # every series the module declares is exported, and no other (but prometheus_client's
    # <histogram>_created: when the histogram's series began)
    exported = {n for n in names if n.startswith("fedmq_") and not n.endswith("_created")}
    assert exported == set(SERIES)
    job = {"fedmq_job": "svc"}
    history = read_history(settings.state_dir)
    ledger = read_ledger(settings.state_dir)
    state = json.loads((settings.state_dir / "state.json").read_text())
    assert [r["outcome"] for r in history] == ["complete", "complete"]
    assert _value(s, "fedmq_rounds_closed_total", **job) == len(history)
    assert _value(s, "fedmq_model_version", **job) == state["version"] == history[-1]["version"]
    assert _value(s, "fedmq_model_accuracy") == history[-1]["accuracy"]
    assert _value(s, "fedmq_model_loss") == history[-1]["loss"]
    assert _value(s, "fedmq_round_id") == 3
    fed = history[0]["federated"]  # round 1's record: its base version 0, as the devices said
    assert (fed["version"], fed["devices"], fed["examples"]) == (0, 2, 40)
    assert _value(s, "fedmq_federated_accuracy") == fed["accuracy"] == 0.625
    assert _value(s, "fedmq_federated_loss") == fed["loss"] == 2.0
    assert _value(s, "fedmq_federated_version") == 0 and "federated" not in history[1]
    assert _value(s, "fedmq_federated_accuracy_spread", stat="min") == 0.25
    assert _value(s, "fedmq_federated_accuracy_spread", stat="max") == 0.75

    by_verdict = Counter((v["verdict"], v["reason"].split(":")[0]) for v in ledger)
    assert by_verdict == Counter({("accepted", ""): 4, ("rejected", "stale_update"): 1})
    assert _value(s, "fedmq_updates_total", verdict="accepted", reason="") == 4
    assert _value(s, "fedmq_updates_total", verdict="rejected", reason="stale_update") == 1
    assert _value(s, "fedmq_updates_total", verdict="rejected") == 1
    assert _value(s, "fedmq_updates_total", verdict="late") == 0
    assert _value(s, "fedmq_service_events_total", event="rejected_stale_update") == 1

    assert _value(s, "fedmq_round_bytes_up_total") == sum(r["bytes_up"] for r in history) > 0
    assert _value(s, "fedmq_round_bytes_down_total") == sum(r["bytes_down"] for r in history)
    assert _value(s, "fedmq_bytes_up_total") > _value(s, "fedmq_round_bytes_up_total")
    assert _value(s, "fedmq_bytes_down_total") > 0  # versions 0, 1 and 2 published

    assert _value(s, "fedmq_devices_online", **{"class": "rpi4"}) == 2
    assert _value(s, "fedmq_trainers_online") == _value(s, "fedmq_devices_known") == 2
    assert _value(s, "fedmq_round_duration_seconds_count", outcome="complete") == 2
    assert _value(s, "fedmq_round_duration_seconds_sum") == pytest.approx(
        sum(r["wall_s"] for r in history)
    )
    assert _value(s, "fedmq_journal_seconds_count", op="commit") > 0
    assert _value(s, "fedmq_journal_seconds_count", op="append") == 4  # one per accepted body
    assert _value(s, "fedmq_journal_seconds_count", op="fsync") >= 2

    # the report of the same run: the plots inline, a row per round
    out = tmp_path / "report.html"
    assert main(["report", str(settings.state_dir), "--out", str(out)]) == 0
    html = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4  # accuracy and loss, bytes, participation
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    rows = re.findall(r'<tr class="round[^"]*" data-round="(\d+)"[^>]*>(.*?)</tr>', html)
    assert [int(n) for n, _ in rows] == [r["round"] for r in history]
    cells = [re.findall(r"<td>(.*?)</td>", row) for _, row in rows]
    # selected, accepted, dropped, rejected (the ledger's, while the round was open), late
    assert [c[3:8] for c in cells] == [["2", "2", "0", "1", "0"], ["2", "2", "0", "0", "0"]]
    # as the history counted them while each round was open
    assert [int(c[6]) for c in cells] == [
        sum(n for k, n in r["not_accepted"].items() if k.startswith("rejected_")) for r in history
    ]
    assert "digits-mlp" in html and str(out) in capsys.readouterr().out


def test_report_errors_are_one_line(tmp_path: Path, capsys: Any) -> None:
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "history.jsonl") in err
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such directory" in err
    (tmp_path / "history.jsonl").write_text('{"round": 1, "outcome": "complete"}\n')
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a round history" in err and "opened_at" in err


def test_dashboard_asks_only_for_exported_series() -> None:
    doc = json.loads(DASHBOARD.read_text())
    # importable: one data source input that every panel and query uses, unique panel ids
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    sources = [p["datasource"] for p in doc["panels"]]
    sources += [t["datasource"] for p in doc["panels"] for t in p["targets"]]
    assert all(d == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for d in sources)
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [
        v.get("query", {}).get("query", "")
        if isinstance(v.get("query"), dict)
        else v.get("query", "")
        for v in doc.get("templating", {}).get("list", [])
    ]
    exported = set()
    for name, (kind, _) in SERIES.items():
        exported |= {
            "counter": {f"{name}_total"},
            "gauge": {name},
            "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
        }[kind]
    used = {n for e in exprs for n in re.findall(r"\bfedmq_[a-z_]+", e) if n != "fedmq_job"}
    assert used, "the dashboard queries no fedmq series"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    panels = {
        "fedmq_model_accuracy",
        "fedmq_model_loss",
        "fedmq_rounds_closed_total",
        "fedmq_updates_total",
        "fedmq_bytes_up_total",
        "fedmq_bytes_down_total",
        "fedmq_devices_online",
        "fedmq_round_duration_seconds_bucket",
        "fedmq_ack_latency_seconds_bucket",
        "fedmq_journal_seconds_bucket",
    }
    assert panels <= used, f"no panel for {sorted(panels - used)}"


def test_a_taken_metrics_port_is_one_line_and_exit_5(tmp_path: Path, capsys: Any) -> None:
    # before the broker is tried: no broker listens on port 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "aggregator",
                "--insecure",
                "--port",
                "1",
                "--task",
                "digits-mlp",
                "--state-dir",
                str(tmp_path / "agg"),
                "--metrics-port",
                str(port),
            ]
        )
    assert code == 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedmq: ") and f"127.0.0.1:{port} (metrics_port)" in last, last


def test_devices_cannot_grow_the_registry_with_profile_names() -> None:
    # the attack: devices announcing a new profile name each (a state is theirs to write)
    m = Metrics(job="j", port=1)  # a port, so the registry exists; nothing is served
    names = {m.class_of(f"p{i}") for i in range(100)} | {m.class_of("x" * 65 + "y")}
    assert len(names) == MAX_CLASSES + 1 and "other" in names
    assert m.class_of("") == "unknown" and m.class_of("p0") == "p0"
    # with a fleet file, its classes are the only ones
    fleet = Metrics(job="j", port=1, classes=["rpi4", "jetson-nano", "bad label!"])
    assert [fleet.class_of(p) for p in ("rpi4", "jetson-nano", "bad label!", "p1")] == [
        "rpi4",
        "jetson-nano",
        "other",
        "other",
    ]

"""The aggregator's state directory: atomic files, versions, retention, history."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.store import Store, read_history
from fedmq.atomicfile import write_atomic


def test_versions_retention_and_state(tmp_path: Path) -> None:
    s = Store(root=tmp_path, keep_versions=2)
    for v in range(4):
        s.save_version(v, weights=b"w%d" % v, full=b"f%d" % v, onnx=b"o" if v else None)
        assert v not in s.versions()  # not complete until its manifest is kept
        s.save_manifest(v, b"m%d" % v)
    assert s.versions() == [2, 3]
    assert sorted(p.name for p in s.versions_dir.iterdir()) == [
        f"00000{v}.{ext}" for v in (2, 3) for ext in ("full", "manifest", "onnx", "weights")
    ]
    assert s.load_version(3) == (b"w3", b"m3", b"o")
    assert s.load_state() is None
    s.save_state({"next_round": 3})
    assert s.load_state() == {"next_round": 3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_weights_equal_to_the_full_payload_are_kept_once(tmp_path: Path) -> None:
    s = Store(root=tmp_path)
    s.save_version(1, weights=b"same", full=b"same")
    s.save_manifest(1, b"m")
    assert not (s.versions_dir / "000001.weights").exists()
    assert s.load_version(1) == (b"same", b"m", None)


def test_history_is_appended_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    s = Store(root=tmp_path)
    s.append_round({"round": 1, "accuracy": 0.5})
    with open(tmp_path / "history.jsonl", "ab") as fh:
        fh.write(b'{"round": 2, "acc')  # a crash in the middle of a line
    s.append_round({"round": 2, "accuracy": 0.6})
    s.append_round({"round": 2, "accuracy": 0.7})  # closed again after a crash: last wins
    s.append_round({"round": 3, "accuracy": 0.8})
    assert read_history(tmp_path) == [
        {"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.7},
        {"round": 3, "accuracy": 0.8},
    ]  # fmt: skip
    lines = (tmp_path / "history.jsonl").read_bytes().splitlines()
    assert json.loads(lines[-1]) == {"round": 3, "accuracy": 0.8}


def test_incomplete_version_is_ignored(tmp_path: Path) -> None:
    s = Store(root=tmp_path)
    (s.versions_dir / "000005.full").write_bytes(b"half written, no manifest")
    assert s.versions() == []


def test_write_atomic_replaces(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "f.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and sorted(x.name for x in p.parent.iterdir()) == ["f.json"]


def test_server_weights_of_a_sparse_downlink_survive_a_restart(tmp_path: Path) -> None:
    import numpy as np

    from aggregator.globals import GlobalModel
    from fedmq.codecs import parse_pipeline
    from fedmq.tasks import get_task
    from fedmq.topics import Topics

    def model() -> GlobalModel:
        return GlobalModel(task=get_task("digits-mlp"), store=Store(root=tmp_path),
                           downlink_delta=parse_pipeline("topk:0.05+int8+zstd"))  # fmt: skip

    def publish(g: GlobalModel) -> None:
        pub = g.publication(Topics(job="j"), limit=65536, publish_onnx=False)
        g.store.save_manifest(pub.version, pub.manifest)

    g = model()
    g.load_or_init()
    publish(g)
    assert g.server is None  # version 0 is published whole
    g.advance({k: w + 0.01 for k, w in g.base_weights.items()}, round_id=1)
    publish(g)
    own = g.base_weights
    assert g.server is not None and any(
        not np.array_equal(own[k], g.weights[k]) for k in own
    )  # a 5% delta left most of the change for later
    again = model()
    again.load_or_init()  # a restart
    assert again.version == 1
    for k in own:
        np.testing.assert_array_equal(again.base_weights[k], own[k])
        np.testing.assert_array_equal(again.weights[k], g.weights[k])


def test_keep_versions_must_leave_the_committed_version(tmp_path: Path) -> None:
    import pytest

    from aggregator.settings import AggregatorSettings

    with pytest.raises(ValueError, match="keep_versions"):
        AggregatorSettings(keep_versions=1, state_dir=tmp_path, insecure=True)
    assert AggregatorSettings(keep_versions=2, state_dir=tmp_path, insecure=True).keep_versions == 2

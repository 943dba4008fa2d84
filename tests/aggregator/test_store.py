"""The aggregator's state directory: atomic files, versions, history."""

from __future__ import annotations

from pathlib import Path

from aggregator.store import Store
from fedmq.atomicfile import write_atomic


def test_versions_history_state(tmp_path: Path) -> None:
    s = Store(root=tmp_path, keep_versions=2)
    for v in range(4):
        s.save_version(v, weights=b"w%d" % v, manifest=b"m%d" % v, onnx=b"o" if v else None)
    assert s.versions() == [2, 3]
    assert s.load_version(3) == (b"w3", b"m3", b"o")
    s.append_round({"round": 1})
    s.append_round({"round": 2})
    assert [r["round"] for r in Store(root=tmp_path).history()] == [1, 2]
    assert s.load_state() is None
    s.save_state({"next_round": 3})
    assert s.load_state() == {"next_round": 3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_incomplete_version_is_ignored(tmp_path: Path) -> None:
    s = Store(root=tmp_path)
    (s.versions_dir / "000005.weights").write_bytes(b"half written, no manifest")
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

    def model() -> GlobalModel:
        return GlobalModel(task=get_task("digits-mlp"), store=Store(root=tmp_path),
                           downlink_delta=parse_pipeline("topk:0.05+int8+zstd"))  # fmt: skip

    g = model()
    g.load_or_init()
    assert g.server is None  # version 0 is published whole
    g.advance({k: w + 0.01 for k, w in g.base_weights.items()}, round_id=1)
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

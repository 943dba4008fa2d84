"""The optional central test set (eval_data): its sources, the errors a user can hit, and
the finiteness check that stays without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.evalset import central_test_set
from aggregator.globals import GlobalModel, ModelRefused
from aggregator.store import Store
from fedmq.codecs import parse_pipeline
from fedmq.config import ConfigError
from fedmq.tasks import get_task

TASK = get_task("digits-mlp")  # input (64,), 10 classes


def test_sources_of_the_central_test_set(tmp_path: Path) -> None:
    assert central_test_set(TASK, "none") is None
    x, y = central_test_set(TASK, "")  # type: ignore[misc]
    assert x.shape[1:] == (64,) and len(x) == len(y) > 0
    path = tmp_path / "held.npz"
    np.savez(path, x=np.ones((5, 64), np.float64), y=np.arange(5))
    x, y = central_test_set(TASK, str(path))  # type: ignore[misc]
    assert (x.dtype, y.dtype, len(x)) == (np.float32, np.int64, 5)
    csv = tmp_path / "held.csv"  # any source a device's --data takes
    csv.write_text(",".join([*(f"p{i}" for i in range(64)), "label"]) + "\n"
                   + ",".join(["0.5"] * 64 + ["7"]) + "\n")  # fmt: skip
    x, y = central_test_set(TASK, str(csv))  # type: ignore[misc]
    assert x.shape == (1, 64) and y.tolist() == [7]


@pytest.mark.parametrize(("arrays", "says"), [
    ({"x": np.ones((5, 64))}, "needs arrays 'x' and 'y'"),
    ({"x": np.ones((5, 63)), "y": np.zeros(5, int)}, "shape (63,)"),
    ({"x": np.ones((0, 64)), "y": np.zeros(0, int)}, "no examples"),
    ({"x": np.ones((5, 64)), "y": np.full(5, 10)}, "outside task digits-mlp's classes 0..9"),
    ({"x": np.ones((5, 64)), "y": np.zeros(4, int)}, "y has 4 labels"),
    ({"x": np.full((5, 64), np.nan), "y": np.zeros(5, int)}, "NaN or infinite"),
    ({"x": np.array([[object()]] * 5, dtype=object), "y": np.zeros(5, int)}, "cannot read"),
])  # fmt: skip
def test_a_file_that_cannot_be_the_test_set_is_one_line(tmp_path: Path, arrays: dict,
                                                        says: str) -> None:  # fmt: skip
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as err:
        central_test_set(TASK, str(path))
    text = str(err.value)
    assert text.startswith(f"eval_data {path}: ") and says in text and "\n" not in text


def test_not_an_npz_names_the_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.npz", tmp_path / "text.npz"):
        if path.name == "text.npz":
            path.write_text("x,y\n1,2\n")
        with pytest.raises(ConfigError, match=str(path)):
            central_test_set(TASK, str(path))


def test_without_a_test_set_versions_carry_no_metrics_and_stay_finite(tmp_path: Path) -> None:
    model = GlobalModel(task=TASK, store=Store(root=tmp_path), downlink=parse_pipeline("float32"),
                        eval_data="none")  # fmt: skip
    model.load_or_init()
    assert model.version == 0 and model.metrics == {}
    # finite weights whose outputs overflow: no test set's loss to catch it, the probe does
    huge = {k: np.full_like(w, 3e38) for k, w in model.weights.items()}
    with pytest.raises(ModelRefused, match="probe"):
        model.advance(huge, round_id=1)
    assert model.version == 0
    model.advance({k: w + 0.01 for k, w in model.weights.items()}, round_id=2)
    assert model.version == 1 and model.metrics == {} and model.onnx

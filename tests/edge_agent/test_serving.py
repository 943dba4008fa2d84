"""What a device serves: verification of a new ONNX model, the atomic swap and its pointer,
the local API on a Unix socket, `fedmq predict` and the imports of that path. Pure or
in-process: no broker."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from edge_agent import serving as serving_mod
from edge_agent.device_serving import DeviceServing
from edge_agent.serving import POINTER, Refused, Serving, ServingDir, Spec, verify_onnx
from edge_agent.serving_api import PredictAPI, check_socket_path
from edge_agent.settings import AgentSettings
from edge_agent.state import DeviceStore
from fedmq.cli import main
from fedmq.tasks import get_task
from tests.edge_agent.onnx_models import linear_onnx, random_linear

SPEC = Spec(task="digits-mlp", input_shape=(64,), num_classes=10)
X = np.random.default_rng(5).random((20, 64), dtype=np.float32)


# ------------------------------------------------------------------ verification


def test_a_good_model_is_verified_on_local_inputs_and_on_the_probe_batch() -> None:
    for inputs in (X, None, X[:0]):
        model = verify_onnx(random_linear(), SPEC, inputs=inputs)
        assert model.logits(X).shape == (20, 10)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (b"\x08\x07 not an onnx model", "cannot be loaded"),
        (random_linear()[:-40], "cannot be loaded"),  # truncated
        (random_linear(features=32), "does not fit"),  # wrong input shape
        (random_linear(features=8, input_dims=["batch", 8, 8]), "rank 3"),
        (random_linear(input_dims=[1, 64]), "batch dimension is fixed"),
        (random_linear(input_type=TensorProto.INT64), "tensor(int64)"),
        (random_linear(classes=3), "output is [20, 3]"),
        (linear_onnx(np.ones((64, 10)), np.full(10, np.nan)), "not finite"),
        (linear_onnx(np.full((64, 10), 3e38), np.zeros(10)), "not finite"),  # overflows
    ],
)
def test_a_model_that_must_not_be_served_is_refused_with_its_reason(model: bytes, why: str) -> None:
    with pytest.raises(Refused) as err:
        verify_onnx(model, SPEC, inputs=X)
    assert why in err.value.reason and err.value.code == "bad_onnx"


def test_a_model_with_free_feature_dimensions_is_judged_by_what_it_outputs() -> None:
    verify_onnx(random_linear(input_dims=["batch", "features"]), SPEC, inputs=X)
    with pytest.raises(Refused, match="fails on local inputs"):
        verify_onnx(random_linear(features=32, input_dims=["n", "f"]), SPEC, inputs=X)


def test_inputs_are_shaped_and_bounded_as_the_task_needs() -> None:
    img = Spec(task="mnist-cnn", input_shape=(1, 28, 28), num_classes=10)
    assert img.batch(np.zeros((1, 28, 28)), max_rows=4).shape == (1, 1, 28, 28)
    assert img.batch(np.zeros((3, 784)), max_rows=4).shape == (3, 1, 28, 28)
    for bad, why in [([[1.0, 2.0]], "fit neither"), (np.zeros((5, 784)), "1 to 4"),
                     ([[float("nan")] * 784], "finite"), ([[1, "a"]], "numeric"),
                     ([[1.0], [1.0, 2.0]], "numeric")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            img.batch(bad, max_rows=4)


# ------------------------------------------------------------------ the swap


def test_a_refused_model_keeps_the_previous_one_serving(tmp_path: Path) -> None:
    s = Serving(root=tmp_path, spec=SPEC)
    s.offer(random_linear(seed=1), version=1, source="global", inputs=X)
    before = s.predict(X)
    with pytest.raises(Refused):
        s.offer(random_linear(classes=3), version=2, source="global", inputs=X)
    assert s.predict(X) == before and before is not None and before["version"] == 1
    assert ServingDir(tmp_path).read_pointer()["version"] == 1  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir())[0].startswith("1-")


def test_a_crash_at_any_step_of_the_swap_leaves_the_old_or_the_new_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = random_linear(seed=1), random_linear(seed=2)
    s = Serving(root=tmp_path, spec=SPEC)
    s.offer(old, version=1, source="global", inputs=X)
    want_old = s.predict(X)

    real = serving_mod.write_atomic

    class Crash(Exception):
        pass

    def crash_at(name: str) -> Any:
        def write(path: Path, data: bytes) -> None:
            if path.name.endswith(name):
                raise Crash(path)
            real(path, data)

        return write

    # a crash while the new model's file is written, then before the pointer's rename
    for step in (".onnx", POINTER):
        monkeypatch.setattr(serving_mod, "write_atomic", crash_at(step))
        with pytest.raises(Crash):
            Serving(root=tmp_path, spec=SPEC).offer(new, version=2, source="global", inputs=X)
        again = Serving(root=tmp_path, spec=SPEC)
        again.restore(X)
        assert again.predict(X) == want_old
    monkeypatch.setattr(serving_mod, "write_atomic", real)

    # a crash after the pointer's rename, before the old file is removed: the new one
    monkeypatch.setattr(Path, "unlink", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        Serving(root=tmp_path, spec=SPEC).offer(new, version=2, source="global", inputs=X)
    monkeypatch.undo()
    again = Serving(root=tmp_path, spec=SPEC)
    again.restore(X)
    got = again.predict(X)
    assert got is not None and got["version"] == 2 and got != want_old
    # the next swap removes what no pointer names
    again.offer(random_linear(seed=3), version=3, source="global", inputs=X)
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.onnx")] == ["3"]


def test_a_restart_serves_nothing_from_a_pointer_it_cannot_trust(tmp_path: Path) -> None:
    s = Serving(root=tmp_path, spec=SPEC)
    s.offer(random_linear(), version=4, source="global", inputs=X)
    (model_file,) = tmp_path.glob("*.onnx")
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(Refused) as err:
        Serving(root=tmp_path, spec=SPEC).restore(X)
    assert err.value.code == "bad_payload"
    other = Spec(task="mnist-2nn", input_shape=(784,), num_classes=10)
    with pytest.raises(Refused, match="for task digits-mlp"):
        Serving(root=tmp_path, spec=other).restore()
    for bad in (b"{not json", b'{"file": "../../etc/passwd", "version": 1}', b"[]"):
        (tmp_path / POINTER).write_bytes(bad)
        with pytest.raises(Refused, match="cannot be read as a serving pointer"):
            Serving(root=tmp_path, spec=SPEC).restore()


# ------------------------------------------------------------------ the local API


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fq", dir="/tmp"))  # a short path: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(path: Path, method: str, url: str, body: bytes | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, Any]]:  # fmt: skip
    conn = UnixHTTP(path, timeout)
    try:
        conn.request(method, url, body=body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_the_api_answers_health_and_predictions_and_bounds_requests(
    tmp_path: Path, sock_dir: Path
) -> None:
    s = Serving(root=tmp_path / "serving", spec=SPEC)
    sock = sock_dir / "api.sock"
    api = PredictAPI(serving=s, path=sock, max_batch=8, max_request_bytes=64 * 1024)
    api.start()
    try:
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        assert call(sock, "GET", "/health") == (503, {"status": "no_model", "task": "digits-mlp"})
        body = json.dumps({"inputs": X[:3].tolist()}).encode()
        assert call(sock, "POST", "/predict", body)[0] == 503
        s.offer(random_linear(seed=1), version=7, source="global", inputs=X)
        code, health = call(sock, "GET", "/health")
        assert code == 200 and health["version"] == 7 and health["status"] == "serving"
        code, out = call(sock, "POST", "/predict", body)
        assert code == 200 and out["version"] == 7 and len(out["predictions"]) == 3
        assert out == s.predict(X[:3])
        one = call(sock, "POST", "/predict", json.dumps({"inputs": X[0].tolist()}).encode())
        assert one[1]["predictions"] == out["predictions"][:1]
        # the attacks: too large, too many, not JSON, NaN, the wrong shape, no length
        big = b'{"inputs": [' + b"0," * 40_000 + b"0]}"
        assert call(sock, "POST", "/predict", big)[0] == 413
        many = json.dumps({"inputs": np.zeros((9, 64)).tolist()}).encode()
        assert call(sock, "POST", "/predict", many)[0] == 400
        for bad in (b"{", b'{"inputs": [NaN]}', b'{"x": 1}', b'{"inputs": [[1, 2]]}',
                    b"{\"inputs\": " + b"[" * 20_000 + b"]" * 20_000 + b"}"):  # fmt: skip
            code, err = call(sock, "POST", "/predict", bad)
            assert code == 400 and err["error"], bad[:20]
        conn = UnixHTTP(sock)
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        assert conn.getresponse().status == 411
        conn.close()
        assert call(sock, "GET", "/nothing")[0] == 404
        # a caller that connects and says nothing does not hold the API for the others
        # (it is dropped after REQUEST_TIMEOUT_S = 5 s; the others are answered meanwhile)
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(sock))
        assert call(sock, "GET", "/health", timeout=2.0)[0] == 200
        idle.close()
        # a second agent on the same socket is refused; a stale file is replaced
        with pytest.raises(OSError, match="another process serves"):
            PredictAPI(serving=s, path=sock, max_batch=8, max_request_bytes=1024).start()
    finally:
        api.stop()
    assert not sock.exists()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    again = PredictAPI(serving=s, path=sock, max_batch=8, max_request_bytes=1024)
    again.start()
    assert call(sock, "GET", "/health")[0] == 200
    again.stop()
    with pytest.raises(ValueError, match="serve_socket"):
        check_socket_path(Path("/tmp") / ("x" * 120))


# ------------------------------------------------------------------ fedmq predict


def test_fedmq_predict_runs_the_served_model_on_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    s = Serving(root=state / "dev-1" / "serving", spec=SPEC)
    s.offer(random_linear(seed=1), version=3, source="global", inputs=X)
    want = s.predict(X)
    assert want is not None
    np.savez(tmp_path / "in.npz", x=X)
    np.save(tmp_path / "in.npy", X)
    (tmp_path / "in.csv").write_text(
        ",".join(f"p{i}" for i in range(64)) + "\n"
        + "\n".join(",".join(str(v) for v in row) for row in X.tolist()) + "\n"
    )  # fmt: skip
    (tmp_path / "bare.csv").write_text(
        "\n".join(",".join(str(v) for v in row) for row in X.tolist()) + "\n"
    )  # fmt: skip
    # a --data file of the device: a label column, and X/y in an npz
    (tmp_path / "labelled.csv").write_text(
        ",".join(f"p{i}" for i in range(32)) + ",label," + ",".join(f"q{i}" for i in range(32))
        + "\n" + "\n".join(",".join(str(v) for v in [*row[:32], 3, *row[32:]])
                            for row in X.tolist()) + "\n"
    )  # fmt: skip
    np.savez(tmp_path / "labelled.npz", X=X, y=np.zeros(len(X), np.int64))
    for name in ("in.npz", "in.npy", "in.csv", "bare.csv", "labelled.csv", "labelled.npz"):
        argv = ["predict", str(tmp_path / name), "--state-dir", str(state), "--device", "dev-1"]
        assert main([*argv, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["predictions"] == want["predictions"] and out["version"] == 3, name
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "version 3" in lines[0] and len(lines) == 2 + len(X)
    assert lines[2].split("\t")[1] == str(want["predictions"][0])
    # what a user can get wrong: one line, its exit code
    np.save(tmp_path / "bad.npy", np.zeros((2, 3)))
    for args, code, why in [
        ([str(tmp_path / "bad.npy"), "--state-dir", str(state), "--device", "dev-1"], 2, "fit"),
        ([str(tmp_path / "none.npz"), "--state-dir", str(state)], 2, "cannot read"),
        ([str(tmp_path / "in.npz"), "--state-dir", str(tmp_path / "empty")], 5, "no verified"),
    ]:
        assert main(["predict", *args]) == code
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err


def test_the_serving_path_imports_no_torch_and_no_dataset(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Serving(root=state / "d" / "serving", spec=SPEC).offer(
        random_linear(), version=1, source="global", inputs=X
    )
    np.save(tmp_path / "in.npy", X)
    code = (
        "import sys\n"
        "from fedmq.cli import main\n"
        "import edge_agent.agent, edge_agent.device_serving, edge_agent.serving_api\n"
        f"assert main(['predict', {str(tmp_path / 'in.npy')!r}, '--state-dir', "
        f"{str(state)!r}, '--device', 'd', '--json']) == 0\n"
        "heavy = {'torch', 'sklearn', 'mlxtend', 'scipy', 'pandas', 'onnx'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    assert json.loads(out.splitlines()[0])["version"] == 1
    assert out.splitlines()[-1] == "[]"


def test_verifying_on_the_probe_batch_imports_no_numpy_random(tmp_path: Path) -> None:
    """An inference-only device with no data verifies each model on the probe batch; that
    batch is made without numpy.random, whose import is ~7 MB resident (docs/devices.md,
    "Footprint")."""
    (tmp_path / "m.onnx").write_bytes(random_linear())
    code = (
        "import sys\n"
        "import edge_agent.agent, edge_agent.device_serving, edge_agent.serving_api\n"
        "from edge_agent.serving import Serving, Spec\n"
        f"s = Serving(root={str(tmp_path / 'serving')!r}, spec=Spec('digits-mlp', (64,), 10))\n"
        f"data = open({str(tmp_path / 'm.onnx')!r}, 'rb').read()\n"
        "print(s.offer(data, version=3, source='global').version)\n"
        "print(sorted(m for m in sys.modules if m.startswith('numpy.random')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()  # fmt: skip
    assert out == ["3", "[]"]


def test_a_socket_path_too_long_is_a_config_error_unless_it_is_the_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ValueError, match="set serve_socket"):
        AgentSettings(insecure=True, state_dir=tmp_path, serve_socket=deep / "api.sock")
    settings = AgentSettings(insecure=True, state_dir=deep, task="digits-mlp")
    refusals: list[tuple[str, str]] = []
    ds = DeviceServing(settings=settings, task=get_task("digits-mlp"),
                       store=DeviceStore(root=deep / "device-0"), threads=1, x=X[:0],
                       log=logging.LoggerAdapter(logging.getLogger("t")),
                       refuse=lambda code, why: refusals.append((code, why)))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        ds.start()
    assert ds.api is None and not refusals and "no prediction API" in caplog.text
    assert ds.offer(random_linear(), version=0, source="global") and ds.version == 0
    ds.stop()

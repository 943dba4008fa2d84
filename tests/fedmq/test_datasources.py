"""Every data format a device can bring loads, and every broken file is one line naming it."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmq.config import ConfigError
from fedmq.datasources import load_data
from fedmq.importspec import is_import_spec
from fedmq.tasks import Task


def _model() -> object:
    raise AssertionError("loading data must not build a model")


IMG = Task(name="img", num_classes=3, input_shape=(1, 4, 4), build_model=_model,
           labels=("cat", "dog", "owl"))  # fmt: skip
GREY = Task(name="grey", num_classes=3, input_shape=(1, 4, 4), build_model=_model)
FLAT = Task(name="flat", num_classes=3, input_shape=(6,), build_model=_model)


def _xy(n: int = 12, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, d)), np.arange(n) % 3


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


# -- each format loads ---------------------------------------------------------------------


def test_npz_with_x_y_or_capital_x_loads_and_is_reshaped_to_the_input_shape(
    tmp_path: Path,
) -> None:
    x, y = _xy()
    for key in ("x", "X"):
        got_x, got_y = load_data(str(_npz(tmp_path / f"{key}.npz", **{key: x, "y": y})),
                                 task=IMG)  # fmt: skip
        assert got_x.dtype == np.float32 and got_x.shape == (12, 1, 4, 4)
        assert got_y.dtype == np.int64 and got_y.tolist() == y.tolist()
        np.testing.assert_allclose(got_x.reshape(12, 16), x, rtol=1e-6)


def test_a_file_whose_name_looks_like_a_module_spec_is_a_file(tmp_path: Path) -> None:
    x, y = _xy()
    path = _npz(tmp_path / "12:30.npz", x=x, y=y)
    assert load_data(str(path), task=IMG)[0].shape == (12, 1, 4, 4)


def test_npz_string_labels_map_through_the_task_labels(tmp_path: Path) -> None:
    x, _ = _xy(3)
    path = _npz(tmp_path / "d.npz", x=x, y=np.array(["owl", "cat", "1"]))
    assert load_data(str(path), task=IMG)[1].tolist() == [2, 0, 1]


def test_csv_with_a_label_column_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,kind,c,d,e,f\n1,2,0,3,4,5,6\n\n6,5,2,4,3,2,1\n")
    x, y = load_data(str(path), task=FLAT, label_column="kind")
    assert x.shape == (2, 6) and x[1].tolist() == [6, 5, 4, 3, 2, 1] and y.tolist() == [0, 2]
    named = tmp_path / "named.csv"
    named.write_text("label," + ",".join("abcd" * 4) + "\ndog," + ",".join(["0.5"] * 16) + "\n")
    x, y = load_data(str(named), task=IMG)
    assert x.shape == (1, 1, 4, 4) and y.tolist() == [1]


def test_image_folders_are_converted_resized_and_labelled_by_folder(tmp_path: Path) -> None:
    from PIL import Image

    for label, colour in (("cat", (255, 255, 255)), ("owl", (0, 0, 0))):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.new("RGB", (9, 7), colour).save(tmp_path / "imgs" / label / "a.png")
    (tmp_path / "imgs" / "owl" / "notes.txt").write_text("not an image: skipped")
    x, y = load_data(str(tmp_path / "imgs"), task=IMG)
    assert x.shape == (2, 1, 4, 4) and y.tolist() == [0, 2]
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], 0.0)
    rgb = Task(name="rgb", num_classes=3, input_shape=(3, 5, 5), build_model=_model,
               labels=IMG.labels)  # fmt: skip
    assert load_data(str(tmp_path / "imgs"), task=rgb)[0].shape == (2, 3, 5, 5)


def _pair() -> tuple[np.ndarray, np.ndarray]:
    return _xy(5, 6)


def _batches() -> object:
    for seed in range(3):
        yield _xy(4, 6, seed)


def test_python_sources_module_or_file_pair_or_batches(tmp_path: Path) -> None:
    x, y = load_data("tests.fedmq.test_datasources:_pair", task=FLAT)
    assert x.shape == (5, 6) and y.tolist() == [0, 1, 2, 0, 1]
    x, y = load_data("tests.fedmq.test_datasources:_batches", task=FLAT)
    assert x.shape == (12, 6) and len(y) == 12
    source = tmp_path / "sensor.py"
    source.write_text("import numpy as np\nDATA = (np.ones((2, 6)), [1, 2])\n")
    x, y = load_data(f"{source}:DATA", task=FLAT)
    assert x.shape == (2, 6) and y.tolist() == [1, 2]


def test_a_module_source_is_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_sensor_mod.py").write_text(
        "import numpy as np\ndef read():\n    return np.zeros((3, 6)), [0, 0, 1]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert load_data("my_sensor_mod:read", task=FLAT)[1].tolist() == [0, 0, 1]


def test_spec_forms() -> None:
    assert is_import_spec("pkg.mod:attr") and is_import_spec("a/b.py:fn")
    assert not is_import_spec("data.npz") and not is_import_spec("C:data.csv")
    assert not is_import_spec("pkg.mod:") and not is_import_spec("a:b/c")


# -- each broken file is one line naming it ------------------------------------------------


def _write(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    return make


def _npz_of(**arrays: object) -> Callable[[Path], Path]:
    return lambda root: _npz(root / "d.npz", **arrays)


def _image_dir(folder: str, data: bytes | None = None) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        from PIL import Image

        (root / "imgs" / folder).mkdir(parents=True)
        if data is None:
            Image.new("L", (4, 4)).save(root / "imgs" / folder / "a.png")
        else:
            (root / "imgs" / folder / "a.png").write_bytes(data)
        return root / "imgs"

    return make


X6 = np.zeros((4, 6))
BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda root: root / "nope.npz", "no such file"),
    "missing folder or file": (lambda root: root / "nope", "no such file or directory"),
    "unknown format": (_write("d.txt", "1,2"), "unknown format"),
    "not a zip": (_write("d.npz", b"garbage"), "not a .npz file"),
    "no y": (_npz_of(x=X6), "needs arrays 'x' and 'y'"),
    "pickled objects": (
        _npz_of(x=np.array([{"a": 1}] * 4, dtype=object), y=[0] * 4),
        "cannot read it as .npz",
    ),
    "lengths differ": (_npz_of(x=X6, y=[0, 1, 2]), "x has 4 examples but y has 3"),
    "empty": (_npz_of(x=np.zeros((0, 6)), y=np.zeros(0, dtype=int)), "no examples"),
    "wrong shape": (_npz_of(x=np.zeros((4, 5)), y=[0] * 4), "takes (6,)"),
    "not finite": (_npz_of(x=np.array([[0.0] * 6, [np.nan] * 6]), y=[0, 1]), "example 1"),
    "strings as x": (_npz_of(x=np.full((2, 6), "a"), y=[0, 1]), "x must be numeric"),
    "label too big": (_npz_of(x=X6, y=[0, 1, 3, 0]), "label 3 (example 2) is outside"),
    "negative label": (_npz_of(x=X6, y=[0, -1, 0, 0]), "label -1"),
    "fractional label": (_npz_of(x=X6, y=[0.5, 1, 0, 0]), "whole numbers"),
    "unknown label name": (_npz_of(x=X6, y=["0", "1", "zebra", "2"]), "label 'zebra'"),
    "csv without label column": (
        _write("d.csv", "a,b,c,d,e,f,g\n1,2,3,4,5,6,7\n"),
        "no label column 'label'",
    ),
    "csv word in a feature": (_write("d.csv", "label,a,b,c,d,e,f\n1,2,x,4,5,6,7\n"), "line 2"),
    "csv ragged line": (_write("d.csv", "label,a,b,c,d,e,f\n1,2,3\n"), "line 2 has 3 fields"),
    "csv empty": (_write("d.csv", ""), "empty file"),
    "csv header only": (_write("d.csv", "label,a,b,c,d,e,f\n"), "no examples"),
    "csv not text": (_write("d.csv", b"\xff\xfe\x00label"), "cannot read it as CSV"),
    "image folder not a label": (_image_dir("zebra"), "folder name 'zebra'"),
    "broken image": (_image_dir("1", b"not a png"), "cannot read the image"),
    "no class folders": (
        lambda root: (root / "imgs").mkdir() or root / "imgs",
        "no class subfolders",
    ),
    "empty class folders": (
        lambda root: (root / "imgs" / "1").mkdir(parents=True) or root / "imgs",
        "no images",
    ),
    "not an image task": (_image_dir("1"), "is not an image"),
    "source missing module": (lambda root: Path("no_such_module_xyz:read"), "cannot import"),
    "source missing attribute": (
        lambda root: Path("tests.fedmq.test_datasources:nope"),
        "has no attribute",
    ),
    "source raises": (
        _write("s.py", "def read():\n    raise OSError('sensor unplugged')\n"),
        "sensor unplugged",
    ),
    "source gives a number": (_write("s.py", "def read():\n    return 42\n"), "gave a int"),
    "source gives bad batches": (
        _write("s.py", "def read():\n    yield 1\n"),
        "batch 0 is not an (x, y) pair",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_source_is_one_line_naming_it(case: str, tmp_path: Path) -> None:
    make, expected = BROKEN[case]
    path = make(tmp_path)
    spec = f"{path}:read" if path.suffix == ".py" else str(path)
    task = GREY if path.name == "imgs" and case != "not an image task" else FLAT
    with pytest.raises(ConfigError) as err:
        load_data(spec, task=task)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    named = spec.split(":")[0] if path.suffix == ".py" else spec
    assert named in message or os.path.dirname(spec) in message, message


class _Boom:
    """Unpickling it writes a file: code run by loading data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path, str]]:
        return (Path.write_text, (self.marker, "pwned"))


def test_npz_never_unpickles(tmp_path: Path) -> None:
    # the attack: a .npz whose x is a pickle that runs code when loaded
    marker = tmp_path / "ran"
    np.savez(tmp_path / "evil.npz", x=np.array([_Boom(marker)], dtype=object), y=[0])
    pickle.loads(pickle.dumps(_Boom(tmp_path / "probe")))  # the payload does run when unpickled
    assert (tmp_path / "probe").exists()
    with pytest.raises(ConfigError):
        load_data(str(tmp_path / "evil.npz"), task=FLAT)
    assert not marker.exists()


def test_image_folders_without_pillow_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmq.cli_errors import missing_package

    (tmp_path / "imgs" / "0").mkdir(parents=True)
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(ImportError) as err:
        load_data(str(tmp_path / "imgs"), task=FLAT)
    fatal = missing_package(err.value)
    assert fatal is not None and "'images' extra" in fatal.message and fatal.exit_code == 5


def test_a_data_path_in_toml_is_relative_to_the_file_as_every_path(tmp_path: Path) -> None:
    from edge_agent.settings import AgentSettings
    from fedmq.config import load_settings

    def loaded(data: str, eval_data: str) -> AgentSettings:
        toml = tmp_path / "etc" / "agent.toml"
        toml.parent.mkdir(exist_ok=True)
        toml.write_text(f"insecure = true\ndata = {data!r}\neval_data = {eval_data!r}\n")
        return load_settings(AgentSettings, sections=("agent",), config_file=toml, environ={})

    s = loaded("readings.npz", "src/sensor.py:read")
    assert s.data == str(tmp_path / "etc" / "readings.npz")
    assert s.eval_data == str(tmp_path / "etc" / "src" / "sensor.py") + ":read"
    s = loaded("/srv/d.csv", "my_pkg.sensor:read")  # absolute, and a module: as given
    assert (s.data, s.eval_data) == ("/srv/d.csv", "my_pkg.sensor:read")
    flags = load_settings(AgentSettings, sections=("agent",), environ={},
                          flags={"data": "here.npz", "insecure": True})  # fmt: skip
    assert flags.data == "here.npz"  # a flag is relative to the working directory

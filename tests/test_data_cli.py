"""`fedmq agent --data`, as an operator meets it: the installed console script, run from
the operator's own directory, finds a task and a data source there; a broken data file
ends the command with one line naming it (exit 2), a missing Pillow names its extra (5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker import free_port
from fedmq.cli_errors import EXIT_CONFIG, EXIT_NO_BROKER, EXIT_NOT_READY

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmq", "edge_agent", "aggregator", "broker", "firmware_profiles")
CONSOLE_SCRIPT = "import sys\nfrom fedmq.cli import main\nsys.exit(main())\n"
BLOCK_PIL = ("import sys\nsys.modules['PIL'] = None\n"  # as on an install without Pillow
             "from fedmq.cli import main\nsys.exit(main())\n")  # fmt: skip


def _console_script(tmp: Path) -> Path:
    """The installed `fedmq` script where there is one, else the same three lines: run as
    a file, its own directory (not the working directory) heads sys.path."""
    installed = Path(sys.executable).with_name("fedmq")
    if installed.is_file():
        return installed
    script = tmp / "bin" / "fedmq"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(CONSOLE_SCRIPT)
    return script


def _env(tmp: Path) -> dict[str, str]:
    """The environment with fedmq's packages importable and the repository not on sys.path
    (so `examples` is found only where the operator runs the command)."""
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    for name in PACKAGES:
        (site / name).symlink_to(REPO / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(site)}


def _run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_the_installed_command_finds_the_task_and_data_source_where_it_is_run(
    tmp_path: Path,
) -> None:
    project = tmp_path / "my-fleet"
    (project / "examples").mkdir(parents=True)
    for name in ("digits_cnn.py", "device_data.py"):
        shutil.copy(REPO / "examples" / name, project / "examples" / name)
    closed = free_port()
    argv = [str(_console_script(tmp_path)), "agent", "--insecure", "--device-id", "d0",
            "--task", "examples.digits_cnn:TASK",
            "--data", "examples/device_data.py:stream", "--state-dir", str(tmp_path / "s"),
            "--port", str(closed), "--connect-timeout-s", "1"]  # fmt: skip
    env = _env(tmp_path)
    got = _run(argv, cwd=project, env=env)
    # the task and the data loaded and the model was built: what stops it is the broker
    assert got.returncode == EXIT_NO_BROKER, got.stderr
    assert "No module named" not in got.stderr
    # and a spec naming nothing there is refused in one line
    got = _run([*argv[:6], "examples.nope:TASK", *argv[7:]], cwd=project, env=env)
    assert got.returncode == EXIT_CONFIG
    assert got.stderr.strip().splitlines()[-1].startswith("fedmq: task spec 'examples.nope:TASK'")


def _bad_npz(tmp: Path) -> Path:
    np.savez(tmp / "bad.npz", x=np.zeros((3, 64)), y=np.array([0, 1, 10]))
    return tmp / "bad.npz"


def _no_label_csv(tmp: Path) -> Path:
    (tmp / "d.csv").write_text("a,b\n1,2\n")
    return tmp / "d.csv"


def _images(tmp: Path) -> Path:
    (tmp / "imgs" / "3").mkdir(parents=True)
    return tmp / "imgs"


CASES = {
    "label out of range": ("--data", _bad_npz, EXIT_CONFIG, "label 10 (example 2) is outside"),
    "csv without its label column": (
        "--eval-data",
        _no_label_csv,
        EXIT_CONFIG,
        "no label column 'label'",
    ),
    "images without Pillow": (
        "--data",
        _images,
        EXIT_NOT_READY,
        "pillow is not installed (it comes with fedmq's 'images' extra)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_data_file_ends_the_agent_in_one_line_naming_it(case: str, tmp_path: Path) -> None:
    flag, make, code, says = CASES[case]
    path = make(tmp_path)
    argv = ["-c", BLOCK_PIL, "agent", "--insecure", "--task", "digits-mlp", flag, str(path),
            "--state-dir", str(tmp_path / "s")]  # fmt: skip
    got = _run(argv, cwd=tmp_path, env=dict(os.environ))
    lines = got.stderr.strip().splitlines()
    assert got.returncode == code, got.stderr
    assert lines and lines[-1].startswith("fedmq: ") and says in lines[-1], got.stderr
    assert "Traceback" not in got.stderr
    if code == EXIT_CONFIG:
        assert str(path) in lines[-1]

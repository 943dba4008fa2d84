"""The fedmq command: help that explains, configuration errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from broker import free_port
from fedmq.cli import EXIT_CONFIG, EXIT_NO_BROKER, main


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_help_lists_commands_and_settings() -> None:
    out = _run("--help").stdout
    for cmd in ("demo", "aggregator", "agent", "broker", "status", "tasks", "Exit codes"):
        assert cmd in out
    agg = _run("aggregator", "--help").stdout
    assert "--devices-per-round" in agg and "quorum" in agg and "FEDMQ_" in _run("--help").stdout
    assert "--infer-only" in _run("agent", "--help").stdout


def test_tasks_lists_builtins_and_profiles() -> None:
    out = _run("tasks").stdout
    assert "mnist-2nn" in out and "rpi4" in out and "sensor-infer" in out


def test_bad_configuration_exits_2(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["aggregator", "--min-devices", "5", "--devices-per-round", "2"]) == EXIT_CONFIG
    assert "min_devices" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 'x'\n")
    assert main(["agent", "--config", str(cfg)]) == EXIT_CONFIG
    assert main(["agent", "--task", "no-such-task"]) == EXIT_CONFIG
    assert "mnist-2nn" in capsys.readouterr().err


def test_no_broker_exits_4() -> None:
    port = str(free_port())
    proc = _run("status", "--port", port, "--timeout", "1")
    assert proc.returncode == EXIT_NO_BROKER and "no broker" in proc.stderr


class _Failing:
    """A service whose run() raises what it is given."""

    def __init__(self, err: Exception) -> None:
        self.err = err

    def run(self, *, stop: object) -> int:
        raise self.err


def test_exit_2_means_configuration_only() -> None:
    import signal

    from fedmq.cli import EXIT_FAILURE, _serve
    from fedmq.config import ConfigError

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _check_serve_exit_codes(_serve, EXIT_FAILURE, ConfigError)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _check_serve_exit_codes(_serve: Any, EXIT_FAILURE: int, ConfigError: type) -> None:  # noqa: N803
    # a data problem at runtime (once "does not fit float16") is a failure, not configuration
    assert _serve(_Failing(ValueError("a value does not fit float16"))) == EXIT_FAILURE
    try:
        _serve(_Failing(ConfigError("state directory holds another task's model")))
    except ConfigError:
        pass  # main turns it into EXIT_CONFIG
    else:
        raise AssertionError("a configuration error must reach main")

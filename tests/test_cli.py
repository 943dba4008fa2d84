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
    assert main(["aggregator", "--insecure", "--min-devices", "5",
                 "--devices-per-round", "2"]) == EXIT_CONFIG  # fmt: skip
    assert "min_devices" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 'x'\n")
    assert main(["agent", "--config", str(cfg)]) == EXIT_CONFIG
    assert main(["agent", "--insecure", "--task", "no-such-task"]) == EXIT_CONFIG
    assert "mnist-2nn" in capsys.readouterr().err


def test_no_broker_exits_4() -> None:
    port = str(free_port())
    proc = _run("status", "--insecure", "--port", port, "--timeout", "1")
    assert proc.returncode == EXIT_NO_BROKER and "no broker" in proc.stderr


def test_without_credentials_every_role_refuses_to_start(capsys) -> None:  # noqa: ANN001
    for argv in (["aggregator"], ["agent"], ["status"]):
        assert main(argv) == EXIT_CONFIG
        assert "--insecure" in capsys.readouterr().err
    assert main(["broker"]) == EXIT_CONFIG  # neither --fleet nor --insecure
    assert "--fleet DIR" in capsys.readouterr().err


def test_fleet_init_add_revoke_show(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from fedmq.fleetfile import read_fleet

    fleet = tmp_path / "fleet"
    assert main(["fleet", "init", str(fleet), "--job", "plant7", "--devices", "2",
                 "--device", "cam-1:rpi5-8gb", "--host", "mqtt.plant7.lan"]) == 0  # fmt: skip
    info = read_fleet(fleet / "fleet.toml")
    assert sorted(info.devices) == ["cam-1", "device-00", "device-01"]
    assert info.devices["cam-1"].device_class == "rpi5-8gb" and info.host == "mqtt.plant7.lan"
    bundle = fleet / "bundles" / "device-00"
    for name in ("ca.crt", "client.crt", "client.key", "server-key.pub.pem", "agent.toml"):
        assert (bundle / name).exists(), name
    assert (bundle / "client.key").stat().st_mode & 0o077 == 0  # private to its owner
    assert main(["fleet", "init", str(fleet), "--job", "x"]) == EXIT_CONFIG  # never overwrites
    assert main(["fleet", "add", str(fleet), "pi-9", "--class", "rpi4"]) == 0
    assert main(["fleet", "add", str(fleet), "pi-9"]) == EXIT_CONFIG  # already enrolled
    assert main(["fleet", "add", str(fleet), "aggregator.plant7"]) == EXIT_CONFIG  # reserved
    assert main(["fleet", "revoke", str(fleet), "device-01"]) == 0
    assert read_fleet(fleet / "fleet.toml").enrolled("device-01") is None
    assert "user device-01" not in (fleet / "broker" / "acl").read_text()
    assert "user pi-9" in (fleet / "broker" / "acl").read_text()
    capsys.readouterr()
    assert main(["fleet", "show", str(fleet)]) == 0
    out = capsys.readouterr().out
    assert "device-01" in out and "revoked" in out and "pi-9" in out
    assert main(["fleet", "show", str(tmp_path / "nothing")]) == EXIT_CONFIG


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

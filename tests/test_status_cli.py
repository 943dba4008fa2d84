"""`fedmq status` and `fedmq monitor` as commands: help for every option, the exit code
of a job without status, the shared settings and their layering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedmq.cli import EXIT_CONFIG, StatusSettings, main


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("command", ["status", "monitor"])
def test_every_option_has_help(command: str) -> None:
    out = _run(command, "--help").stdout
    options = re.findall(r"^  (--[a-z-]+)(.*)$", out, flags=re.M)
    assert len(options) >= 12, out
    for flag, rest in options:
        # the help text follows the flag (and its metavar) on its line, or on the next one
        parts = re.split(r"\s{2,}", (flag + rest).strip(), maxsplit=1)
        text = parts[1] if len(parts) > 1 else out.split(flag + rest, 1)[1].splitlines()[1]
        assert text.strip() and not text.strip().startswith("(default"), (flag, text)
    if command == "status":
        assert {"--json", "--devices", "--watch", "--mqtt-version"} <= {f for f, _ in options}


def test_a_job_without_status_exits_1_over_either_protocol(plain_broker: Any) -> None:
    for version in ("5", "3.1.1"):
        proc = _run("status", "--insecure", "--host", plain_broker.host, "--port",
                    str(plain_broker.port), "--mqtt-version", version, "--job", "nobody",
                    "--timeout", "1")  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "no status for job 'nobody'" in proc.stderr


def test_the_monitor_wants_a_terminal() -> None:
    proc = _run("monitor", "--insecure", "--port", "1", "--timeout", "1")  # stdout: a pipe
    assert proc.returncode == EXIT_CONFIG and "status --watch" in proc.stderr


def test_monitor_reads_status_then_monitor_tables(tmp_path: Path, capsys: Any) -> None:
    from fedmq.config import load_settings

    cfg = tmp_path / "operator.toml"
    cfg.write_text('[status]\njob = "j"\nport = 1884\ninsecure = true\n'
                   '[monitor]\nmqtt_version = "3.1.1"\n')  # fmt: skip
    s = load_settings(StatusSettings, sections=("status", "monitor"), config_file=cfg,
                      environ={"FEDMQ_PORT": "1885"})  # fmt: skip
    assert (s.job, s.port, s.mqtt_version, s.insecure) == ("j", 1885, "3.1.1", True)
    cfg.write_text("[monitor]\nrefresh = 3\n")  # a key no view has
    assert main(["monitor", "--config", str(cfg), "--insecure"]) == EXIT_CONFIG
    assert "refresh" in capsys.readouterr().err

"""Every failure to start is one line naming its cause and a meaningful exit code: the real
`python -m fedmq` in a subprocess per case, as an operator meets it (issue 11)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker import free_port
from fedmq.cli_errors import (
    EXIT_CONFIG,
    EXIT_NO_BROKER,
    EXIT_NOT_READY,
)

# runs the CLI with some top-level modules refusing to import, as on an install without
# their extra (BLOCK_MODULES=torch,tqdm); nothing is uninstalled
BLOCKING_CLI = """
import importlib.abc, os, sys
BLOCKED = set(os.environ.get("BLOCK_MODULES", "").split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
from fedmq.cli import main
sys.exit(main())
"""
AGENT = ["agent", "--insecure", "--task", "digits-mlp", "--state-dir", "{tmp}/agent"]
# inference only: no torch to import, so the waits for a broker start sooner
WAITING_AGENT = [*AGENT, "--infer-only", "--connect-timeout-s", "1"]
AGGREGATOR = ["aggregator", "--insecure", "--task", "digits-mlp", "--state-dir", "{tmp}/agg"]
DEMO = ["demo", "--run-dir", "{tmp}/run"]


@dataclass(frozen=True)
class Case:
    argv: list[str]
    code: int
    says: str  # in the one line stderr ends with
    env: dict[str, str] = field(default_factory=dict)
    block: str = ""  # modules that refuse to import
    files: dict[str, str] = field(default_factory=dict)  # made first: name -> text


CASES = {
    # a broker that never answers: progress, then one line and exit 4
    "agent, closed port": Case([*WAITING_AGENT, "--port", "{closed}"], EXIT_NO_BROKER,
                               "no broker at 127.0.0.1:{closed} after 1 s: connection refused"),
    "agent, unknown host": Case([*WAITING_AGENT, "--host", "no-such-host.invalid"],
                                EXIT_NO_BROKER, "cannot resolve the host name"),
    "aggregator, TLS to a plain port": Case(
        [*AGGREGATOR, "--no-insecure", "--ca-file", "{ca}", "--port", "{plain}",
         "--connect-timeout-s", "1"], EXIT_NO_BROKER, "TLS handshake failed"),
    # the port of `fedmq broker` in use: the broker's own reason
    "broker, port in use": Case(["broker", "--insecure", "--port", "{busy}", "--data-dir",
                                 "{tmp}/b"], EXIT_NOT_READY, "Address already in use"),
    "embedded broker, port in use": Case(
        ["broker", "--insecure", "--broker", "embedded", "--port", "{busy}", "--data-dir",
         "{tmp}/b"], EXIT_NOT_READY, "Address already in use"),
    # a state directory that cannot be used (a file where a directory must be: root too)
    "agent, state dir under a file": Case(
        [*AGENT, "--state-dir", "{tmp}/plain-file/agents"], EXIT_NOT_READY,
        "{tmp}/plain-file is a file, not a directory", files={"plain-file": "x"}),
    "aggregator, state dir is a file": Case(
        [*AGGREGATOR, "--state-dir", "{tmp}/plain-file"], EXIT_NOT_READY,
        "is a file, not a directory; move it away or choose another with --state-dir",
        files={"plain-file": "x"}),
    "demo, run dir under a file": Case(
        [*DEMO, "--run-dir", "{tmp}/plain-file/run"], EXIT_NOT_READY,
        "choose another with --run-dir", files={"plain-file": "x"}),
    # a missing optional package: its name and the pip command
    "agent without torch": Case(AGENT, EXIT_NOT_READY, "torch is not installed (it comes "
                                "with fedmq's 'train' extra): pip install", block="torch"),
    "inference agent without onnxruntime": Case(
        [*AGENT, "--infer-only"], EXIT_NOT_READY, "onnxruntime is not installed",
        block="onnxruntime"),
    "aggregator without dp-accounting": Case(
        AGGREGATOR, EXIT_NOT_READY, "dp-accounting is not installed", block="dp_accounting"),
    "demo without tqdm": Case(DEMO, EXIT_NOT_READY, "tqdm is not installed", block="tqdm"),
    # configuration typos: exit 2 with the closest valid name
    "TOML table typo": Case([*AGENT, "--config", "{tmp}/c.toml"], EXIT_CONFIG,
                            "unknown table [agnet] (did you mean [agent]?)",
                            files={"c.toml": "[agnet]\ndevice_id = 'd3'\n"}),
    "top-level key typo": Case([*AGGREGATOR, "--config", "{tmp}/c.toml"], EXIT_CONFIG,
                               "unknown setting 'roundz' (did you mean 'rounds'?)",
                               files={"c.toml": "roundz = 3\n"}),
    "key typo in a table": Case([*AGENT, "--config", "{tmp}/c.toml"], EXIT_CONFIG,
                                "unknown key 'devise_id' (did you mean 'device_id'?) in [agent]",
                                files={"c.toml": "[agent]\ndevise_id = 'd3'\n"}),
    "environment typo": Case(AGENT, EXIT_CONFIG, "unknown variable 'FEDMQ_ROUNDZ' (did you "
                             "mean 'FEDMQ_ROUNDS'?)", env={"FEDMQ_ROUNDZ": "3"}),
    # the demo checks every argument before it starts anything
    "demo, unknown task": Case([*DEMO, "--task", "nope"], EXIT_CONFIG, "unknown task 'nope'"),
    "demo, negative rounds": Case([*DEMO, "--rounds", "-5"], EXIT_CONFIG,
                                  "--rounds must be at least 1"),
    "demo, no devices": Case([*DEMO, "--devices", "0"], EXIT_CONFIG,
                             "--devices must be at least 1"),
    "demo, bad codec": Case([*DEMO, "--codec", "int9"], EXIT_CONFIG, "codec 'int9'"),
    "demo, unreachable target": Case([*DEMO, "--target-accuracy", "2"], EXIT_CONFIG,
                                     "target_accuracy must be in [0, 1]"),
    "demo, no epochs": Case([*DEMO, "--epochs", "0"], EXIT_CONFIG, "epochs=0"),
}  # fmt: skip


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What the cases point at: a closed port, a port in use, a plain broker, a CA file."""
    from broker.mosquitto import BrokerSettings, MosquittoBroker
    from broker.provision import FleetDir

    root = tmp_path_factory.mktemp("places")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    plain = MosquittoBroker(settings=BrokerSettings(data_dir=root / "mosquitto")).start()
    fleet = FleetDir.init(root / "fleet", job="t", devices=())
    try:
        yield {"closed": free_port(), "busy": busy.getsockname()[1], "plain": plain.port,
               "ca": fleet.root / "ca" / "ca.crt"}
    finally:
        plain.stop()
        busy.close()


@pytest.mark.parametrize("name", list(CASES))
def test_a_failure_to_start_is_one_line_and_an_exit_code(
    name: str, places: dict[str, Any], tmp_path: Path
) -> None:
    case = CASES[name]
    where = {**places, "tmp": tmp_path}
    for file, text in case.files.items():
        (tmp_path / file).write_text(text)
    argv = [a.format(**where) for a in case.argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    env.update(case.env, BLOCK_MODULES=case.block)
    proc = subprocess.run([sys.executable, "-c", BLOCKING_CLI, *argv], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.code, proc.stderr
    assert lines and lines[-1].startswith("fedmq: "), proc.stderr
    assert case.says.format(**where) in lines[-1], lines[-1]
    if argv[0] == "demo":  # nothing started, nothing made
        assert not (tmp_path / "run").exists() and "started" not in proc.stdout

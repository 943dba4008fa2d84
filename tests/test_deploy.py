"""The systemd units in examples/deploy stay true to the CLI, the exit codes and the settings."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.settings import AggregatorSettings
from edge_agent.settings import AgentSettings
from fedmq.cli import build_parser
from fedmq.cli_errors import EXIT_CONFIG, EXIT_IDENTITY_IN_USE
from fedmq.config import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "examples" / "deploy"
# unit -> (the fedmq subcommand it runs, its settings, its environment file example)
UNITS = {
    "fedmq-agent.service": ("agent", AgentSettings, "agent.env"),
    "fedmq-agent@.service": ("agent", AgentSettings, "agent.env"),
    "fedmq-aggregator.service": ("aggregator", AggregatorSettings, "aggregator.env"),
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_every_unit_is_there_and_the_old_path_is_gone() -> None:
    assert sorted(p.name for p in DEPLOY.glob("*.service")) == sorted(UNITS)
    assert not (REPO_ROOT / "examples" / "fedmq-aggregator.service").exists()


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_runs_a_real_command_and_restarts_only_what_a_restart_can_fix(name: str) -> None:
    command, _, _ = UNITS[name]
    unit = parse_unit(DEPLOY / name)
    service = unit["Service"]
    argv = shlex.split(one(service, "ExecStart").replace("%i", "pi-0017"))
    # the console script pyproject installs, with flags fedmq's own parser takes
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(argv[0]).name == "fedmq" and scripts["fedmq"] == "fedmq.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    assert one(service, "Restart") == "on-failure"
    codes = {int(c) for c in one(service, "RestartPreventExitStatus").split()}
    assert codes == {EXIT_CONFIG, EXIT_IDENTITY_IN_USE}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_runs_hardened_as_its_own_user_with_its_state_directory(name: str) -> None:
    service = parse_unit(DEPLOY / name)["Service"]
    assert one(service, "User") not in ("", "root") and "DynamicUser" not in service
    assert one(service, "NoNewPrivileges") == "yes"
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "ProtectHome") == "yes" and one(service, "PrivateTmp") == "yes"
    assert one(service, "CapabilityBoundingSet") == ""
    argv = shlex.split(one(service, "ExecStart"))
    state_dir = argv[argv.index("--state-dir") + 1]
    assert state_dir == "/var/lib/" + one(service, "StateDirectory")
    assert one(service, "ReadWritePaths") == state_dir  # the one writable place
    assert one(service, "EnvironmentFile").startswith("-/etc/fedmq/")  # optional file


@pytest.mark.parametrize("name", list(UNITS))
def test_environment_file_example_names_real_settings(name: str) -> None:
    _, settings, env_file = UNITS[name]
    fields = {f.name for f in dataclasses.fields(settings)}
    names = re.findall(r"^#?FEDMQ_([A-Z_]+)=", (DEPLOY / env_file).read_text(), re.M)
    assert names and {n.lower() for n in names} <= fields


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    fedmq = Path(sys.executable).parent / "fedmq"  # the venv's console script
    if not fedmq.exists():
        pytest.skip(f"no console script at {fedmq}")
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace("/opt/fedmq/.venv/bin/fedmq", str(fedmq))
        (tmp_path / name).write_text(text)
    (tmp_path / "fedmq-agent@pi-0017.service").write_text(
        (tmp_path / "fedmq-agent@.service").read_text())  # fmt: skip
    units = [str(tmp_path / n) for n in ("fedmq-agent.service", "fedmq-agent@pi-0017.service",
                                         "fedmq-aggregator.service")]  # fmt: skip
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    # systemd only warns about an unknown or misspelt key: any output is a defect
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr

"""Settings layering: defaults < TOML < FEDMQ_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.settings import AggregatorSettings
from edge_agent.settings import AgentSettings
from fedmq.config import ConfigError, load_settings


def test_layers_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text('job = "plant7"\nport = 1884\ndevice_id = "x"\n[aggregator]\nrounds = 12\n'
                   'lr = 0.1\n[agent]\ndevice_id = "y"\n')  # fmt: skip
    env = {"FEDMQ_ROUNDS": "20", "FEDMQ_PUBLISH_ONNX": "false", "FEDMQ_INSECURE": "1",
           "OTHER_UNRELATED": "x"}
    s = load_settings(AggregatorSettings, sections=("aggregator",), config_file=cfg,
                      flags={"lr": 0.2, "seed": None}, environ=env)  # fmt: skip
    assert s.job == "plant7" and s.port == 1884  # TOML top level
    assert s.rounds == 20  # env beats TOML
    assert s.lr == 0.2  # flag beats TOML
    assert s.publish_onnx is False and s.seed == 0  # env bool; unset flag keeps default


def test_agent_section_and_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[agent]\ndevice-id = "pi-17"\nstate_dir = "/var/lib/fedmq"\n'
                   'ca_file = "bundle/ca.crt"\ncert_file = "/etc/fedmq/client.crt"\n'
                   'key_file = "client.key"\nserver_key = "server-key.pub.pem"\n')  # fmt: skip
    s = load_settings(AgentSettings, sections=("agent",), config_file=cfg, environ={})
    assert s.device_id == "pi-17" and s.state_dir == Path("/var/lib/fedmq")
    # a relative path in a TOML file is relative to that file: a bundle can move as a whole
    assert s.ca_file == tmp_path / "bundle" / "ca.crt" and s.key_file == tmp_path / "client.key"
    assert s.cert_file == Path("/etc/fedmq/client.crt")


def test_secure_by_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no broker credentials.*--insecure"):
        load_settings(AggregatorSettings, environ={})
    with pytest.raises(ConfigError, match="no broker credentials.*--insecure"):
        load_settings(AgentSettings, environ={})
    creds = {"ca_file": "ca.crt", "cert_file": "c.crt", "key_file": "c.key"}
    with pytest.raises(ConfigError, match="server_key"):  # a device pins the aggregator's key
        load_settings(AgentSettings, flags=creds, environ={})
    assert load_settings(AgentSettings, flags={**creds, "server_key": "k.pem"}, environ={})
    assert load_settings(AggregatorSettings, environ={"FEDMQ_INSECURE": "yes"}).insecure


def test_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDMQ_PORT"):
        load_settings(AggregatorSettings, environ={"FEDMQ_PORT": "eighty"})
    with pytest.raises(ConfigError, match="not a boolean"):
        load_settings(AggregatorSettings, environ={"FEDMQ_PUBLISH_ONNX": "maybe"})
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(AggregatorSettings, config_file=bad, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(AggregatorSettings, config_file=tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="min_devices"):
        load_settings(AggregatorSettings, flags={"devices_per_round": 2, "min_devices": 3,
                                                 "insecure": True}, environ={})  # fmt: skip
    typo = tmp_path / "typo.toml"
    typo.write_text("[aggregator]\nround = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'round' \(did you mean 'rounds'\?\)"):
        load_settings(AggregatorSettings, sections=("aggregator",), config_file=typo, environ={})
    with pytest.raises(ConfigError, match="device id"):
        load_settings(AgentSettings, flags={"device_id": "a/b", "insecure": True}, environ={})


@pytest.mark.parametrize(("toml", "env", "message"), [
    ("[agnet]\ndevice_id = 'x'\n", {}, r"unknown table \[agnet\] \(did you mean \[agent\]\?\)"),
    ("[nonsense]\nx = 1\n", {}, r"unknown table \[nonsense\]; tables: \[agent\], "),
    ("roundz = 3\n", {}, r"unknown setting 'roundz' \(did you mean 'rounds'\?\) at the top"),
    ("", {"FEDMQ_ROUNDZ": "3"}, r"unknown variable 'FEDMQ_ROUNDZ' \(did you mean 'FEDMQ_ROUNDS'"),
])  # fmt: skip
def test_typos_are_errors_with_the_closest_name(tmp_path: Path, toml: str, env: dict[str, str],
                                                message: str) -> None:  # fmt: skip
    cfg = tmp_path / "typo.toml"
    cfg.write_text(toml + "insecure = true\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(AgentSettings, sections=("agent",), config_file=cfg, environ=env)


def test_a_file_and_an_environment_may_serve_every_role(tmp_path: Path) -> None:
    # the top level and FEDMQ_* hold settings of any role: an aggregator's rounds do not
    # stop an agent reading the same file and environment
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("insecure = true\nrounds = 5\ndevice_id = 'd1'\n[aggregator]\nlr = 0.1\n"
                   "[status]\ntimeout = 2\n")  # fmt: skip
    env = {"FEDMQ_DEVICES_PER_ROUND": "3", "FEDMQ_ON_DONE": "idle"}
    agent = load_settings(AgentSettings, sections=("agent",), config_file=cfg, environ=env)
    assert agent.device_id == "d1" and agent.on_done == "idle"
    agg = load_settings(AggregatorSettings, sections=("aggregator",), config_file=cfg, environ=env)
    assert agg.rounds == 5 and agg.devices_per_round == 3 and agg.lr == 0.1

"""The examples stay true: configs load into valid settings, the custom task trains."""

from __future__ import annotations

from pathlib import Path

import torch

from aggregator.settings import AggregatorSettings
from edge_agent.settings import AgentSettings
from fedmq.config import load_settings
from fedmq.tasks import get_task
from fedmq.tasks.weights import evaluate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_configs_load() -> None:
    agg = load_settings(AggregatorSettings, sections=("aggregator",),
                        config_file=EXAMPLES / "aggregator.toml", environ={})  # fmt: skip
    assert agg.job == "plant7" and agg.devices_per_round == 20 and agg.over_select == 0.3
    assert agg.metrics_port == 9464 and agg.metrics_host == "127.0.0.1"
    agent = load_settings(AgentSettings, sections=("agent",),
                          config_file=EXAMPLES / "agent.toml", environ={})  # fmt: skip
    assert agent.device_id == "pi-0017" and agent.profile == "rpi4"


def test_custom_task_example_learns() -> None:
    task = get_task("examples.digits_cnn:TASK")
    torch.manual_seed(0)
    model = task.build_model()
    x, y = task.load_pool()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    xs, ys = task.load_test()
    assert evaluate(model, xs, ys)["accuracy"] > 0.5

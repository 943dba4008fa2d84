"""An agent on a real Mosquitto trains on its own --data file and reports each new version's
evaluation on its held-out share, once, with the test as the aggregator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.evaluation import EVAL_ACCURACY, EVAL_EXAMPLES, EVAL_LOSS
from fedmq.tasks import get_task
from fedmq.wire import decode_metrics
from tests.edge_agent.test_agent import digits_version, env, updates, wait_until  # noqa: F401


def test_an_agent_trains_on_its_data_file_and_reports_each_version_once(
    env: dict[str, Any],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    broker, topics = env["broker"], env["topics"]
    x, y = get_task("digits-mlp").load_test()  # real digits, standing in for a device's own
    np.savez(tmp_path / "mine.npz", x=x[:100], y=y[:100])

    def evals() -> list[Any]:
        got = [decode_metrics(p) for p in broker.recorded(topics.metrics("d1"))]
        return [m for m in got if EVAL_LOSS in m.metrics]

    broker.publish_version(digits_version(0))
    run = env["start"](data=str(tmp_path / "mine.npz"), holdout_fraction=0.2)
    (first,) = wait_until("version 0's evaluation", evals)
    assert (first.model_version, first.round_id) == (0, 0)
    assert first.metrics[EVAL_EXAMPLES] == 20 and 0 <= first.metrics[EVAL_ACCURACY] <= 1
    assert first.metrics[EVAL_LOSS] > 0

    broker.open_round(1, 0)
    (u,) = wait_until("an update for round 1", lambda: updates(env))
    assert u.num_examples == 80  # the training share: the held-out 20 are never trained on

    # a restart is handed version 0 again (retained): no second report; version 1 is new
    run.stop.set()
    run.thread.join(timeout=30)
    (tmp_path / "d1" / "model.weights").unlink()  # so that it fetches and holds v0 anew
    again = env["start"](data=str(tmp_path / "mine.npz"), holdout_fraction=0.2)
    wait_until("version 0 held again", lambda: again.agent.fetch.version == 0)
    broker.publish_version(digits_version(1, seed=4))
    reports = wait_until("version 1's evaluation", lambda: len(evals()) >= 2 and evals())
    assert [m.model_version for m in reports] == [0, 1]
    assert reports[1].metrics[EVAL_LOSS] != first.metrics[EVAL_LOSS]

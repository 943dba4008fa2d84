"""What an agent tells its operator, against a real Mosquitto with the test as the
aggregator: a broker lost and back, another agent with the same device id, and the end
of the job."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.settings import AgentSettings
from fedmq.cli_errors import EXIT_IDENTITY_IN_USE, FatalError
from fedmq.startup import TAKEOVER_WINDOW_S
from fedmq.topics import Topics
from fedmq.wire import RoundAnnouncement, TrainConfig, encode_round
from tests.edge_agent.test_agent import JOB, Broker, wait_until


class Run:
    """An agent's run() in a thread: its return value or the exception it ended with."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.result: Any = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.result = self.agent.run(stop=self.stop)
        except Exception as err:  # what the CLI would turn into its one line
            self.result = err


@pytest.fixture
def start(plain_broker: Any, topic_prefix: str, tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def make(name: str = "a", **overrides: Any) -> Run:
        options = {"device_id": "d1", "job": JOB, "prefix": topic_prefix,
                   "host": plain_broker.host, "port": plain_broker.port, "task": "digits-mlp",
                   "num_devices": 4, "insecure": True, "state_dir": tmp_path / name,
                   "torch_threads": 1, **overrides}  # fmt: skip
        settings = AgentSettings(**options)
        runs.append(Run(Agent(settings=settings)))
        return runs[-1]

    yield make
    for run in runs:
        run.stop.set()
        run.thread.join(timeout=30)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedmq.agent"]


def test_a_lost_broker_is_reported_and_so_is_its_return(
    start: Any, plain_broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedmq.agent")
    run = start()
    wait_until("connected", lambda: run.agent.link.connected, timeout=30)
    plain_broker.stop()
    wait_until("the loss reported", lambda: [m for m in _messages(caplog)
                                             if "lost" in m and "reconnecting" in m])  # fmt: skip
    plain_broker.start()  # the same port
    (back,) = wait_until("the return reported", lambda: [m for m in _messages(caplog)
                                                         if "is back after" in m])  # fmt: skip
    assert f"{plain_broker.host}:{plain_broker.port}" in back
    assert run.thread.is_alive() and run.result is None


def test_a_second_agent_with_the_same_device_id_stops_and_the_first_goes_on(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedmq.agent")
    first = start("a")
    wait_until("the first connected", lambda: first.agent.link.connected, timeout=30)
    since = time.monotonic()  # the first has been there a while when the second comes
    wait_until("the first settled", lambda: time.monotonic() - since > TAKEOVER_WINDOW_S)
    second = start("b")  # same device id d1, a state directory of its own
    second.thread.join(timeout=60)
    assert isinstance(second.result, FatalError), second.result
    assert second.result.exit_code == EXIT_IDENTITY_IN_USE
    assert "another client is" in second.result.message
    assert "connected as device d1" in second.result.message
    # the first, dropped when the second came, took its session back and keeps serving
    wait_until("the first connected again", lambda: first.agent.link.connected, timeout=30)
    assert first.thread.is_alive() and first.result is None


def _done_round(topics: Topics, round_id: int) -> bytes:
    now = time.time()
    return encode_round(RoundAnnouncement(
        job=JOB, round_id=round_id, model_version=round_id - 1, state="closed", opened_at=now,
        deadline=now + 60, selected=("d1",), target=1, min_devices=1, train=TrainConfig(),
        done=True,
    ))  # fmt: skip


def test_a_trainer_exits_when_the_job_is_done_and_an_idle_one_stays(
    start: Any, plain_broker: Any, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedmq.agent")
    topics = Topics(job=JOB, prefix=topic_prefix)
    broker = Broker(plain_broker, topics, f"{topic_prefix}/nothing")
    try:
        idle = start("idle", on_done="idle")
        trainer = start("trainer", device_id="d2")  # on_done auto: a trainer exits
        wait_until("both connected", lambda: idle.agent.link.connected
                   and trainer.agent.link.connected, timeout=30)  # fmt: skip
        broker.publish(topics.round(), _done_round(topics, 3))  # retained, as the aggregator
        trainer.thread.join(timeout=30)
        assert trainer.result == 0 and trainer.agent.done
        assert "job j is done after 3 rounds, model version -1; exiting" in _messages(caplog)
        wait_until("the idle one heard it", lambda: idle.agent.done_round == 3)
        assert idle.thread.is_alive() and not idle.agent.done
    finally:
        broker.close()

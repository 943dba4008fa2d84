"""Shared fixtures: real Mosquitto brokers on free ports and per-test topic prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.mosquitto import BrokerSettings, MosquittoBroker, mosquitto_path

BrokerFactory = Callable[..., MosquittoBroker]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Return make(**BrokerSettings overrides) starting a Mosquitto; all are stopped at teardown."""
    if mosquitto_path() is None:
        # CI installs Mosquitto, so a missing broker is a broken environment, not a skip
        pytest.fail(
            "Mosquitto is not installed: apt-get install mosquitto "
            "(the broker tests need a real broker)",
            pytrace=False,
        )
    made: list[MosquittoBroker] = []

    def make(**overrides: Any) -> MosquittoBroker:
        overrides.setdefault("data_dir", tmp_path / f"mosquitto{len(made)}")
        broker = MosquittoBroker(settings=BrokerSettings(**overrides))
        made.append(broker)
        return broker.start()

    yield make
    errors = []
    for broker in made:
        try:
            broker.stop()
        except Exception as err:  # keep stopping the others
            errors.append(f"{broker!r}: {err}")
    if errors:
        pytest.fail("could not stop brokers: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def mosquitto(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started Mosquitto with default settings on a free port."""
    return broker_factory()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to this test: a letter then eight hex digits."""
    return f"t{uuid.uuid4().hex[:8]}"

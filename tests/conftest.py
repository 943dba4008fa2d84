"""Shared fixtures: real Mosquitto brokers on free ports and per-test topic prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.mosquitto import BrokerSettings, MosquittoBroker, mosquitto_path
from broker.provision import FleetDir

BrokerFactory = Callable[..., MosquittoBroker]
# the identities every test fleet enrols: tests name devices d<i>, the inference one "sensor"
TEST_DEVICES = tuple(f"d{i}" for i in range(20)) + ("sensor",)
TEST_WATCHERS = tuple(f"w{i}" for i in range(8))  # operator.<job>.w0 .. w7: tests' watchers
TEST_JOB = "t"


@pytest.fixture
def broker_factory(tmp_path: Path, topic_prefix: str) -> Iterator[BrokerFactory]:
    """Return make(**BrokerSettings overrides) starting a Mosquitto; all are stopped at teardown.

    Secure by default, like a real fleet: each broker gets a fleet directory of its own
    (job "t" under the test's topic prefix, devices d0..d19 and "sensor"; `prefix=` and
    `job=` choose others) and runs its mTLS listener and ACL. `insecure=True` starts a plain,
    anonymous broker, for tests of the broker wrapper itself."""
    if mosquitto_path() is None:
        # CI installs Mosquitto, so a missing broker is a broken environment, not a skip
        pytest.fail(
            "Mosquitto is not installed: apt-get install mosquitto "
            "(the broker tests need a real broker)",
            pytrace=False,
        )
    made: list[MosquittoBroker] = []

    def make(*, insecure: bool = False, prefix: str | None = None, job: str = TEST_JOB,
             **overrides: Any) -> MosquittoBroker:  # fmt: skip
        overrides.setdefault("data_dir", tmp_path / f"mosquitto{len(made)}")
        if not insecure and "fleet_dir" not in overrides:
            fleet = FleetDir.init(tmp_path / f"fleet{len(made)}", job=job,
                                  prefix=prefix or topic_prefix, devices=TEST_DEVICES)  # fmt: skip
            for name in TEST_WATCHERS:  # one identity per concurrent watcher (a certificate
                fleet.add_operator(name)  # is its client id: two would knock each other off)
            overrides["fleet_dir"] = fleet.root
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
    """A started, secured Mosquitto on a free port (see broker_factory)."""
    return broker_factory()


@pytest.fixture
def plain_broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started Mosquitto without TLS, credentials or ACL: tests of the broker wrapper."""
    return broker_factory(insecure=True)


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to this test: a letter then eight hex digits."""
    return f"t{uuid.uuid4().hex[:8]}"

"""Fixtures for tests that run real aggregator and agent processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet import Fleet


@pytest.fixture
def fleet(mosquitto: Any, tmp_path: Path, topic_prefix: str) -> Iterator[Fleet]:
    """A Fleet against the test's own Mosquitto; every process stopped at teardown."""
    f = Fleet(broker=mosquitto, root=tmp_path, prefix=topic_prefix)
    yield f
    f.stop()

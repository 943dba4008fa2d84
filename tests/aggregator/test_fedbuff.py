"""FedBuff staleness rules."""

from __future__ import annotations

import pytest

from aggregator.fedbuff import BufferPolicy
from fedmq.errors import StaleUpdate


def test_staleness_and_weights() -> None:
    p = BufferPolicy(buffer_size=4, staleness_exponent=0.5, max_staleness=3)
    assert p.staleness(current_version=7, base_version=7, device="d") == 0
    assert p.staleness(current_version=7, base_version=4, device="d") == 3
    with pytest.raises(StaleUpdate, match="4 versions stale"):
        p.staleness(current_version=7, base_version=3, device="d")
    with pytest.raises(StaleUpdate, match="newer"):
        p.staleness(current_version=7, base_version=8, device="d")
    assert p.weight(0) == 1.0 and p.weight(3) == pytest.approx(0.5)
    assert [p.weight(s) for s in range(4)] == sorted((p.weight(s) for s in range(4)), reverse=True)
    assert BufferPolicy(staleness_exponent=0).weight(9) == 1.0


def test_bad_policy() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        BufferPolicy(buffer_size=0)
    with pytest.raises(ValueError, match="max_staleness"):
        BufferPolicy(max_staleness=-1)

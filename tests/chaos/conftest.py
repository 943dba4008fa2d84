"""Chaos tests drive the same real fleet as the integration tests."""

from tests.integration.conftest import fleet

__all__ = ["fleet"]

"""Fixtures of the multi-process tests."""

from __future__ import annotations

import pytest

from tests.integration.relay_helpers import RelayProcess


@pytest.fixture
def processes():
    """The relay processes a test starts (append them); each is stopped and cleaned up after."""
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.cleanup()

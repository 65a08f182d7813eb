"""Fixtures of the Sentinel tests: a master, a replica and three sentinels of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.topologies import SentinelTopology


@pytest.fixture
def sentinel_topology(tmp_path: Path):
    """A started :class:`~tests.topologies.SentinelTopology` (down-after 1 s), stopped after."""
    topology = SentinelTopology(tmp_path / "sentinel").start()
    yield topology
    topology.stop()

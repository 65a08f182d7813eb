"""Fixtures of the cluster tests: one local Redis Cluster (3 masters, 3 replicas) for the
whole package, started by the suite (:class:`tests.cluster.local.LocalCluster`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.local import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The package's cluster; a test that kills a node restarts it or leaves the package last."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield local
    local.stop()


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    """``redis+cluster://`` URL of the package's cluster (every node a seed)."""
    return cluster.url

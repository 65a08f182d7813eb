"""Tests on a local Redis Cluster (3 masters, 3 replicas) that the suite starts itself
(:mod:`tests.cluster.local`); one cluster serves the whole package (``conftest.py``)."""

from tests.cluster.local import ClusterNode, LocalCluster, slots_of

__all__ = ["ClusterNode", "LocalCluster", "slots_of"]

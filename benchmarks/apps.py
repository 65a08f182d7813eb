"""Apps the benchmark workers load (``--app benchmarks.apps:noop``)."""

from __future__ import annotations

import time

from orchestrator import Orchestrator

noop = Orchestrator(mode="worker")


async def _noop(event) -> None:
    return None


async def _latency(event) -> None:
    started = time.time()
    await noop.redis.rpush(f"{noop.settings.namespace}:bench:latency", f"{started - event.published_at:.6f}")


noop.dispatcher.subscribe("bench.noop", _noop)
noop.dispatcher.subscribe("bench.latency", _latency)

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


# -- issue 3: event-triggered three-node no-op workflows -------------------------------------
async def _step(ctx):
    return None


def _three_nodes():
    from orchestrator import Node, Workflow

    return Workflow(name="bench-three", nodes=[
        Node(name="a", handler=_step),
        Node(name="b", handler=_step, depends_on=["a"]),
        Node(name="c", handler=_step, depends_on=["b"]),
    ])


flows = Orchestrator(mode="worker")
flows.register_workflow(_three_nodes(), trigger={"type": "event", "event_type": "bench.flow"})

"""The apps the perf suite's workers load (``--app benchmarks.perf_apps:<factory>``), and the
handlers they share with the bare baselines and the peers.

Each factory builds an app with exactly one subscriber (one route, one consumer group), so a
row measures one consumer and nothing else.

- ``noop``: ``bench.perf`` events, a handler that returns at once;
- ``reference``: the reference handler: one pipelined round trip on its own plain
  ``redis.asyncio`` client (INCR + two ZADD), as :func:`reference_call`;
- ``reference_autopipe``: the same three commands through the process's shared
  :class:`~orchestrator.broker.autopipe.AutoPipeline` (one group per event);
- ``latency``: records ``time.time() - published_at`` at handler start (RPUSH);
- ``chat`` / ``plain``: a chatflow over ``payload.conversation`` and a plain subscriber, both
  doing the same work (the chatflow also updates its conversation memory) and INCRing a done
  counter.

The handlers' Redis client is built from ``TOKIWA_REDIS_URL`` in the worker process, lazily.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis.asyncio as aioredis

from orchestrator import Node, Orchestrator, Workflow
from orchestrator.broker.autopipe import AutoPipeline

EVENT_TYPE = "bench.perf"
CHAT_TYPE = "bench.perfchat"

_clients: dict[str, Any] = {}


def own_client() -> aioredis.Redis:
    """The handlers' own plain redis.asyncio client (not tokiwa's), one per process."""
    client = _clients.get("plain")
    if client is None:
        client = _clients["plain"] = aioredis.Redis.from_url(os.environ["TOKIWA_REDIS_URL"])
    return client


def own_autopipe() -> AutoPipeline:
    """One AutoPipeline over the handlers' own client, one per process."""
    pipe = _clients.get("autopipe")
    if pipe is None:
        in_flight = int(os.environ.get("BENCH_AUTOPIPE_IN_FLIGHT", "1"))
        pipe = _clients["autopipe"] = AutoPipeline(own_client(), max_in_flight=in_flight)
    return pipe


def ref_keys(namespace: str) -> tuple[str, str, str]:
    return f"{namespace}:ref:count", f"{namespace}:ref:a", f"{namespace}:ref:b"


async def reference_call(client: Any, keys: tuple[str, str, str], member: str) -> None:
    """The reference handler's work: INCR and two ZADD, one pipelined round trip."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.incr(keys[0])
    pipe.zadd(keys[1], {member: now})
    pipe.zadd(keys[2], {member: -now})
    await pipe.execute()


def _gc_setting() -> None:
    """``BENCH_GC=freeze`` moves everything allocated so far (the imports, the app) out of the
    collector's reach; ``BENCH_GC=off`` disables it (experiments for the findings)."""
    import gc

    mode = os.environ.get("BENCH_GC")
    if mode == "freeze":
        gc.freeze()
    elif mode == "off":
        gc.disable()


def _namespace() -> str:
    return os.environ.get("TOKIWA_NAMESPACE", "tokiwa")


def noop() -> Orchestrator:
    _gc_setting()
    app = Orchestrator(mode="worker")

    async def handle(event: Any) -> None:
        return None

    app.dispatcher.subscribe(EVENT_TYPE, handle, name="perf.noop")
    return app


def reference() -> Orchestrator:
    _gc_setting()
    app = Orchestrator(mode="worker")
    keys = ref_keys(_namespace())

    async def handle(event: Any) -> None:
        await reference_call(own_client(), keys, event.id)

    app.dispatcher.subscribe(EVENT_TYPE, handle, name="perf.reference")
    return app


def reference_autopipe() -> Orchestrator:
    app = Orchestrator(mode="worker")
    keys = ref_keys(_namespace())

    async def handle(event: Any) -> None:
        await reference_call(own_autopipe(), keys, event.id)

    app.dispatcher.subscribe(EVENT_TYPE, handle, name="perf.reference")
    return app


def latency() -> Orchestrator:
    app = Orchestrator(mode="worker")
    key = f"{_namespace()}:perf:latency"

    async def handle(event: Any) -> None:
        started = time.time()
        await own_client().rpush(key, f"{started - event.published_at:.6f}")

    app.dispatcher.subscribe(EVENT_TYPE, handle, name="perf.latency")
    return app


def done_key(namespace: str) -> str:
    return f"{namespace}:perf:done"


def chat(mode: str = "worker", **options: Any) -> Orchestrator:
    """A chatflow per ``payload.conversation``: one node that counts its turn in the
    conversation's memory and INCRs the done counter."""
    app = Orchestrator(mode=mode, **options)

    async def turn(ctx: Any) -> None:
        ctx.update_memory({"turns": ctx.memory.get("turns", 0) + 1, "last": ctx.input["seq"]})
        await own_client().incr(done_key(app.settings.namespace))

    app.register_workflow(Workflow(name="perf-chat", type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                          trigger={"type": "event", "event_type": CHAT_TYPE, "conversation_key": "conversation"})
    return app


def plain() -> Orchestrator:
    """The plain-event counterpart of :func:`chat`: a subscriber doing the same INCR."""
    app = Orchestrator(mode="worker")
    key = done_key(_namespace())

    async def handle(event: Any) -> None:
        await own_client().incr(key)

    app.dispatcher.subscribe(CHAT_TYPE, handle, name="perf.plain")
    return app

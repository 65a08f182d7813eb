"""The app the slot test and the cluster surface test drive (not a test module): one
registration of every kind, each leaving a trace in Redis that a test reads back.

* subscriber ``surface.record`` on ``job``: ``HINCRBY {ns}:test:seen <payload.i> 1`` and the
  time it first ran in ``{ns}:test:at``;
* ``once=True`` subscriber ``surface.once`` on ``once.evt``: ``RPUSH {ns}:test:once <pid>``;
* subscriber ``surface.poison`` on ``poison``: always raises (dead letters under
  ``ack_policy=on_success``);
* subscriber ``surface.limited`` on ``limited`` with a rate and a per-tenant concurrency limit:
  ``RPUSH {ns}:test:limited <payload.i>``;
* workflow ``dag`` (``a -> (b, c) -> d``), triggered by ``order.created`` and run by
  ``run_workflow``: ``d`` returns ``2a + 3a`` and pushes it to ``{ns}:test:dag``; ``a`` logs a line;
* workflow ``slow`` (manual): sleeps up to 30 s, for cancelling;
* chatflow ``chat`` on ``chat.turn`` (conversation key ``conversation``): appends
  ``payload.seq`` to ``memory["seq"]`` and pushes ``<seq>|<pid>|<start>|<end>`` to
  ``{ns}:test:chat:<cid>``; sleeps ``TEST_CHAT_SLEEP_MS`` (default 0) while it holds the lock;
* cron job ``tick`` every second (producer and all modes only): ``RPUSH {ns}:test:ticks <slot>|<pid>``.

``app`` is the worker app (``--app tests.cluster.surface_app:app``), ``producer_app`` the
factory for ``tokiwa-producer run --app tests.cluster.surface_app:producer_app`` (cron).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from orchestrator import Node, Orchestrator, Workflow

LIMITS = {"rate_limit": "200/s", "concurrency_limit": 2, "concurrency_key": "tenant"}


def tkey(app: Orchestrator, *parts: str) -> str:
    """A test's own key (outside tokiwa's key families)."""
    return ":".join([app.settings.namespace, "test", *parts])


def _subscribers(app: Orchestrator) -> None:
    async def record(event: Any) -> None:
        i = str(event.payload["i"])
        await app.redis.hincrby(tkey(app, "seen"), i, 1)
        await app.redis.hsetnx(tkey(app, "at"), i, repr(time.time()))

    async def once(event: Any) -> None:
        await app.redis.rpush(tkey(app, "once"), str(os.getpid()))

    async def poison(event: Any) -> None:
        raise ValueError(f"poison event {event.id} is refused")

    async def limited(event: Any) -> None:
        await app.redis.rpush(tkey(app, "limited"), str(event.payload["i"]))

    app.dispatcher.subscribe("job", record, name="surface.record")
    app.dispatcher.subscribe("once.evt", once, once=True, name="surface.once")
    app.dispatcher.subscribe("poison", poison, name="surface.poison")
    app.dispatcher.subscribe("limited", limited, name="surface.limited", **LIMITS)


def _workflows(app: Orchestrator) -> None:
    async def a(ctx: Any) -> int:
        ctx.logger.info("a starts with %s", ctx.input)
        return int((ctx.input or {}).get("x", 1))

    async def b(ctx: Any) -> int:
        return 2 * ctx.get_result("a")

    async def c(ctx: Any) -> int:
        return 3 * ctx.get_result("a")

    async def d(ctx: Any) -> int:
        total = ctx.get_result("b") + ctx.get_result("c")
        await app.redis.rpush(tkey(app, "dag"), str(total))
        return total

    dag = Workflow("dag", nodes=[Node("a", a), Node("b", b, depends_on=["a"]), Node("c", c, depends_on=["a"]),
                                 Node("d", d, depends_on=["b", "c"])])
    app.register_workflow(dag, trigger={"type": "event", "event_type": "order.created",
                                        "map_input": lambda event: event.payload})

    async def wait(ctx: Any) -> str:
        await app.redis.rpush(tkey(app, "slow"), ctx.run_id)
        for _ in range(300):
            if ctx.signal.is_set():
                return "stopped"
            await asyncio.sleep(0.1)
        return "slept"

    app.register_workflow(Workflow("slow", nodes=[Node("wait", wait)]))


def _chatflow(app: Orchestrator) -> None:
    sleep_s = int(os.environ.get("TEST_CHAT_SLEEP_MS", "0")) / 1000

    async def turn(ctx: Any) -> list[int]:
        start = time.time()
        if sleep_s:
            await asyncio.sleep(sleep_s)
        seq = int(ctx.event.payload["seq"])
        ctx.update_memory({"seq": [*ctx.memory.get("seq", []), seq]})
        await app.redis.rpush(tkey(app, "chat", ctx.conversation_id), f"{seq}|{os.getpid()}|{start}|{time.time()}")
        return [*ctx.memory.get("seq", [])]

    app.register_workflow(Workflow("chat", type="chatflow", nodes=[Node("turn", turn)]),
                          trigger={"type": "event", "event_type": "chat.turn", "conversation_key": "conversation"})


def _cron(app: Orchestrator) -> None:
    async def tick(job: str, slot: Any) -> None:
        await app.redis.rpush(tkey(app, "ticks"), f"{slot}|{os.getpid()}")

    app.register_cron_job("* * * * * *", "tick", tick)


def build_app(mode: str = "worker", **options: Any) -> Orchestrator:
    """The surface app in ``mode``; ``options`` go to the Orchestrator (redis_url, namespace ...)."""
    app = Orchestrator(mode=mode, **options)
    _subscribers(app)
    _workflows(app)
    _chatflow(app)
    _cron(app)
    return app


def producer_app() -> Orchestrator:
    return build_app("producer")


app = build_app("worker")

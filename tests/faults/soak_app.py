"""The app of the memory-bounds soak (tests/faults/test_memory_bounds.py; not a test module).

It touches every key family a deployment uses, and records nothing of its own in Redis:

- ``soak.plain``: a plain subscriber, rate-limited per ``payload.k`` (limit keys);
- ``soak.once``: a ``once=True`` subscriber (the once claim);
- ``soak.order``: the workflow ``soak-order`` (two nodes that log: run records, logs, node
  checkpoints);
- ``soak.chat``: the chatflow ``soak-chat`` over ``payload.cid`` (conversation memory, locks,
  order lists);
- ``soak-call``: a manual workflow for ``run_workflow`` (result keys);
- ``soak-slow``: a manual workflow that sleeps, started and cancelled (cancel requests);
- cron ``soak-tick``: a ``soak.tick`` event every second (fired by producers under leader
  election: the lease, its epoch, the job's state).
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator import Node, Orchestrator, Workflow

CHATFLOW = "soak-chat"
ONCE_SUBSCRIBER = "soak-once"
ROUTES = 6  # the subscribers and workflows above, one consumer group each


def build_app(mode: str = "worker", **options: Any) -> Orchestrator:
    app = Orchestrator(mode=mode, **options)

    async def plain(event: Any) -> None:
        return None

    app.dispatcher.subscribe("soak.plain", plain, name="soak-plain", rate_limit="100000/s", rate_key="k")
    app.dispatcher.subscribe("soak.once", plain, once=True, name=ONCE_SUBSCRIBER)

    async def check(ctx: Any) -> int:
        ctx.logger.info("checking order %s", ctx.input.get("n"))
        return int(ctx.input.get("n", 0))

    async def book(ctx: Any) -> int:
        ctx.logger.info("booked %s", ctx.get_result("check"))
        return ctx.get_result("check") * 2

    app.register_workflow(Workflow(name="soak-order", nodes=[
        Node(name="check", handler=check), Node(name="book", handler=book, depends_on=["check"])]),
        trigger={"type": "event", "event_type": "soak.order", "map_input": lambda e: e.payload})

    async def turn(ctx: Any) -> int:
        turns = int(ctx.memory.get("turns", 0)) + 1
        ctx.update_memory({"turns": turns, "last": ctx.input.get("text", "")})
        return turns

    app.register_workflow(Workflow(name=CHATFLOW, type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                          trigger={"type": "event", "event_type": "soak.chat", "conversation_key": "cid",
                                   "map_input": lambda e: e.payload})

    def add(ctx: Any) -> int:
        return int(ctx.input["a"]) + int(ctx.input["b"])

    app.register_workflow(Workflow(name="soak-call", nodes=[Node(name="add", handler=add)]))

    async def slow(ctx: Any) -> str:
        await asyncio.sleep(5)
        return "slept"

    app.register_workflow(Workflow(name="soak-slow", nodes=[Node(name="sleep", handler=slow)]))
    app.register_cron_event("* * * * * *", "soak.tick", name="soak-tick")
    return app


app = build_app()

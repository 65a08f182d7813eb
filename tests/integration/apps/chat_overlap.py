"""Test app for overlapping chatflow runs across real processes (not a test module).

``app`` (and :func:`build_app` for any mode) registers the chatflow ``overlap-turns``,
triggered by ``chat.overlap`` events whose payload is ``{"conversation": cid, "seq": i,
"n": n}``. It is a chain of ``TEST_NODES`` async nodes; each one

- pushes JSON ``{run, seq, node, phase: "start", t, pid}`` to ``{ns}:test:marks:{cid}`` when it
  starts and ``phase: "end"`` when it ends (``t`` = ``time.time()`` taken when the node
  got there, before the push; the push is shielded, so a step taken is always recorded), where ``run`` = ``<pid>:<event id>:<delivery>`` names one
  attempt of one event in one process;
- sleeps ``TEST_NODE_SLEEP_MS`` in between; a node cancelled there pushes ``{run, seq, node,
  t, pid}`` to ``{ns}:test:cancelled:{cid}`` (``t`` = when the cancellation reached it) and
  records no end;
- the last node folds the event into the memory: ``memory["seq"]`` appends ``seq``,
  ``memory["sum"]`` adds ``n``.

So a test sees each run as the interval from its first mark to its last, and can check that
no two runs of one conversation overlap, also when a lock holder was frozen and resumed.

Environment (read when the app is built):

TEST_LOCK_TTL_MS      conversation lock lease (``conversation_lock_ttl_ms``)  default 30000
TEST_NODES            nodes in the chain                                      default 4
TEST_NODE_SLEEP_MS    each node sleeps this long (ms)                         default 200
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from orchestrator import Node, Orchestrator, Workflow

EVENT_TYPE = "chat.overlap"
WORKFLOW = "overlap-turns"


def _env_ms(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def tkey(app: Orchestrator, name: str, *parts: str) -> str:
    return ":".join([app.settings.namespace, "test", name, *parts])


def build_app(mode: str = "worker", **options: Any) -> Orchestrator:
    """The app in ``mode``; ``options`` go to the Orchestrator (redis_url, namespace ...)."""
    app = Orchestrator(mode=mode, conversation_lock_ttl_ms=_env_ms("TEST_LOCK_TTL_MS", 30_000), **options)
    count = _env_ms("TEST_NODES", 4)
    sleep_s = _env_ms("TEST_NODE_SLEEP_MS", 200) / 1000

    def step(index: int):
        async def node(ctx) -> int:
            cid, seq = ctx.conversation_id, ctx.input["seq"]
            run = f"{os.getpid()}:{ctx.event.id}:{ctx.event.deliveries}"

            async def mark(phase: str) -> None:
                # shielded: a step the node took is recorded even if a cancellation lands
                # while the push is under way
                record = {"run": run, "seq": seq, "node": index, "phase": phase, "t": time.time(),
                          "pid": os.getpid()}
                await asyncio.shield(app.redis.rpush(tkey(app, "marks", cid), json.dumps(record)))

            await mark("start")
            try:
                await asyncio.sleep(sleep_s)
            except asyncio.CancelledError:
                record = {"run": run, "seq": seq, "node": index, "t": time.time(), "pid": os.getpid()}
                await asyncio.shield(app.redis.rpush(tkey(app, "cancelled", cid), json.dumps(record)))
                raise
            if index == count - 1:
                ctx.update_memory({"seq": [*ctx.memory.get("seq", []), seq],
                                   "sum": ctx.memory.get("sum", 0) + ctx.input["n"]})
            await mark("end")
            return index

        return node

    nodes = [Node(f"n{i}", step(i), depends_on=[f"n{i - 1}"] if i else None) for i in range(count)]
    app.register_workflow(Workflow(name=WORKFLOW, type="chatflow", nodes=nodes), trigger={
        "type": "event", "event_type": EVENT_TYPE,
        "map_conversation_id": lambda event: event.payload["conversation"],
    })
    return app


app = build_app("worker")

"""A worker app for the checkpoint fault tests: ``order3``, three nodes in a chain triggered by
``order.created`` (payload ``{"i": n}``), each passing its output to the next.

Every node counts its executions outside the worker, before it does anything else: HINCRBY on
``{ns}:test:execs``, field ``"<i>:<node>"`` (a key tokiwa never touches). ``charge`` and
``ship`` sleep ``TEST_SLEEP_MS`` (default 0); node 3 (``mail``) adds ``i`` to the set
``{ns}:test:done`` when it finishes.

``TEST_SHIP_BLOCK_MS``: ``ship`` is a plain ``def`` run inline that blocks the event loop this
long (a worker frozen there finishes it the moment it thaws, before its loop does anything else).

``TEST_ROLE=victim``: once the key ``{ns}:test:hang`` exists, ``mail`` adds ``i`` to the set
``{ns}:test:hung`` and hangs until the process dies (its worker is killed there).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from orchestrator import Node, Orchestrator, Workflow

app = Orchestrator(mode="worker")
NAMESPACE = os.environ.get("TOKIWA_NAMESPACE", "tokiwa")
SLEEP_S = int(os.environ.get("TEST_SLEEP_MS", "0")) / 1000.0
SHIP_BLOCK_S = int(os.environ.get("TEST_SHIP_BLOCK_MS", "0")) / 1000.0
VICTIM = os.environ.get("TEST_ROLE") == "victim"
_client: aioredis.Redis | None = None


def counter() -> aioredis.Redis:
    """A client of the test's own (not the app's), on the worker's Redis."""
    global _client
    if _client is None:
        _client = aioredis.Redis.from_url(os.environ["TOKIWA_REDIS_URL"])
    return _client


async def count(ctx: Any, node: str) -> int:
    i = int(ctx.input["i"])
    await counter().hincrby(f"{NAMESPACE}:test:execs", f"{i}:{node}", 1)
    return i


async def charge(ctx: Any) -> dict[str, int]:
    i = await count(ctx, "charge")
    await asyncio.sleep(SLEEP_S)
    return {"i": i, "charged": i * 2}


async def ship(ctx: Any) -> dict[str, int]:
    await count(ctx, "ship")
    await asyncio.sleep(SLEEP_S)
    return {"parcel": ctx.get_result("charge")["charged"] + 1}


def blocking_ship(ctx: Any) -> dict[str, int]:
    with redis.Redis.from_url(os.environ["TOKIWA_REDIS_URL"]) as client:
        client.hincrby(f"{NAMESPACE}:test:execs", f"{int(ctx.input['i'])}:ship", 1)
    time.sleep(SHIP_BLOCK_S)
    return {"parcel": ctx.get_result("charge")["charged"] + 1}


async def mail(ctx: Any) -> dict[str, int]:
    i = await count(ctx, "mail")
    if VICTIM and await counter().exists(f"{NAMESPACE}:test:hang"):
        await counter().sadd(f"{NAMESPACE}:test:hung", i)
        await asyncio.sleep(3600)
    await counter().sadd(f"{NAMESPACE}:test:done", i)
    return {"mailed": ctx.get_result("ship")["parcel"] * 10, "attempt": ctx.attempt}


SHIP = Node("ship", blocking_ship, ["charge"], inline=True) if SHIP_BLOCK_S else Node("ship", ship, ["charge"])
app.register_workflow(Workflow("order3", [Node("charge", charge), SHIP, Node("mail", mail, ["ship"])]),
                      trigger={"type": "event", "event_type": "order.created"})

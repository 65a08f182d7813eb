"""A test app with event-triggered and manual workflows (loaded by real worker processes)."""

from __future__ import annotations

import asyncio
import os
import re

from orchestrator import Node, Orchestrator, Workflow

app = Orchestrator(mode="worker")


async def validate(ctx):
    order = ctx.input
    if order.get("qty", 0) <= 0:
        raise ValueError(f"bad quantity in {order}")
    return {"ref": order["ref"], "qty": order["qty"]}


async def price(ctx):
    await asyncio.sleep(0.05)  # a little real work, so both workers get a share
    return ctx.get_result("validate")["qty"] * 10


async def record(ctx):
    total = ctx.get_result("price")
    await app.redis.hset(f"{app.settings.namespace}:test:orders", ctx.input["ref"], f"{total}:{os.getpid()}")
    return {"total": total, "context": ctx.context}


order_flow = Workflow(name="order-flow", nodes=[
    Node(name="validate", handler=validate),
    Node(name="price", handler=price, depends_on=["validate"]),
    Node(name="record", handler=record, depends_on=["price"]),
])
app.register_workflow(order_flow, trigger={
    "type": "event", "event_type": "order.created",
    "map_input": lambda e: e.payload["order"], "map_context": lambda e: {"via": e.type},
})


async def count(ctx):
    await app.redis.rpush(f"{app.settings.namespace}:test:audit", ctx.event.type)
    return ctx.event.type


app.register_workflow(Workflow(name="audit-regex", nodes=[Node(name="count", handler=count)]),
                      trigger={"type": "event", "event_type": re.compile(r"^inventory\.")})
app.register_workflow(Workflow(name="audit-list", nodes=[Node(name="count", handler=count)]),
                      trigger={"type": "event", "event_type": ["user.joined", "user.left"]})


def add(ctx):
    return ctx.input["a"] + ctx.input["b"]


app.register_workflow(Workflow(name="add", nodes=[Node(name="sum", handler=add)]))

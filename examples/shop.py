"""The example shop app: what `make demo`, the Procfile and deploy/ run.

    tokiwa-producer run --app examples.shop:app     # cron (leader-elected) + publishing
    tokiwa-worker run --app examples.shop:app       # consumes events, runs workflows

It shows every capability once:
- subscribers: ``order.created`` is logged, ``*`` counts every event type;
- an event-triggered DAG workflow ``order-flow``: validate -> (charge, reserve) -> ship, whose
  last node publishes a Miclow topic message ``orders.shipped:<ref>``;
- a manual workflow ``order-report`` that callers start with ``run_workflow``;
- a chatflow ``support-chat``: one conversation at a time, memory kept in Redis;
- a cron event ``system.heartbeat`` every 2 seconds (6-field expression);
- with ``--relay examples/relay/shop.toml``: a child process answers each shipped order with
  ``desk.ack:<ref>``, which becomes a ``desk.ack`` event (``publish_events``).
Demo data lives under ``{namespace}:demo:*`` so ``redis-cli`` can show it.
"""

from __future__ import annotations

import asyncio
import os

from orchestrator import Node, Orchestrator, RetryPolicy, Workflow

app = Orchestrator(source="shop", max_concurrent_events=8)


def _key(name: str) -> str:
    return f"{app.settings.namespace}:demo:{name}"


# -- subscribers ------------------------------------------------------------------------------
async def count_every_event(event) -> None:
    await app.redis.hincrby(_key("events"), event.type, 1)


async def remember_ack(event) -> None:
    await app.redis.rpush(_key("desk_acks"), event.payload["message"])


app.dispatcher.subscribe("*", count_every_event)
app.dispatcher.subscribe("desk.ack", remember_ack)


# -- an event-triggered DAG workflow ----------------------------------------------------------
async def validate(ctx):
    order = ctx.input
    if not order.get("items"):
        raise ValueError(f"order {order.get('ref')} has no items")
    return {"ref": order["ref"], "total": sum(i["qty"] * i["price"] for i in order["items"])}


async def charge(ctx):
    await asyncio.sleep(0.05)  # the payment provider
    return {"charged": ctx.get_result("validate")["total"]}


async def reserve(ctx):
    await asyncio.sleep(0.03)  # the warehouse
    return {"reserved": len(ctx.input["items"])}


async def ship(ctx):
    ref = ctx.get_result("validate")["ref"]
    await ctx.publish_topic("orders.shipped", ref)  # to relay children on any host
    await app.redis.hset(_key("shipped"), ref, f"{ctx.get_result('charge')['charged']}:{os.getpid()}")
    return {"ref": ref, "worker_pid": os.getpid()}


order_flow = Workflow(name="order-flow", nodes=[
    Node(name="validate", handler=validate),
    Node(name="charge", handler=charge, depends_on=["validate"],
         retry=RetryPolicy(max_attempts=3, initial_delay_s=0.2)),
    Node(name="reserve", handler=reserve, depends_on=["validate"]),
    Node(name="ship", handler=ship, depends_on=["charge", "reserve"]),
])
app.register_workflow(order_flow, trigger={"type": "event", "event_type": "order.created"})


# -- a manual workflow, started with run_workflow ----------------------------------------------
async def totals(ctx):
    shipped = await app.redis.hgetall(_key("shipped"))
    return {"orders": len(shipped), "revenue": sum(int(v.split(b":")[0]) for v in shipped.values())}


app.register_workflow(Workflow(name="order-report", nodes=[Node(name="totals", handler=totals)]))


# -- a chatflow: serialized per conversation, with memory ---------------------------------------
def reply(ctx):
    turns = ctx.memory.get("turns", 0) + 1
    history = [*ctx.memory.get("history", []), ctx.input["text"]]
    ctx.update_memory({"turns": turns, "history": history[-10:]})
    return f"turn {turns}: you said {ctx.input['text']!r}"


support = Workflow(name="support-chat", type="chatflow", nodes=[Node(name="reply", handler=reply)])
app.register_workflow(support, trigger={
    "type": "event", "event_type": "chat.message",
    "map_conversation_id": lambda e: e.payload["conversation"],
})


# -- cron: every 2 seconds (6 fields: seconds first); a real shop would use "*/5 * * * *" ----------
app.register_cron_event("*/2 * * * * *", "system.heartbeat", name="heartbeat", payload={"from": "cron"})

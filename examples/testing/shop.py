"""A tiny shop, tested by ``test_shop.py`` with tokiwa's pytest fixtures.

- ``order.created`` sends a confirmation (a subscriber: here it writes the e-mail address to
  a Redis list) and schedules a reminder a day later (a delayed event);
- the ``checkout`` workflow, triggered by ``order.created``: ``price`` -> ``invoice``, whose
  last node publishes ``invoice.issued``;
- the ``quote`` workflow, started by name with ``run_workflow``.
"""

from __future__ import annotations

from typing import Any

from orchestrator import Event, Node, Orchestrator, Workflow
from orchestrator.workflow.context import NodeContext

app = Orchestrator(source="shop")


def emails_key() -> str:
    """The list of confirmations sent (under the app's namespace)."""
    return f"{app.settings.namespace}:emails"


async def send_confirmation(event: Event) -> None:
    email = event.payload.get("email")
    if not email:
        raise ValueError(f"order {event.payload.get('ref')} has no e-mail address")
    assert app.redis is not None
    await app.redis.rpush(emails_key(), email)


async def schedule_reminder(event: Event) -> None:
    await app.publish("order.reminder", {"ref": event.payload["ref"]}, delay_s=86_400)


app.dispatcher.subscribe("order.created", send_confirmation, name="send_confirmation")
app.dispatcher.subscribe("order.created", schedule_reminder, name="schedule_reminder")


def total_of(items: list[dict[str, Any]]) -> int:
    if not items:
        raise ValueError("an order needs items")
    return sum(item["qty"] * item["price"] for item in items)


async def price(ctx: NodeContext) -> int:
    return total_of(ctx.input["items"])


async def invoice(ctx: NodeContext) -> dict[str, Any]:
    ref, total = ctx.input["ref"], ctx.get_result("price")
    await app.publish("invoice.issued", {"ref": ref, "total": total})
    return {"ref": ref, "total": total}


checkout = Workflow(name="checkout", nodes=[
    Node(name="price", handler=price),
    Node(name="invoice", handler=invoice, depends_on=["price"]),
])
app.register_workflow(checkout, trigger={"type": "event", "event_type": "order.created"})


async def quote(ctx: NodeContext) -> dict[str, Any]:
    total = total_of(ctx.input["items"])
    return {"total": total, "with_tax": round(total * 1.1)}


app.register_workflow(Workflow(name="quote", nodes=[Node(name="quote", handler=quote)]))

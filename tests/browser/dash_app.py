"""The app the dashboard's browser tests run on real worker and producer processes.

* ``order-flow`` (on ``order.created``): a diamond DAG fetch → parse, enrich → report that
  logs a line per node and succeeds;
* ``broken-flow`` (on ``order.broken``): prepare → charge, which raises ValueError (caused by
  a KeyError), so ``notify`` never runs and the run fails;
* ``chat-flow`` (chatflow on ``chat.msg``, conversation key ``conv``): a turn that sleeps
  ``payload.sleep_s``, holding its conversation's lock meanwhile;
* subscriber ``dash.poison`` (on ``poison``): fails while the file ``$TEST_POISON`` exists,
  so with ``max_deliveries=1`` and ``ack_policy=on_success`` its events are dead-lettered;
  once the file is gone a requeued event succeeds and is written to ``$TEST_OUT``;
* cron job ``nightly-report`` (``0 3 * * *``: fires under a producer's leadership, never in
  the tests' time);
* with ``TEST_GHOST=1`` also ``ghost-flow`` (on ``ghost.ping``): the processes without it
  leave that route's group waiting.
"""

from __future__ import annotations

import asyncio
import os

from orchestrator import Node, Orchestrator, Workflow

app = Orchestrator()
OUT = os.environ.get("TEST_OUT", "")
POISON = os.environ.get("TEST_POISON", "")


def write(line: str) -> None:
    if OUT:
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(line + "\n")


async def fetch(ctx) -> dict:
    ctx.logger.info("fetching order %s", ctx.input.get("ref"))
    return {"ref": ctx.input.get("ref"), "lines": 3}


async def parse(ctx) -> int:
    ctx.logger.info("parsed 3 lines")
    return 3


async def enrich(ctx) -> str:
    await asyncio.sleep(0.05)
    ctx.logger.info("enriched with the customer record")
    return "gold"


async def report(ctx) -> str:
    ctx.logger.info("report ready")
    return "ok"


fetch_n = Node(name="fetch", handler=fetch)
parse_n = Node(name="parse", handler=parse, depends_on=[fetch_n.id])
enrich_n = Node(name="enrich", handler=enrich, depends_on=[fetch_n.id])
report_n = Node(name="report", handler=report, depends_on=[parse_n.id, enrich_n.id])
app.register_workflow(Workflow(name="order-flow", nodes=[fetch_n, parse_n, enrich_n, report_n]),
                      trigger={"type": "event", "event_type": "order.created"})


async def prepare(ctx) -> str:
    ctx.logger.info("preparing the charge")
    return "prepared"


async def charge(ctx) -> None:
    ctx.logger.warning("the card processor answered 402")
    try:
        {}["card"]
    except KeyError as exc:
        raise ValueError("card declined for order " + str(ctx.input.get("ref"))) from exc


async def notify(ctx) -> None:
    ctx.logger.info("never reached")


prepare_n = Node(name="prepare", handler=prepare)
charge_n = Node(name="charge", handler=charge, depends_on=[prepare_n.id])
notify_n = Node(name="notify", handler=notify, depends_on=[charge_n.id])
app.register_workflow(Workflow(name="broken-flow", nodes=[prepare_n, charge_n, notify_n]),
                      trigger={"type": "event", "event_type": "order.broken"})


async def turn(ctx) -> None:
    await asyncio.sleep(float(ctx.input.get("sleep_s", 0)))


app.register_workflow(Workflow(name="chat-flow", type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                      trigger={"type": "event", "event_type": "chat.msg", "conversation_key": "conv"})


async def poison(event) -> None:
    if POISON and os.path.exists(POISON):
        raise RuntimeError(f"poison pill {event.payload.get('n')}: the handler is broken")
    write(f"poison {event.id} ok")


app.dispatcher.subscribe("poison", poison, name="dash.poison")
app.register_cron_event("0 3 * * *", "report.nightly", name="nightly-report")

if os.environ.get("TEST_GHOST") == "1":
    app.register_workflow(Workflow(name="ghost-flow", nodes=[Node(name="boo", handler=report)]),
                          trigger={"type": "event", "event_type": "ghost.ping"})

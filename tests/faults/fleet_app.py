"""A worker app for fleet tests: which workflows it registers is chosen by the environment,
so several worker processes on one Redis can run different "versions" of one app.

Every node run appends one line ``name i pid t`` to ``$TEST_OUT`` (O_APPEND, one write per
line, so lines of several processes never interleave).

TEST_OUT         the file                                                     required
TEST_WORKFLOWS   comma-separated names among fleet-x, fleet-y, fleet-z, fleet-fail: each
                 runs one node per ``job`` event; fleet-fail fails every event's first
                 delivery                                                     default none
TEST_SLEEP_MS    each ``job`` node sleeps this long                           default 0
TEST_LIMITED     "1": the workflow fleet-limited on ``limited``: at most 50 runs a second, 3 at once
                 per ``payload.tenant``; each run sleeps 50 ms and writes its start and end
TEST_GLOB        "1": a subscriber fleet.glob and a workflow fleet-glob-wf on ``order.*``
TEST_EXTRAS      "1": also the manual workflows fleet-add, fleet-parent / fleet-child,
                 fleet-slow and the chatflow fleet-chat (``chat.msg``, conversation key
                 ``payload.conv``)                                            default off
"""

from __future__ import annotations

import asyncio
import os
import time

from orchestrator import Node, Orchestrator, Workflow

app = Orchestrator(mode="worker")
OUT = os.environ.get("TEST_OUT", "")
SLEEP_S = int(os.environ.get("TEST_SLEEP_MS", "0")) / 1000.0
_fd: int | None = None


def write(*parts: object) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (" ".join(str(p) for p in parts) + "\n").encode())


def job_node(name: str):
    async def run(ctx) -> int:
        if SLEEP_S:
            await asyncio.sleep(SLEEP_S)
        i = int(ctx.input["i"])
        if name == "fleet-fail" and ctx.event is not None and ctx.event.deliveries == 1:
            write(name, i, os.getpid(), "fail")
            raise ValueError(f"{name} fails the first delivery of {i}")
        write(name, i, os.getpid(), "ok")
        return i
    return run


for wf_name in filter(None, os.environ.get("TEST_WORKFLOWS", "").split(",")):
    app.register_workflow(Workflow(name=wf_name, nodes=[Node(name="step", handler=job_node(wf_name))]),
                          trigger={"type": "event", "event_type": "job"})


async def add(ctx) -> int:
    write("fleet-add", ctx.input["a"] + ctx.input["b"], os.getpid(), "ok")
    return int(ctx.input["a"]) + int(ctx.input["b"])


async def call_child(ctx) -> int:
    result = await app.run_workflow("fleet-child", input={"n": ctx.input["n"]}, timeout=30)
    write("fleet-parent", ctx.input["n"], os.getpid(), result.run_id)
    return int(result.nodes["double"].output)


async def double(ctx) -> int:
    write("fleet-child", ctx.input["n"], os.getpid(), "ok")
    return 2 * int(ctx.input["n"])


async def slow(ctx) -> None:
    write("fleet-slow-start", ctx.run_id, os.getpid(), time.time())
    await asyncio.sleep(float(ctx.input.get("sleep_s", 30)) if isinstance(ctx.input, dict) else 30)


async def after_slow(ctx) -> None:
    write("fleet-slow-after", ctx.run_id, os.getpid(), time.time())


async def turn(ctx) -> None:
    conv, seq = ctx.input["conv"], int(ctx.input["seq"])
    started = time.time()
    await asyncio.sleep(0.002 * (seq % 3))
    write("fleet-chat", f"{conv}:{seq}", os.getpid(), f"{started:.6f}:{time.time():.6f}")


async def on_order(event) -> None:
    write("fleet-glob", event.payload["i"], os.getpid(), "ok")


async def limited(ctx) -> None:
    started = time.time()
    await asyncio.sleep(0.05)
    write("fleet-limited", ctx.input["i"], os.getpid(), f"{started:.6f}:{time.time():.6f}:{ctx.input['tenant']}")


if os.environ.get("TEST_LIMITED") == "1":
    app.register_workflow(Workflow(name="fleet-limited", nodes=[Node(name="step", handler=limited)]),
                          trigger={"type": "event", "event_type": "limited"},
                          rate_limit="50/s", concurrency_limit=3, concurrency_key="tenant")


if os.environ.get("TEST_GLOB") == "1":
    app.dispatcher.subscribe("order.*", on_order, name="fleet.glob")
    app.register_workflow(Workflow(name="fleet-glob-wf", nodes=[Node(name="step", handler=job_node("fleet-glob-wf"))]),
                          trigger={"type": "event", "event_type": "order.*"})


if os.environ.get("TEST_EXTRAS") == "1":
    app.register_workflow(Workflow(name="fleet-add", nodes=[Node(name="sum", handler=add)]))
    app.register_workflow(Workflow(name="fleet-child", nodes=[Node(name="double", handler=double)]))
    app.register_workflow(Workflow(name="fleet-parent", nodes=[Node(name="call", handler=call_child)]))
    begin = Node(name="begin", handler=slow)
    app.register_workflow(Workflow(name="fleet-slow", nodes=[
        begin, Node(name="after", handler=after_slow, depends_on=[begin.id])]))
    app.register_workflow(Workflow(name="fleet-chat", type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                          trigger={"type": "event", "event_type": "chat.msg", "conversation_key": "conv"})
